# SPDX-License-Identifier: Apache-2.0
"""Every argument check: one row per rule, run on the CPU and (marked cuda) on the GPU.

Each row starts from valid arguments, breaks one rule, and expects the documented error type
and a message naming the argument. On CUDA the value rows are caught by the dustin.ops wrappers
(validate=True copies the values to the host); the metadata rows by the op itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import make_paged_cache
from dustin import ops

SM_SCALE = 0.125


def verify_args(device: str) -> dict:
    """Valid sparse_verify_out arguments: B = 2, q = 3, Hq = 4, Hkv = 2, D = 64, P = 16."""
    gen = torch.Generator().manual_seed(0)
    cache = make_paged_cache([40, 20], 16, 2, 64, torch.bfloat16, "HND", device, gen)
    q = torch.randn(2, 3, 4, 64, generator=gen).to(torch.bfloat16).to(device)
    block_ids, block_counts = ops.dense_block_lists(cache.kv_lens, 16)  # K = 3
    return {
        "q": q,
        "k_cache": cache.k_cache,
        "v_cache": cache.v_cache,
        "block_table": cache.block_table,  # [2, 4], 7 pages
        "kv_lens": cache.kv_lens,
        "block_ids": block_ids,
        "block_counts": block_counts,
        "sm_scale": SM_SCALE,
        "kv_layout": "HND",
        "out": torch.empty_like(q),
        "lse": torch.empty(2, 3, 4, device=device),
        "workspace": None,
    }


def scores_args(device: str) -> dict:
    """Valid block_scores arguments: B = 2, n = 3, Hs = 3, Hkv = 2, D = 64, P = 16, bs = 8."""
    gen = torch.Generator().manual_seed(1)
    cache = make_paged_cache([40, 20], 16, 2, 64, torch.bfloat16, "HND", device, gen)
    return {
        "q_srh": torch.randn(2, 3, 3, 64, generator=gen).to(torch.bfloat16).to(device),
        "k_cache": cache.k_cache,
        "block_table": cache.block_table,
        "kv_lens": cache.kv_lens,
        "head_map": torch.tensor([0, 1, 1], dtype=torch.int32, device=device),
        "sm_scale": SM_SCALE,
        "block_size": 8,
        "kv_layout": "HND",
        "scores": torch.zeros(2, 5, device=device),
        "workspace": None,
    }


def select_args(device: str) -> dict:
    """Valid select_blocks_out arguments: B = 2, NB = 10, bs = 8, K = 4."""
    gen = torch.Generator().manual_seed(2)
    return {
        "draft_scores": torch.randn(2, 10, generator=gen).to(device),
        "target_scores": torch.randn(2, 10, generator=gen).to(device),
        "kv_lens": torch.tensor([40, 20], dtype=torch.int32, device=device),
        "q_len": 3,
        "block_size": 8,
        "budget_blocks": 4,
        "n_sink": 4,
        "n_recent": 8,
        "draft_share": 0.5,
        "block_ids": torch.empty(2, 4, dtype=torch.int32, device=device),
        "block_counts": torch.empty(2, dtype=torch.int32, device=device),
    }


def store_args(device: str) -> dict:
    """Valid store_kv arguments: N = 5, Hkv = 2, D = 64, P = 16, 7 pages; the caches are views
    into one pool ``[pages, k|v, Hkv, P, D]`` (page stride 4096, not contiguous)."""
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(7, 2, 2, 16, 64, generator=gen).to(bf16).to(device)
    return {
        "k": torch.randn(5, 2, 64, generator=gen).to(bf16).to(device),
        "v": torch.randn(5, 2, 64, generator=gen).to(bf16).to(device),
        "k_cache": pool[:, 0],
        "v_cache": pool[:, 1],
        "pages": torch.tensor([3, 0, 6, 3, 1], device=device),
        "slots": torch.tensor([0, 15, 7, 1, 2], device=device),
        "kv_layout": "HND",
    }


def run_op(op: str, a: dict) -> None:
    if op == "sparse_verify":
        ops.sparse_verify(**{k: v for k, v in a.items() if k not in ("out", "lse", "workspace")})
    elif op == "sparse_verify_out":
        ops.sparse_verify_out(**a)
    elif op == "sparse_verify_workspace_bytes":
        ops.sparse_verify_workspace_bytes(
            a["q"], a["k_cache"], a["block_table"], a["block_ids"], a["kv_layout"]
        )
    elif op == "block_scores":
        ops.block_scores(**a)
    elif op == "select_blocks":
        ops.select_blocks(**{k: v for k, v in a.items() if k not in ("block_ids", "block_counts")})
    elif op == "store_kv":
        ops.store_kv(**a)
    else:
        ops.select_blocks_out(**a)


ARGS = {
    "sparse_verify": verify_args,
    "sparse_verify_out": verify_args,
    "sparse_verify_workspace_bytes": verify_args,
    "block_scores": scores_args,
    "select_blocks": select_args,
    "select_blocks_out": select_args,
    "store_kv": store_args,
}


def inner_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose innermost stride is 2."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def other_device(t: torch.Tensor) -> torch.Tensor:
    """t on another device: meta for CPU inputs (the Meta kernel checks devices), else CPU."""
    return t.to("meta") if t.device.type == "cpu" else t.cpu()


def replace(name: str, make: Callable[[dict], torch.Tensor | float | int | str]):
    def mutate(a: dict) -> None:
        a[name] = make(a)

    return mutate


def set_value(name: str, index: tuple, value: int):
    def mutate(a: dict) -> None:
        a[name][index] = value

    return mutate


@dataclass
class Row:
    id: str
    op: str
    mutate: Callable[[dict], None]
    error: type[Exception]
    match: str
    devices: tuple[str, ...] = ("cpu", "cuda")


def R(id, op, mutate, error, match, devices=("cpu", "cuda")):
    return Row(id, op, mutate, error, match, devices)


SV, SVO = "sparse_verify", "sparse_verify_out"
BS, SB, SBO = "block_scores", "select_blocks", "select_blocks_out"
SKV = "store_kv"
V, T, I, NI = ValueError, TypeError, IndexError, NotImplementedError
bf16 = torch.bfloat16

# One row per line reads as a table; keep the formatter out of it.
# fmt: off
ROWS = [
    # ---- sparse_verify: q
    R("q-rank", SV, replace("q", lambda a: a["q"][0]), V, r"q must have 4 dims \[B, q, Hq, D\]"),
    R("q-dtype", SV, replace("q", lambda a: a["q"].to(torch.int32)), T,
      r"q must be bfloat16, float16 or float32, got Int"),
    R("q-inner-stride", SV, replace("q", lambda a: inner_strided(a["q"])), V,
      r"q must have innermost stride 1"),
    R("q-no-tokens", SV, replace("q", lambda a: a["q"][:, :0]), V,
      r"q must hold at least one query token"),
    R("q-no-heads", SV, replace("q", lambda a: a["q"][:, :, :0]), V,
      r"q must have at least one head"),
    R("q-heads-not-multiple", SV, replace("q", lambda a: a["q"][:, :, :3]), V,
      r"q heads Hq \(size\(2\)\) must be a multiple of Hkv = 2"),
    R("q-fp32-on-cuda", SV, lambda a: a.update(
        q=a["q"].float(), k_cache=a["k_cache"].float(), v_cache=a["v_cache"].float()), NI,
      r"q must be bfloat16 or float16 on CUDA", ("cuda",)),
    R("head-dim-on-cuda", SV, lambda a: a.update(
        q=a["q"][..., :32], k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]), NI,
      r"head dim D must be in \{64, 128\} on CUDA, got 32", ("cuda",)),
    R("group-on-cuda", SV, replace("q", lambda a: a["q"].repeat(1, 1, 9, 1)[:, :, :34]), NI,
      r"GQA group G = Hq / Hkv must be at most 16 on CUDA, got 17", ("cuda",)),
    R("q-len-on-cuda", SV, lambda a: a.update(
        q=a["q"].repeat(1, 6, 1, 1)[:, :17], kv_lens=torch.full_like(a["kv_lens"], 20)), NI,
      r"q must hold at most 16 query tokens", ("cuda",)),
    R("k-misaligned-on-cuda", SV, lambda a: a.update(
        k_cache=torch.empty(a["k_cache"].numel() + 1, dtype=a["k_cache"].dtype,
                            device=a["k_cache"].device)[1:].view(a["k_cache"].shape),
        v_cache=torch.empty(a["v_cache"].numel() + 1, dtype=a["v_cache"].dtype,
                            device=a["v_cache"].device)[1:].view(a["v_cache"].shape)), V,
      r"k_cache must start 16-byte aligned on CUDA", ("cuda",)),
    R("out-misaligned-on-cuda", SVO, replace("out", lambda a: torch.empty(
        a["out"].numel() + 1, dtype=a["out"].dtype, device=a["out"].device)[1:].view(
        a["out"].shape)), V, r"out must start 16-byte aligned on CUDA", ("cuda",)),
    # ---- caches
    R("kv-layout", SV, replace("kv_layout", lambda a: "NDH"), V,
      r'kv_layout must be "NHD" or "HND", got "NDH"'),
    R("k-rank", SV, replace("k_cache", lambda a: a["k_cache"][0]), V, r"k_cache must have 4 dims"),
    R("k-dtype", SV, replace("k_cache", lambda a: a["k_cache"].half()), T,
      r"k_cache must have the dtype of q \(BFloat16\), got Half"),
    R("k-device", SV, replace("k_cache", lambda a: other_device(a["k_cache"])), V,
      r"k_cache must be on the device of q"),
    R("k-inner-stride", SV, lambda a: a.update(
        k_cache=inner_strided(a["k_cache"]), v_cache=inner_strided(a["v_cache"])), V,
      r"k_cache must have innermost stride 1"),
    R("k-head-dim", SV, lambda a: a.update(
        k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]), V,
      r"k_cache head dim \(size\(3\)\) must equal D = 64 of q, got 32"),
    R("page-size-zero", SV, lambda a: a.update(
        k_cache=a["k_cache"][:, :, :0], v_cache=a["v_cache"][:, :, :0]), V,
      r"k_cache page size P \(size\(2\) for HND\) must be in \[1, 128\], got 0"),
    R("page-size-129", SV, lambda a: a.update(
        k_cache=a["k_cache"].repeat(1, 1, 9, 1)[:, :, :129],
        v_cache=a["v_cache"].repeat(1, 1, 9, 1)[:, :, :129]), V,
      r"k_cache page size P \(size\(2\) for HND\) must be in \[1, 128\], got 129"),
    R("no-kv-heads", SV, lambda a: a.update(
        k_cache=a["k_cache"][:, :0], v_cache=a["v_cache"][:, :0]), V,
      r"k_cache must have at least one KV head"),
    R("v-shape", SV, replace("v_cache", lambda a: a["v_cache"][:-1]), V,
      r"v_cache must have shape \[7, 2, 16, 64\], got \[6, 2, 16, 64\]"),
    R("v-dtype", SV, replace("v_cache", lambda a: a["v_cache"].half()), T,
      r"v_cache must have the dtype of k_cache"),
    R("v-device", SV, replace("v_cache", lambda a: other_device(a["v_cache"])), V,
      r"v_cache must be on the device of q"),
    R("v-strides", SV, replace("v_cache", lambda a: torch.stack([a["v_cache"]] * 2, 1)[:, 0]), V,
      r"v_cache must have the strides of k_cache"),
    R("table-dtype", SV, replace("block_table", lambda a: a["block_table"].long()), T,
      r"block_table must be int32, got Long"),
    R("table-rank", SV, replace("block_table", lambda a: a["block_table"][0]), V,
      r"block_table must have 2 dims \[B, max_pages\]"),
    R("table-batch", SV, replace("block_table", lambda a: a["block_table"][:1]), V,
      r"block_table.size\(0\) must equal B = 2, got 1"),
    R("table-inner-stride", SV, replace("block_table", lambda a: inner_strided(a["block_table"])),
      V, r"block_table must have innermost stride 1"),
    R("table-device", SV, replace("block_table", lambda a: other_device(a["block_table"])), V,
      r"block_table must be on the device of q"),
    R("lens-dtype", SV, replace("kv_lens", lambda a: a["kv_lens"].long()), T,
      r"kv_lens must be int32, got Long"),
    R("lens-rank", SV, replace("kv_lens", lambda a: a["kv_lens"][None]), V,
      r"kv_lens must have 1 dims \[B\]"),
    R("lens-batch", SV, replace("kv_lens", lambda a: a["kv_lens"][:1]), V,
      r"kv_lens.size\(0\) must equal B = 2, got 1"),
    R("lens-contiguous", SV, replace("kv_lens", lambda a: a["kv_lens"].repeat(2)[::2]), V,
      r"kv_lens must be contiguous"),
    R("lens-device", SV, replace("kv_lens", lambda a: other_device(a["kv_lens"])), V,
      r"kv_lens must be on the device of q"),
    R("lens-too-long", SV, set_value("kv_lens", (0,), 65), I,
      r"kv_lens\[0\] must be in \[q, max_pages \* P\] = \[3, 64\], got 65"),
    R("lens-shorter-than-q", SV, set_value("kv_lens", (1,), 2), I,
      r"kv_lens\[1\] must be in \[q, max_pages \* P\] = \[3, 64\], got 2"),
    R("page-too-large", SV, set_value("block_table", (0, 1), 7), I,
      r"block_table\[0, 1\] must be a page in \[0, num_pages\) = \[0, 7\)"),
    R("page-negative", SV, set_value("block_table", (1, 0), -1), I,
      r"block_table\[1, 0\] must be a page in \[0, num_pages\)"),
    # ---- block lists
    R("ids-dtype", SV, replace("block_ids", lambda a: a["block_ids"].long()), T,
      r"block_ids must be int32, got Long"),
    R("ids-rank", SV, replace("block_ids", lambda a: a["block_ids"][0]), V,
      r"block_ids must have 2 dims \[B, K\] or 3 dims \[B, Hkv, K\]"),
    R("ids-batch", SV, replace("block_ids", lambda a: a["block_ids"][:1]), V,
      r"block_ids.size\(0\) must equal B = 2, got 1"),
    R("ids-lists", SV, lambda a: a.update(
        block_ids=torch.stack([a["block_ids"]] * 3, 1),
        block_counts=torch.stack([a["block_counts"]] * 3, 1)), V,
      r"block_ids.size\(1\) must be 1 or Hkv = 2, got 3"),
    R("ids-inner-stride", SV, replace("block_ids", lambda a: inner_strided(a["block_ids"])), V,
      r"block_ids must have innermost stride 1"),
    R("ids-device", SV, replace("block_ids", lambda a: other_device(a["block_ids"])), V,
      r"block_ids must be on the device of q"),
    R("counts-dtype", SV, replace("block_counts", lambda a: a["block_counts"].long()), T,
      r"block_counts must be int32, got Long"),
    R("counts-shape", SV, replace("block_counts", lambda a: a["block_counts"][:, None]), V,
      r"block_counts must have shape \[2\], got \[2, 1\]"),
    R("counts-shape-per-head", SV, replace("block_ids", lambda a: a["block_ids"][:, None]), V,
      r"block_counts must have shape \[2, 1\], got \[2\]"),
    R("counts-inner-stride", SV, lambda a: a.update(
        block_ids=torch.stack([a["block_ids"]] * 2, 1),
        block_counts=inner_strided(torch.stack([a["block_counts"]] * 2, 1))), V,
      r"block_counts must have innermost stride 1"),
    R("counts-device", SV, replace("block_counts", lambda a: other_device(a["block_counts"])), V,
      r"block_counts must be on the device of q"),
    R("count-past-capacity", SV, set_value("block_counts", (0,), 4), I,
      r"block_counts\[0\] must be in \[0, K\] = \[0, 3\], got 4"),
    R("count-negative", SV, set_value("block_counts", (1,), -1), I,
      r"block_counts\[1\] must be in \[0, K\] = \[0, 3\], got -1"),
    R("id-past-sequence", SV, set_value("block_ids", (1, 1), 2), I,
      r"block_ids\[1, 1\] must be a block in \[0, ceil\(kv_lens\[1\] / P\)\) = \[0, 2\), got 2"),
    R("id-negative", SV, set_value("block_ids", (0, 0), -1), I,
      r"block_ids\[0, 0\] must be a block in"),
    R("ids-not-ascending", SV, set_value("block_ids", (0, 1), 0), V,
      r"block_ids\[0, :block_counts\] must be strictly ascending, got 0 after 0 at position 1"),
    R("ids-per-head-not-ascending", SV, lambda a: a.update(
        block_ids=torch.tensor([[[0, 1, 2], [2, 1, 0]], [[0, 1, -1], [0, 1, -1]]],
                               dtype=torch.int32, device=a["q"].device),
        block_counts=torch.tensor([[3, 3], [2, 2]], dtype=torch.int32, device=a["q"].device)), V,
      r"block_ids\[0, 1, :block_counts\] must be strictly ascending"),
    R("sm-scale", SV, replace("sm_scale", lambda a: math.nan), V, r"sm_scale must be finite, got nan"),
    # ---- sparse_verify_out: outputs and workspace
    R("out-dtype", SVO, replace("out", lambda a: a["out"].half()), T,
      r"out must have the dtype of q \(BFloat16\), got Half"),
    R("out-shape", SVO, replace("out", lambda a: a["out"][:, :2]), V,
      r"out must have shape \[2, 3, 4, 64\], got \[2, 2, 4, 64\]"),
    R("out-contiguous", SVO, replace("out", lambda a: a["out"].transpose(1, 2).contiguous().transpose(1, 2)),
      V, r"out must be contiguous"),
    R("out-device", SVO, replace("out", lambda a: other_device(a["out"])), V,
      r"out must be on the device of q"),
    R("lse-dtype", SVO, replace("lse", lambda a: a["lse"].double()), T,
      r"lse must be float32, got Double"),
    R("lse-shape", SVO, replace("lse", lambda a: a["lse"][0]), V,
      r"lse must have shape \[2, 3, 4\], got \[3, 4\]"),
    R("lse-contiguous", SVO, replace("lse", lambda a: a["lse"].transpose(0, 1).contiguous().transpose(0, 1)),
      V, r"lse must be contiguous"),
    R("lse-device", SVO, replace("lse", lambda a: other_device(a["lse"])), V,
      r"lse must be on the device of q"),
    R("workspace-dtype", SVO, replace("workspace", lambda a: torch.empty(8, device=a["q"].device)),
      T, r"workspace must be uint8, got Float"),
    R("workspace-rank", SVO, replace("workspace", lambda a: torch.empty(
        2, 8, dtype=torch.uint8, device=a["q"].device)), V, r"workspace must have 1 dims \[bytes\]"),
    R("workspace-device", SVO, replace("workspace", lambda a: other_device(
        torch.empty(8, dtype=torch.uint8, device=a["q"].device))), V, r"workspace must be on"),
    R("workspace-bytes-layout", "sparse_verify_workspace_bytes",
      replace("kv_layout", lambda a: "hnd"), V, r'kv_layout must be "NHD" or "HND", got "hnd"'),
    # ---- block_scores
    R("q-srh-rank", BS, replace("q_srh", lambda a: a["q_srh"][0]), V,
      r"q_srh must have 4 dims \[B, n, Hs, D\]"),
    R("q-srh-dtype", BS, replace("q_srh", lambda a: a["q_srh"].to(torch.int8)), T,
      r"q_srh must be bfloat16, float16 or float32, got Char"),
    R("q-srh-inner-stride", BS, replace("q_srh", lambda a: inner_strided(a["q_srh"])), V,
      r"q_srh must have innermost stride 1"),
    R("q-srh-no-queries", BS, replace("q_srh", lambda a: a["q_srh"][:, :0]), V,
      r"q_srh must hold at least one query"),
    R("q-srh-fp32-on-cuda", BS, lambda a: a.update(
        q_srh=a["q_srh"].float(), k_cache=a["k_cache"].float()), NI,
      r"q_srh must be bfloat16 or float16 on CUDA", ("cuda",)),
    R("q-srh-head-dim-on-cuda", BS, lambda a: a.update(
        q_srh=a["q_srh"][..., :32], k_cache=a["k_cache"][..., :32]), NI,
      r"head dim D must be in \{64, 128\} on CUDA, got 32", ("cuda",)),
    R("q-srh-rows-on-cuda", BS, lambda a: a.update(
        q_srh=a["q_srh"].repeat(1, 1, 15, 1)[:, :, :43],
        head_map=torch.zeros(43, dtype=torch.int32, device=a["head_map"].device)),
      NI, r"q_srh must have n \* Hs <= 128 query rows on CUDA", ("cuda",)),
    R("scores-k-dtype", BS, replace("k_cache", lambda a: a["k_cache"].half()), T,
      r"k_cache must have the dtype of q_srh"),
    R("scores-k-device", BS, replace("k_cache", lambda a: other_device(a["k_cache"])), V,
      r"k_cache must be on the device of q_srh"),
    R("scores-kv-layout", BS, replace("kv_layout", lambda a: "HDN"), V,
      r'kv_layout must be "NHD" or "HND", got "HDN"'),
    R("scores-table-device", BS, replace("block_table", lambda a: other_device(a["block_table"])),
      V, r"block_table must be on the device of q_srh"),
    R("scores-lens-device", BS, replace("kv_lens", lambda a: other_device(a["kv_lens"])), V,
      r"kv_lens must be on the device of q_srh"),
    R("head-map-dtype", BS, replace("head_map", lambda a: a["head_map"].long()), T,
      r"head_map must be int32, got Long"),
    R("head-map-shape", BS, replace("head_map", lambda a: a["head_map"][:2]), V,
      r"head_map must have shape \[3\], got \[2\]"),
    R("head-map-contiguous", BS, replace("head_map", lambda a: a["head_map"][:1].expand(3)), V,
      r"head_map must be contiguous"),
    R("head-map-device", BS, replace("head_map", lambda a: other_device(a["head_map"])), V,
      r"head_map must be on the device of q_srh"),
    R("head-map-value", BS, set_value("head_map", (2,), 2), I,
      r"head_map\[2\] must be a KV head in \[0, Hkv\) = \[0, 2\), got 2"),
    R("scores-sm-scale", BS, replace("sm_scale", lambda a: math.inf), V,
      r"sm_scale must be finite, got inf"),
    R("block-size", BS, replace("block_size", lambda a: 0), V,
      r"block_size must be in \[1, 2\^31\), got 0"),
    R("scores-dtype", BS, replace("scores", lambda a: a["scores"].double()), T,
      r"scores must be float32, got Double"),
    R("scores-rank", BS, replace("scores", lambda a: a["scores"][0]), V,
      r"scores must have 2 dims \[B, NB\]"),
    R("scores-batch", BS, replace("scores", lambda a: a["scores"][:1]), V,
      r"scores.size\(0\) must equal B = 2, got 1"),
    R("scores-inner-stride", BS, replace("scores", lambda a: inner_strided(a["scores"])), V,
      r"scores must have innermost stride 1"),
    R("scores-device", BS, replace("scores", lambda a: other_device(a["scores"])), V,
      r"scores must be on the device of q_srh"),
    R("scores-too-few-blocks", BS, replace("scores", lambda a: a["scores"][:, :4]), I,
      r"scores.size\(1\) \(NB\) must be at least ceil\(kv_lens\[0\] / block_size\) = "
      r"ceil\(40 / 8\) = 5, got 4"),
    R("scores-lens-shorter-than-n", BS, set_value("kv_lens", (1,), 2), I,
      r"kv_lens\[1\] must be in \[n, max_pages \* P\] = \[3, 64\], got 2"),
    R("scores-page", BS, set_value("block_table", (1, 1), 99), I,
      r"block_table\[1, 1\] must be a page in \[0, num_pages\) = \[0, 7\)"),
    R("scores-workspace-dtype", BS, replace("workspace", lambda a: torch.empty(
        4, dtype=torch.int32, device=a["q_srh"].device)), T, r"workspace must be uint8, got Int"),
    # ---- select_blocks
    R("draft-dtype", SB, replace("draft_scores", lambda a: a["draft_scores"].to(bf16)), T,
      r"draft_scores must be float32, got BFloat16"),
    R("draft-rank", SB, replace("draft_scores", lambda a: a["draft_scores"][0]), V,
      r"draft_scores must have 2 dims \[B, NB\] or 3 dims \[B, H, NB\]"),
    R("draft-inner-stride", SB, lambda a: a.update(
        draft_scores=inner_strided(a["draft_scores"]), target_scores=None), V,
      r"draft_scores must have innermost stride 1"),
    R("draft-no-blocks", SB, lambda a: a.update(
        draft_scores=a["draft_scores"][:, :0], target_scores=None), V,
      r"draft_scores must have at least one block"),
    R("draft-no-lists", SB, lambda a: a.update(
        draft_scores=torch.empty(2, 0, 10, device=a["kv_lens"].device), target_scores=None), V,
      r"draft_scores must have at least one list"),
    R("target-dtype", SB, replace("target_scores", lambda a: a["target_scores"].double()), T,
      r"target_scores must be float32, got Double"),
    R("target-shape", SB, replace("target_scores", lambda a: a["target_scores"][:, :9]), V,
      r"target_scores must have shape \[2, 10\], got \[2, 9\]"),
    R("target-inner-stride", SB, replace("target_scores", lambda a: inner_strided(a["target_scores"])),
      V, r"target_scores must have innermost stride 1"),
    R("target-device", SB, replace("target_scores", lambda a: other_device(a["target_scores"])), V,
      r"target_scores must be on the device of draft_scores"),
    R("select-lens-dtype", SB, replace("kv_lens", lambda a: a["kv_lens"].long()), T,
      r"kv_lens must be int32, got Long"),
    R("select-lens-shape", SB, replace("kv_lens", lambda a: a["kv_lens"][:1]), V,
      r"kv_lens must have shape \[2\], got \[1\]"),
    R("select-lens-contiguous", SB, replace("kv_lens", lambda a: a["kv_lens"].repeat(2)[::2]), V,
      r"kv_lens must be contiguous"),
    R("select-lens-device", SB, replace("kv_lens", lambda a: other_device(a["kv_lens"])), V,
      r"kv_lens must be on the device of draft_scores"),
    R("q-len", SB, replace("q_len", lambda a: 0), V, r"q_len must be in \[1, 2\^31\), got 0"),
    R("select-block-size", SB, replace("block_size", lambda a: 0), V,
      r"block_size must be in \[1, 2\^31\), got 0"),
    R("budget", SB, replace("budget_blocks", lambda a: -1), V,
      r"budget_blocks must be in \[0, 2\^31\), got -1"),
    R("n-sink", SB, replace("n_sink", lambda a: -1), V, r"n_sink must be in \[0, 2\^31\), got -1"),
    R("n-recent", SB, replace("n_recent", lambda a: -2), V,
      r"n_recent must be in \[0, 2\^31\), got -2"),
    R("n-sink-overflow", SB, replace("n_sink", lambda a: 2**31 - 1), V,
      r"n_sink \+ block_size must be below 2\^31"),
    R("n-recent-overflow", SB, replace("n_recent", lambda a: 2**31 - 8), V,
      r"n_recent \+ q_len \+ block_size must be below 2\^31"),
    R("draft-share", SB, replace("draft_share", lambda a: 1.5), V,
      r"draft_share must be in \[0, 1\], got 1.5"),
    R("draft-share-nan", SB, replace("draft_share", lambda a: math.nan), V,
      r"draft_share must be in \[0, 1\], got nan"),
    R("select-lens-short", SB, set_value("kv_lens", (1,), 2), I,
      r"kv_lens\[1\] must be in \[q_len, NB \* block_size\] = \[3, 80\], got 2"),
    R("select-lens-long", SB, set_value("kv_lens", (0,), 81), I,
      r"kv_lens\[0\] must be in \[q_len, NB \* block_size\] = \[3, 80\], got 81"),
    R("ids-out-dtype", SBO, replace("block_ids", lambda a: a["block_ids"].long()), T,
      r"block_ids must be int32, got Long"),
    R("ids-out-shape", SBO, replace("block_ids", lambda a: a["block_ids"][:, :3]), V,
      r"block_ids must have shape \[2, 4\], got \[2, 3\]"),
    R("ids-out-contiguous", SBO, replace("block_ids", lambda a: a["block_ids"].t().contiguous().t()),
      V, r"block_ids must be contiguous"),
    R("ids-out-device", SBO, replace("block_ids", lambda a: other_device(a["block_ids"])), V,
      r"block_ids must be on the device of draft_scores"),
    R("counts-out-dtype", SBO, replace("block_counts", lambda a: a["block_counts"].long()), T,
      r"block_counts must be int32, got Long"),
    R("counts-out-shape", SBO, replace("block_counts", lambda a: a["block_counts"][:, None]), V,
      r"block_counts must have shape \[2\], got \[2, 1\]"),
    R("counts-out-contiguous", SBO, replace("block_counts", lambda a: a["block_counts"].repeat(2)[::2]),
      V, r"block_counts must be contiguous"),
    R("counts-out-device", SBO, replace("block_counts", lambda a: other_device(a["block_counts"])),
      V, r"block_counts must be on the device of draft_scores"),
    # ---- store_kv
    R("store-kv-layout", SKV, replace("kv_layout", lambda a: "NDH"), V,
      r'kv_layout must be "NHD" or "HND", got "NDH"'),
    R("store-layout-mismatch", SKV, replace("kv_layout", lambda a: "NHD"), V,
      r"k.size\(1\) must equal Hkv of k_cache = 16, got 2"),
    R("store-k-cache-rank", SKV, lambda a: a.update(
        k_cache=a["k_cache"][0], v_cache=a["v_cache"][0]), V,
      r"k_cache must have 4 dims \[num_pages, Hkv, P, D\] \(HND\), got shape \[2, 16, 64\]"),
    R("store-k-cache-dtype", SKV, lambda a: a.update(
        k_cache=a["k_cache"].to(torch.int16), v_cache=a["v_cache"].to(torch.int16)), T,
      r"k_cache must be bfloat16, float16 or float32, got Short"),
    R("store-k-cache-inner-stride", SKV, lambda a: a.update(
        k_cache=inner_strided(a["k_cache"]), v_cache=inner_strided(a["v_cache"])), V,
      r"k_cache must have innermost stride 1"),
    R("store-page-size-zero", SKV, lambda a: a.update(
        k_cache=a["k_cache"][:, :, :0], v_cache=a["v_cache"][:, :, :0]), V,
      r"k_cache page size P \(size\(2\) for HND\) must be in \[1, 128\], got 0"),
    R("store-page-size-129", SKV, lambda a: a.update(
        k_cache=a["k_cache"].repeat(1, 1, 9, 1)[:, :, :129],
        v_cache=a["v_cache"].repeat(1, 1, 9, 1)[:, :, :129]), V,
      r"k_cache page size P \(size\(2\) for HND\) must be in \[1, 128\], got 129"),
    R("store-no-kv-heads", SKV, lambda a: a.update(
        k_cache=a["k_cache"][:, :0], v_cache=a["v_cache"][:, :0]), V,
      r"k_cache must have at least one KV head \(size\(1\) for HND\), got 0"),
    R("store-v-cache-shape", SKV, replace("v_cache", lambda a: a["v_cache"][:-1]), V,
      r"v_cache must have shape \[7, 2, 16, 64\], got \[6, 2, 16, 64\]"),
    R("store-v-cache-dtype", SKV, replace("v_cache", lambda a: a["v_cache"].half()), T,
      r"v_cache must have the dtype of k_cache \(BFloat16\), got Half"),
    R("store-v-cache-device", SKV, replace("v_cache", lambda a: other_device(a["v_cache"])), V,
      r"v_cache must be on the device of k_cache"),
    R("store-v-cache-strides", SKV, replace("v_cache", lambda a: a["v_cache"].contiguous()), V,
      r"v_cache must have the strides of k_cache \[4096, 1024, 64, 1\], got \[2048, 1024, 64, 1\]"),
    R("store-k-rank", SKV, replace("k", lambda a: a["k"][0]), V,
      r"k must have 3 dims \[N, Hkv, D\], got shape \[2, 64\]"),
    R("store-k-dtype", SKV, replace("k", lambda a: a["k"].float()), T,
      r"k must have the dtype of k_cache \(BFloat16\), got Float"),
    R("store-k-device", SKV, replace("k", lambda a: other_device(a["k"])), V,
      r"k must be on the device of k_cache"),
    R("store-k-inner-stride", SKV, replace("k", lambda a: inner_strided(a["k"])), V,
      r"k must have innermost stride 1"),
    R("store-k-heads", SKV, lambda a: a.update(k=a["k"][:, :1], v=a["v"][:, :1]), V,
      r"k.size\(1\) must equal Hkv of k_cache = 2, got 1"),
    R("store-k-head-dim", SKV, lambda a: a.update(k=a["k"][..., :32], v=a["v"][..., :32]), V,
      r"k.size\(2\) must equal D of k_cache = 64, got 32"),
    R("store-v-shape", SKV, replace("v", lambda a: a["v"][:4]), V,
      r"v must have shape \[5, 2, 64\], got \[4, 2, 64\]"),
    R("store-v-dtype", SKV, replace("v", lambda a: a["v"].half()), T,
      r"v must have the dtype of k_cache \(BFloat16\), got Half"),
    R("store-v-device", SKV, replace("v", lambda a: other_device(a["v"])), V,
      r"v must be on the device of k_cache"),
    R("store-v-inner-stride", SKV, replace("v", lambda a: inner_strided(a["v"])), V,
      r"v must have innermost stride 1"),
    R("store-pages-dtype", SKV, lambda a: a.update(
        pages=a["pages"].float(), slots=a["slots"].float()), T,
      r"pages must be int64 or int32, got Float"),
    R("store-pages-shape", SKV, replace("pages", lambda a: a["pages"][:4]), V,
      r"pages must have shape \[5\], got \[4\]"),
    R("store-pages-device", SKV, replace("pages", lambda a: other_device(a["pages"])), V,
      r"pages must be on the device of k_cache"),
    R("store-slots-dtype", SKV, replace("slots", lambda a: a["slots"].int()), T,
      r"slots must have the dtype of pages \(Long\), got Int"),
    R("store-slots-shape", SKV, replace("slots", lambda a: a["slots"][None]), V,
      r"slots must have shape \[5\], got \[1, 5\]"),
    R("store-slots-device", SKV, replace("slots", lambda a: other_device(a["slots"])), V,
      r"slots must be on the device of k_cache"),
    R("store-page-too-large", SKV, set_value("pages", (2,), 7), I,
      r"pages\[2\] must be a page in \[0, num_pages\) = \[0, 7\), got 7"),
    R("store-page-negative", SKV, set_value("pages", (0,), -1), I,
      r"pages\[0\] must be a page in \[0, num_pages\) = \[0, 7\), got -1"),
    R("store-slot-too-large", SKV, set_value("slots", (4,), 16), I,
      r"slots\[4\] must be a slot in \[0, P\) = \[0, 16\), got 16"),
    R("store-slot-negative", SKV, set_value("slots", (1,), -2), I,
      r"slots\[1\] must be a slot in \[0, P\) = \[0, 16\), got -2"),
    R("store-int32-slot-too-large", SKV, lambda a: a.update(
        pages=a["pages"].int(), slots=torch.full_like(a["slots"], 16).int()), I,
      r"slots\[0\] must be a slot in \[0, P\) = \[0, 16\), got 16"),
]
# fmt: on


def rows_for(device: str):
    marks = [pytest.mark.cuda] if device == "cuda" else []
    return [
        pytest.param(row, id=f"{device}-{row.id}", marks=marks)
        for row in ROWS
        if device in row.devices
    ]


def check_row(row: Row, device: str) -> None:
    args = ARGS[row.op](device)
    run_op(row.op, ARGS[row.op](device))  # the unbroken arguments pass
    row.mutate(args)
    with pytest.raises(row.error, match=rf"^dustin\.{row.op}: {row.match}"):
        run_op(row.op, args)


@pytest.mark.parametrize("row", rows_for("cpu"))
def test_cpu(row: Row) -> None:
    check_row(row, "cpu")


@pytest.mark.parametrize("row", rows_for("cuda"))
def test_cuda(row: Row) -> None:
    check_row(row, "cuda")


def test_row_ids_are_unique():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))
