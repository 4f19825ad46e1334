# SPDX-License-Identifier: Apache-2.0
"""sparse_verify on CUDA, dense (every block listed) and sparse (token budgets), with its peers.

One run covers contexts x batches x query lengths x attention shapes x page sizes for Dustin's
kernel, and the peers at the issue's comparison points (by default B=16, 32k): PyTorch SDPA on a
contiguous KV (best backend), FlexAttention dense and block-sparse over the same selected blocks,
"gather with index_select, then SDPA", and FlashInfer's paged batch prefill (FA2 and, on
Hopper, FA3) over every block or the same selected blocks, where FlashInfer is installed. Times
are medians of CUDA-graph replays (and eager); bandwidth counts the KV bytes each variant must
read (selected blocks plus the window's blocks for sparse, the whole causal context for dense)
plus q and out once. Back-to-back timed calls rotate through input sets spanning 256 MiB (the
`rotated_mb` column; less only where 8 GB of cache copies or 256 sets do not span it), every
peer alike, so no call reads KV the previous calls left in L2 (`--warm-l2`: one set, as runs
before 2026-12-07 measured).

    python bench/bench_sparse_verify.py                 # the issue's full grid and peers
    python bench/bench_sparse_verify.py --quick         # a small subset, for a first look
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dustin  # noqa: F401  (registers torch.ops.dustin)
from dustin import ops

from bench import flashinfer_peer
from bench.common import (
    L2_ROTATE_BYTES,
    Report,
    ceiling_note,
    pct_of_ceiling,
    read_ceiling_tbps,
    rotating,
    tbps,
    time_cuda,
)


@dataclass(frozen=True)
class Shape:
    name: str
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int = 128


SHAPES = {
    "qwen2.5-coder-1.5b": Shape("qwen2.5-coder-1.5b", 12, 2),
    "qwen2.5-7b": Shape("qwen2.5-7b", 28, 4),
    "qwen2.5-72b": Shape("qwen2.5-72b", 64, 8),
    # The draft of the 7B pair: its q = 1 windows over the streaming window's ~33 blocks.
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", 14, 2, head_dim=64),
}
TARGET_SHAPES = ["qwen2.5-coder-1.5b", "qwen2.5-7b", "qwen2.5-72b"]
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element
# Copies of a small cache made for the L2 rotation stay under this many bytes of K and V.
POOL_LIMIT_BYTES = 8 << 30
# Most input sets one timed call rotates through.
MAX_SETS = 256


def cache_copies(copy_bytes: int, rotate_bytes: int) -> int:
    """Copies of a cache of `copy_bytes` (K and V) that one rotation of `rotate_bytes` needs:
    enough to span it, as many as POOL_LIMIT_BYTES holds and MAX_SETS sets read, at least one."""
    return max(1, min(-(-rotate_bytes // copy_bytes), POOL_LIMIT_BYTES // copy_bytes, MAX_SETS))


def input_sets(set_bytes: int, copies: int, rotate_bytes: int) -> int:
    """Input sets of `set_bytes` read per call that one rotation cycles through: enough to span
    `rotate_bytes` (at most MAX_SETS), and one per cache copy at least."""
    return max(copies, min(MAX_SETS, -(-rotate_bytes // set_bytes)))


@dataclass(frozen=True)
class Lists:
    """The inputs of one call: a block table and the block lists over it."""

    table: torch.Tensor  # [B, blocks]
    ids: torch.Tensor  # [B, K]
    counts: torch.Tensor  # [B]


class PagedCase:
    """B sequences of `context` tokens in a paged HND cache with shuffled pages.

    Timed calls rotate through input sets spanning `rotate_bytes` (0: a single set, which stays
    in L2 where it fits): a cache smaller than that is held in several copies (disjoint pages,
    each its own block table; at most POOL_LIMIT_BYTES in all), and sparse lists are drawn
    afresh for every set."""

    def __init__(
        self,
        shape: Shape,
        batch: int,
        context: int,
        page: int,
        gen: torch.Generator,
        rotate_bytes: int,
    ):
        self.shape, self.batch, self.context, self.page = shape, batch, context, page
        self.blocks = math.ceil(context / page)
        self.rotate_bytes = rotate_bytes
        copy_bytes = self.kv_bytes(self.blocks * page)
        self.copies = cache_copies(copy_bytes, rotate_bytes)
        num_pages = self.copies * batch * self.blocks
        dims = (num_pages, shape.num_kv_heads, page, shape.head_dim)
        self.k = torch.randn(dims, device="cuda", dtype=DTYPE)
        self.v = torch.randn(dims, device="cuda", dtype=DTYPE)
        perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
        self.tables = list(perm.view(self.copies, batch, self.blocks).unbind(0))
        self.kv_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.gen = gen

    def lists(self, budget: int | None, q_len: int) -> tuple[list[Lists], int]:
        """The input sets of one timed call, and the tokens each attends per sequence: every
        block (budget None), else budget // P random blocks before the window (the kernel adds
        the window's blocks)."""
        first_window = (self.context - q_len) // self.page
        window_tokens = self.context - first_window * self.page
        if budget is None:
            ids, counts = ops.dense_block_lists(self.kv_lens, self.page, self.blocks)
            return [Lists(table, ids, counts) for table in self.tables], self.context
        n = min(max(budget // self.page, 1), first_window)
        tokens = n * self.page + window_tokens
        sets = input_sets(self.kv_bytes(tokens), self.copies, self.rotate_bytes)
        counts = torch.full((self.batch,), n, dtype=torch.int32, device="cuda")
        drawn = []
        for i in range(sets):
            scores = torch.rand(self.batch, first_window, device="cuda", generator=self.gen)
            ids = scores.topk(n, dim=1).indices.sort(dim=1).values.to(torch.int32).contiguous()
            drawn.append(Lists(self.tables[i % self.copies], ids, counts))
        return drawn, tokens

    def rotated_mb(self, num_sets: int, tokens: int) -> float:
        """MB of KV one rotation of `num_sets` calls of `tokens` each reads (the pool bounds it)."""
        pool = self.copies * self.kv_bytes(self.blocks * self.page)
        return min(num_sets * self.kv_bytes(tokens), pool) / 1e6

    def kv_bytes(self, tokens: int) -> int:
        s = self.shape
        return 2 * self.batch * s.num_kv_heads * tokens * s.head_dim * ELEM

    def dense_kv(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the sequences of `table` as contiguous [B, Hkv, L, D] (what dense peers read)."""

        def gather(cache):
            x = cache[table.long()]  # [B, blocks, Hkv, P, D]
            x = x.permute(0, 2, 1, 3, 4).reshape(
                self.batch, self.shape.num_kv_heads, -1, self.shape.head_dim
            )
            return x[:, :, : self.context].contiguous()

        return gather(self.k), gather(self.v)


def timing_columns(t, nbytes: int, rotated_mb: float) -> dict:
    """Graph and eager times, the bandwidth on `nbytes` and the rotation's span, as report
    columns."""
    return {
        "graph_us": t.graph_us,
        "eager_us": t.eager_us,
        "tbps": tbps(nbytes, t.best_us),
        "pct_ceiling": pct_of_ceiling(nbytes, t.best_us),
        "rotated_mb": rotated_mb,
    }


def row_best_us(row: dict) -> float:
    """A row's graph time, or its eager time where the call could not be captured (as
    Timing.best_us)."""
    return row["graph_us"] if row["graph_us"] is not None else row["eager_us"]


def split_bytes(q: torch.Tensor) -> int:
    """Workspace of one split: fp32 partial output and lse of every output row."""
    batch, q_len, heads, head_dim = q.shape
    return batch * q_len * heads * (head_dim + 1) * 4


def planned_workspace_bytes(case: PagedCase, q: torch.Tensor, lists: Lists) -> int:
    """Workspace the kernel's planner asks for: its split count times `split_bytes`."""
    return ops.sparse_verify_workspace_bytes(q, case.k, lists.table, lists.ids, "HND")


def planned_splits(case: PagedCase, q: torch.Tensor, lists: Lists) -> int:
    """The split count the kernel's planner picks (read back from the workspace it asks for)."""
    return max(planned_workspace_bytes(case, q, lists) // split_bytes(q), 1)


def dustin_fn(case: PagedCase, q: torch.Tensor, sets: list[Lists], splits: int | None = None):
    """The out-variant call, each call on the next input set; `splits` caps the split count
    through the workspace it is given (the kernel splits only as far as its workspace allows),
    None leaves the planner's choice (the same for every set: they differ only in ids)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="cuda")
    if splits is None:
        nbytes = planned_workspace_bytes(case, q, sets[0])
    else:
        nbytes = splits * split_bytes(q) if splits > 1 else 0
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    scale = case.shape.head_dim**-0.5
    op = torch.ops.dustin.sparse_verify_out
    return rotating(
        [
            functools.partial(
                op,
                q,
                case.k,
                case.v,
                s.table,
                case.kv_lens,
                s.ids,
                s.counts,
                scale,
                "HND",
                out,
                lse,
                workspace,
            )
            for s in sets
        ]
    )


def sdpa_best(q, dense: list[tuple[torch.Tensor, torch.Tensor]], q_len: int, kv_len: int):
    """Fastest SDPA backend (graph time) on [B, Hq, q, D] x [B, Hkv, L, D] (calls rotating
    through the copies in `dense`), causal with the queries at the end, as a lower-right causal
    bias or as an explicit bool mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    qpos = kv_len - q_len + torch.arange(q_len, device="cuda")
    bool_mask = torch.arange(kv_len, device="cuda")[None, :] <= qpos[:, None]  # [q, L]
    masks = {"lower-right bias": causal_lower_right(q_len, kv_len), "bool mask": bool_mask}
    best = (None, "none")
    for backend in (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ):
        for mask_name, mask in masks.items():

            def call(k, v, backend=backend, mask=mask):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

            fn = rotating([functools.partial(call, k, v) for k, v in dense])
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001  (backend or mask form unsupported here)
                print(f"  sdpa {backend.name.lower()} with {mask_name}: {type(exc).__name__}")
                continue
            t = time_cuda(fn)
            if best[0] is None or t.best_us < best[0].best_us:
                best = (t, f"{backend.name.lower()}, {mask_name}")
    return best


def bench_dustin(report: Report, args, gen: torch.Generator) -> dict:
    """Dustin's kernel over the grid; returns {(shape, B, ctx, q, P, mode): graph us}."""
    times = {}
    deadline = time.time() + args.time_budget if args.time_budget else math.inf
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for context in args.contexts:
            for batch in args.batches:
                for page in args.pages:
                    if time.time() > deadline:
                        report.notes.append(
                            f"time budget spent: skipped {shape_name} ctx={context} B={batch} P={page}"
                        )
                        continue
                    case = PagedCase(shape, batch, context, page, gen, args.rotate_bytes)
                    for q_len in args.q:
                        q = torch.randn(
                            batch,
                            q_len,
                            shape.num_qo_heads,
                            shape.head_dim,
                            device="cuda",
                            dtype=DTYPE,
                        )
                        for budget in [None, *args.budgets]:
                            sets, tokens = case.lists(budget, q_len)
                            t = time_cuda(dustin_fn(case, q, sets), reps=args.reps)
                            nbytes = case.kv_bytes(tokens) + 2 * q.numel() * ELEM
                            mode = "dense" if budget is None else f"sparse-{budget}"
                            times[(shape_name, batch, context, q_len, page, mode)] = t.best_us
                            report.add(
                                variant="dustin",
                                shape=shape_name,
                                B=batch,
                                ctx=context,
                                q=q_len,
                                P=page,
                                mode=mode,
                                splits=planned_splits(case, q, sets[0]),
                                **timing_columns(t, nbytes, case.rotated_mb(len(sets), tokens)),
                            )
                            print(
                                f"dustin {shape_name} B={batch} ctx={context} q={q_len} "
                                f"P={page} {mode}: {t.best_us:.1f} us "
                                f"({tbps(nbytes, t.best_us):.2f} TB/s)",
                                flush=True,
                            )
                    del case
                    torch.cuda.empty_cache()
    return times


def bench_split_sweep(report: Report, args, gen: torch.Generator) -> None:
    """The planner's split count against smaller ones at the headline points (B=16, 32k,
    q in --sweep-q, P=16): shows what its splitting buys, and (8 splits and fewer of 16-row
    CTAs merge in a cluster on Hopper) what the merge launch of more costs. A workspace only caps the split count, so counts
    above the planner's cannot be forced and are not listed (sweep rows above the planner's
    count in results up to sparse_verify-20261129-211803 ran the planner's count)."""
    for shape_name in args.sweep_shapes:
        shape = SHAPES[shape_name]
        case = PagedCase(shape, 16, 32768, 16, gen, args.rotate_bytes)
        for q_len, budget in itertools.product(args.sweep_q, (None, 512)):
            q = torch.randn(
                16, q_len, shape.num_qo_heads, shape.head_dim, device="cuda", dtype=DTYPE
            )
            sets, tokens = case.lists(budget, q_len)
            nbytes = case.kv_bytes(tokens) + 2 * q.numel() * ELEM
            chosen = planned_splits(case, q, sets[0])
            mode = "dense" if budget is None else f"sparse-{budget}"
            for splits in sorted(s for s in {1, 2, 3, 4, 8, chosen} if s <= chosen):
                t = time_cuda(dustin_fn(case, q, sets, splits), reps=args.reps)
                label = f"{splits}" + (" (planner)" if splits == chosen else "")
                report.add(
                    variant="dustin-splits",
                    shape=shape_name,
                    B=16,
                    ctx=32768,
                    q=q_len,
                    P=16,
                    mode=mode,
                    splits=label,
                    **timing_columns(t, nbytes, case.rotated_mb(len(sets), tokens)),
                )
                print(
                    f"split sweep {shape_name} q={q_len} {mode} splits={label}: {t.best_us:.1f} us"
                )
        del case
        torch.cuda.empty_cache()


def add_peer_row(
    report: Report,
    ours: dict,
    point: tuple,
    variant: str,
    mode: str,
    t,
    nbytes: int,
    rotated_mb: float,
    backend: str = "",
) -> None:
    """One peer row, with its time over Dustin's at the same point (the speedup)."""
    shape_name, batch, context, q_len, page = point
    mine = ours.get((*point, mode))
    report.add(
        variant=variant,
        shape=shape_name,
        B=batch,
        ctx=context,
        q=q_len,
        P=page,
        mode=mode,
        **timing_columns(t, nbytes, rotated_mb),
        dustin_speedup=t.best_us / mine if mine else None,
        backend=backend,
    )
    print(f"{variant} {shape_name} q={q_len} {mode} [{backend}]: {t.best_us:.1f} us", flush=True)


def bench_peers(report: Report, args, gen: torch.Generator, ours: dict) -> None:
    """Peers at B = args.peer_batch, context args.peer_context, page 16 lists, on the same
    rotation of input sets as Dustin's calls."""
    page, batch, context = args.peer_page, args.peer_batch, args.peer_context
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        case = PagedCase(shape, batch, context, page, gen, args.rotate_bytes)
        dense = [case.dense_kv(table) for table in case.tables]
        dense_mb = case.rotated_mb(len(dense), context)  # dense calls rotate over the copies
        for q_len in args.peer_q:
            q = torch.randn(
                batch, q_len, shape.num_qo_heads, shape.head_dim, device="cuda", dtype=DTYPE
            )
            q_bhsd = q.transpose(1, 2)
            dense_bytes = case.kv_bytes(context) + 2 * q.numel() * ELEM

            add = functools.partial(
                add_peer_row, report, ours, (shape_name, batch, context, q_len, page)
            )

            t, backend = sdpa_best(q_bhsd, dense, q_len, context)
            if t is not None:
                add("sdpa", "dense", t, dense_bytes, dense_mb, backend)
            if args.flex and shape_name in args.flex_shapes and q_len in args.flex_q:
                bench_flex(case, q_bhsd, dense, q_len, add, dense_bytes, dense_mb, args)
            if args.flashinfer:
                bench_flashinfer(case, q, None, add, "dense", dense_bytes, dense_mb)
            for budget in args.budgets:
                sets, tokens = case.lists(budget, q_len)
                nbytes = case.kv_bytes(tokens) + 2 * q.numel() * ELEM
                rotated_mb = case.rotated_mb(len(sets), tokens)
                t = bench_gather_sdpa(case, q_bhsd, sets, q_len)
                if t is not None:
                    add("gather+sdpa", f"sparse-{budget}", t, nbytes, rotated_mb, "efficient")
                if args.flashinfer:
                    bench_flashinfer(case, q, sets, add, f"sparse-{budget}", nbytes, rotated_mb)
        del case, dense
        torch.cuda.empty_cache()


def bench_flashinfer(case: PagedCase, q, sets, add, mode: str, nbytes: int, rotated_mb) -> None:
    """FlashInfer's batch prefill over the same paged cache, every block (sets None: one plan
    per cache copy) or the listed blocks plus the window's (one plan per input set;
    bench/flashinfer_peer.py), on each of its backends; the first plan is checked against a
    float32 reference before they are timed."""
    workspace = flashinfer_peer.new_workspace(q.device)  # shared: the calls run one after another
    if sets is None:
        inputs = [(table, None, None) for table in case.tables]
    else:
        inputs = [(s.table, s.ids, s.counts) for s in sets]
    for backend in flashinfer_peer.backends():
        try:
            plans = [
                flashinfer_peer.Verification(
                    q,
                    case.k,
                    case.v,
                    table,
                    case.kv_lens,
                    ids,
                    counts,
                    backend=backend,
                    workspace=workspace,
                )
                for table, ids, counts in inputs
            ]
            plans[0].check()
            add(
                f"flashinfer-{backend}",
                mode,
                time_cuda(rotating(plans)),
                nbytes,
                rotated_mb,
                backend,
            )
            del plans
        except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
            print(
                f"  flashinfer {backend} {mode} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}"
            )


def gather_sdpa_call(case: PagedCase, q_bhsd, lists: Lists, q_len: int):
    """index_select one set's selected blocks' tokens (plus the window's blocks), then SDPA."""
    page = case.page
    first_window = (case.context - q_len) // page
    window = torch.arange(first_window, case.blocks, device="cuda", dtype=torch.int32)
    blocks = torch.cat([lists.ids, window.expand(case.batch, -1)], dim=1).long()  # [B, nb]
    pages = torch.gather(lists.table.long(), 1, blocks)  # [B, nb]
    pos = (blocks[:, :, None] * page + torch.arange(page, device="cuda")).flatten(1)  # [B, n]
    qpos = case.context - q_len + torch.arange(q_len, device="cuda")
    mask = pos[:, None, None, :] <= qpos[None, None, :, None]  # [B, 1, q, n]

    def fn():
        k = case.k.index_select(0, pages.flatten())  # [B * nb, Hkv, P, D]
        v = case.v.index_select(0, pages.flatten())
        shp = (case.batch, -1, case.shape.num_kv_heads, page, case.shape.head_dim)
        k = k.view(shp).permute(0, 2, 1, 3, 4).flatten(2, 3)
        v = v.view(shp).permute(0, 2, 1, 3, 4).flatten(2, 3)
        return F.scaled_dot_product_attention(q_bhsd, k, v, attn_mask=mask, enable_gqa=True)

    return fn


def bench_gather_sdpa(case: PagedCase, q_bhsd, sets: list[Lists], q_len: int):
    """Gather-then-SDPA over the rotation of input sets."""
    fn = rotating([gather_sdpa_call(case, q_bhsd, s, q_len) for s in sets])
    try:
        fn()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
        print(f"  gather+sdpa failed: {str(exc).splitlines()[0][:120]}")
        return None
    return time_cuda(fn)


def selected_blocks_mod(selected: torch.Tensor, page: int, offset: int):
    """FlexAttention mask_mod: listed (or window) blocks, causal from position `offset`."""

    def mod(b, h, q_idx, kv_idx):
        return selected[b, kv_idx // page] & (kv_idx <= q_idx + offset)

    return mod


def bench_flex(case, q_bhsd, dense, q_len, add, dense_bytes, dense_mb, args) -> None:
    """FlexAttention dense (causal, lower right) and block-sparse with the same lists, over the
    dense copies of the case's caches (the i-th set reads copy i mod copies, as for Dustin)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return
    flex = torch.compile(flex_attention, dynamic=False)
    context, page = case.context, case.page
    offset = context - q_len
    q_bytes = 2 * q_bhsd.numel() * ELEM

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    try:
        dense_mask = create_block_mask(causal, None, None, q_len, context, device="cuda")
        fn = rotating(
            [
                functools.partial(flex, q_bhsd, k, v, block_mask=dense_mask, enable_gqa=True)
                for k, v in dense
            ]
        )
        fn()
        add("flex", "dense", time_cuda(fn), dense_bytes, dense_mb, "flex")
        for budget in args.flex_budgets:
            sets, tokens = case.lists(budget, q_len)
            calls = []
            for i, lists in enumerate(sets):
                selected = torch.zeros(case.batch, case.blocks, dtype=torch.bool, device="cuda")
                selected.scatter_(1, lists.ids.long(), True)
                selected[:, offset // page :] = True
                mask = create_block_mask(
                    selected_blocks_mod(selected, page, offset),
                    case.batch,
                    None,
                    q_len,
                    context,
                    device="cuda",
                )
                k, v = dense[i % len(dense)]
                calls.append(
                    functools.partial(flex, q_bhsd, k, v, block_mask=mask, enable_gqa=True)
                )
            fn = rotating(calls)
            fn()
            add(
                "flex",
                f"sparse-{budget}",
                time_cuda(fn),
                case.kv_bytes(tokens) + q_bytes,
                case.rotated_mb(len(sets), tokens),
                "flex block-sparse",
            )
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
        print(f"  flex failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")


def summarize(report: Report, ours: dict, args) -> None:
    """Notes on the issue's targets, from this run's numbers."""

    def pct(row):
        return row["pct_ceiling"]

    rows = [r for r in report.rows if r["variant"] == "dustin"]
    dense32 = [r for r in rows if r["mode"] == "dense" and r["ctx"] == 32768 and 2 <= r["q"] <= 8]
    if dense32:
        worst = min(dense32, key=pct)
        report.notes.append(
            f"dense q=2..8 at 32k: worst {pct(worst):.0f}% of {read_ceiling_tbps():.2f} TB/s "
            f"({worst['shape']} B={worst['B']} q={worst['q']} P={worst['P']}); target 85%"
        )
    big = [
        r
        for r in rows
        if r["mode"].startswith("sparse")
        and int(r["mode"].split("-")[1]) >= 2048
        and r["B"] * SHAPES[r["shape"]].num_kv_heads >= 64
    ]
    if big:
        worst = min(big, key=pct)
        report.notes.append(
            f"sparse >= 2048 tokens, B*Hkv >= 64: worst {pct(worst):.0f}% "
            f"({worst['shape']} B={worst['B']} ctx={worst['ctx']} q={worst['q']} P={worst['P']}); "
            "target 85%"
        )

    def best_peer(point: tuple, mode: str) -> str:
        """', Nx <peer>' for the fastest peer row at this point and mode, if any ran."""
        peers = [
            p
            for p in report.rows
            if not p["variant"].startswith("dustin")
            and p["mode"] == mode
            and (p["shape"], p["B"], p["ctx"], p["q"], p["P"]) == point
        ]
        if not peers:
            return ""
        best = min(peers, key=row_best_us)
        return f", {row_best_us(best) / ours[(*point, 'sparse-512')]:.1f}x {best['variant']} {mode}"

    for r in rows:
        if (r["shape"], r["B"], r["ctx"], r["mode"]) == ("qwen2.5-72b", 16, 32768, "sparse-512"):
            point = ("qwen2.5-72b", 16, 32768, r["q"], r["P"])
            dense = ours.get((*point, "dense"))
            ratio = f", {dense / r['graph_us']:.0f}x own dense" if dense and r["graph_us"] else ""
            report.notes.append(
                f"72B B=16 32k budget 512 q={r['q']} P={r['P']}: {r['graph_us']:.1f} us graph "
                f"({r['eager_us']:.1f} eager){ratio}{best_peer(point, 'sparse-512')}"
                f"{best_peer(point, 'dense')}; target <= 12 us, >= 40x own dense, >= 10x the best "
                "sparse peer, >= 150x the best dense peer"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of the grid")
    parser.add_argument("--shapes", nargs="+", default=TARGET_SHAPES, choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 64])
    parser.add_argument("--q", nargs="+", type=int, default=[2, 4, 5, 8])
    parser.add_argument("--pages", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--budgets", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--peer-batch", type=int, default=16)
    parser.add_argument("--peer-context", type=int, default=32768)
    parser.add_argument("--peer-page", type=int, default=16)
    parser.add_argument("--peer-q", nargs="+", type=int, default=[2, 5, 8])
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument(
        "--no-flashinfer",
        dest="flashinfer",
        action="store_false",
        help="skip FlashInfer (a peer only where it is installed)",
    )
    # FlexAttention compiles per shape (tens of seconds each): by default the headline point.
    parser.add_argument("--flex-shapes", nargs="+", default=["qwen2.5-72b"], choices=list(SHAPES))
    parser.add_argument("--flex-q", nargs="+", type=int, default=[5])
    parser.add_argument("--flex-budgets", nargs="+", type=int, default=[512])
    parser.add_argument(
        "--sweep-shapes",
        nargs="*",
        default=TARGET_SHAPES,
        choices=list(SHAPES),
        help="shapes of the split-count sweep (none: skip it)",
    )
    parser.add_argument(
        "--sweep-q", nargs="+", type=int, default=[5], help="window lengths of the split sweep"
    )
    parser.add_argument(
        "--warm-l2",
        dest="rotate_bytes",
        action="store_const",
        const=0,
        default=L2_ROTATE_BYTES,
        help="time every call on one input set (what stays in L2 is read from there)",
    )
    parser.add_argument("--tag", default="")
    parser.add_argument("--commit", default=None, help="commit measured, noted in the results")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds for Dustin's grid (then skip)"
    )
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.batches, args.q = [32768], [1, 16, 64], [2, 5, 8]
        args.peer_q, args.flex = [5], False

    gen = torch.Generator(device="cuda").manual_seed(0)
    report = Report(
        name="sparse_verify",
        columns=[
            "variant",
            "shape",
            "B",
            "ctx",
            "q",
            "P",
            "mode",
            "splits",
            "graph_us",
            "eager_us",
            "tbps",
            "pct_ceiling",
            "rotated_mb",
            "dustin_speedup",
            "backend",
        ],
    )
    if args.commit:
        report.notes.append(f"commit {args.commit} (given on the command line)")
    if args.peers and args.flashinfer:
        args.flashinfer, why = flashinfer_peer.available()
        report.notes.append(f"FlashInfer peer: {why}")
    start = time.time()
    bench_split_sweep(report, args, gen)
    ours = bench_dustin(report, args, gen)
    if args.peers:
        bench_peers(report, args, gen, ours)
    summarize(report, ours, args)
    report.notes.append(f"bf16, HND, shuffled pages, uniform lengths; {time.time() - start:.0f} s")
    report.notes.append(
        "warm L2: every call on one input set"
        if args.rotate_bytes == 0
        else f"cold L2: timed calls rotate through input sets spanning up to "
        f"{args.rotate_bytes >> 20} MiB (column rotated_mb)"
    )
    report.notes.append(ceiling_note())
    print(report.markdown())
    for note in report.notes:
        print("note:", note)
    paths = report.save(tag=args.tag)
    print("saved", *paths)


if __name__ == "__main__":
    main()
