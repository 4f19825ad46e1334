# SPDX-License-Identifier: Apache-2.0
"""sparse_verify on the CPU against the float64 reference and against dense SDPA."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import make_block_lists, make_paged_cache
from dustin import ops
from hypothesis import given, settings
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ||out - ref|| / ||ref||: the twin computes in float32 from the exact input values, so the
# error is the rounding of out to its dtype (bf16 2^-9, fp16 2^-12) plus float32 sums.
OUT_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LSE_ATOL = 1e-4


def run_and_check(cache, q, block_ids, block_counts, sm_scale):
    out, lse = ops.sparse_verify(
        q,
        cache.k_cache,
        cache.v_cache,
        cache.block_table,
        cache.kv_lens,
        block_ids,
        block_counts,
        sm_scale,
        cache.kv_layout,
    )
    ref_out, ref_lse = reference.sparse_verify(
        q,
        cache.k_cache,
        cache.v_cache,
        cache.block_table,
        cache.kv_lens,
        block_ids,
        block_counts,
        sm_scale,
        cache.kv_layout,
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all(), (
        "out has NaN: the op read a slot past a length or a spare page"
    )
    assert reference.relative_error(out, ref_out) < OUT_RTOL[q.dtype]
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL, rtol=0)
    return out, lse


@st.composite
def verify_cases(draw):
    return {
        "dtype": draw(st.sampled_from(DTYPES)),
        "kv_layout": draw(st.sampled_from(["NHD", "HND"])),
        "page_size": draw(st.sampled_from([1, 3, 8, 16, 64, 128])),
        "q_len": draw(st.sampled_from([1, 2, 3, 5, 8, 16])),
        "num_kv_heads": draw(st.integers(1, 3)),
        "group": draw(st.sampled_from([1, 2, 3, 4, 16])),
        "head_dim": draw(st.sampled_from([16, 40, 64, 128])),
        "extra_lens": draw(st.lists(st.integers(0, 300), min_size=1, max_size=3)),
        "list_form": draw(st.sampled_from(["sequence", "shared", "kv_head"])),
        "pooled": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=60)
@given(case=verify_cases())
def test_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    q_len = case["q_len"]
    kv_lens = [q_len + extra for extra in case["extra_lens"]]
    cache = make_paged_cache(
        kv_lens,
        case["page_size"],
        case["num_kv_heads"],
        case["head_dim"],
        case["dtype"],
        case["kv_layout"],
        generator=gen,
        pooled=case["pooled"],
    )
    num_lists = {"sequence": None, "shared": 1, "kv_head": case["num_kv_heads"]}[case["list_form"]]
    block_ids, block_counts = make_block_lists(kv_lens, case["page_size"], num_lists, gen)
    num_qo_heads = case["num_kv_heads"] * case["group"]
    q = torch.randn(len(kv_lens), q_len, num_qo_heads, case["head_dim"], generator=gen)
    run_and_check(cache, q.to(case["dtype"]), block_ids, block_counts, case["head_dim"] ** -0.5)


def sdpa_dense(q, cache, sm_scale):
    """Dense causal attention of each sequence's window through torch SDPA (float64)."""
    batch, q_len, num_qo_heads, _ = q.shape
    group = num_qo_heads // cache.num_kv_heads
    outs = []
    for b in range(batch):
        kv_len = int(cache.kv_lens[b])
        keys = reference.gather_tokens(cache.k_cache, cache.block_table, b, kv_len, cache.kv_layout)
        values = reference.gather_tokens(
            cache.v_cache, cache.block_table, b, kv_len, cache.kv_layout
        )
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        query_pos = kv_len - q_len + torch.arange(q_len)
        mask = torch.arange(kv_len)[None, :] <= query_pos[:, None]  # [q, L]
        out = F.scaled_dot_product_attention(
            q[b].double().transpose(0, 1), keys, values, attn_mask=mask, scale=sm_scale
        )
        outs.append(out.transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 16, 128])
def test_every_block_listed_is_dense_causal_attention(dtype, kv_layout, page_size):
    gen = torch.Generator().manual_seed(7)
    kv_lens = [5, 133, 300]
    cache = make_paged_cache(kv_lens, page_size, 2, 64, dtype, kv_layout, generator=gen)
    q = torch.randn(3, 5, 8, 64, generator=gen).to(dtype)
    block_ids, block_counts = ops.dense_block_lists(cache.kv_lens, page_size)
    out, _ = run_and_check(cache, q, block_ids, block_counts, 0.125)
    assert reference.relative_error(out, sdpa_dense(q, cache, 0.125)) < OUT_RTOL[dtype]


def test_long_context_matches_reference():
    gen = torch.Generator().manual_seed(3)
    cache = make_paged_cache([8192], 16, 2, 128, torch.bfloat16, "HND", generator=gen)
    q = torch.randn(1, 5, 12, 128, generator=gen).to(torch.bfloat16)
    block_ids, block_counts = make_block_lists([8192], 16, 2, gen)
    run_and_check(cache, q, block_ids, block_counts, 128**-0.5)


def fixed_case(dtype=torch.bfloat16, kv_layout="HND", seed=11):
    gen = torch.Generator().manual_seed(seed)
    kv_lens = [70, 9, 41]
    cache = make_paged_cache(kv_lens, 8, 2, 32, dtype, kv_layout, generator=gen)
    q = torch.randn(3, 4, 6, 32, generator=gen).to(dtype)
    return gen, kv_lens, cache, q


def call(cache, q, block_ids, block_counts, sm_scale=0.2):
    return ops.sparse_verify(
        q,
        cache.k_cache,
        cache.v_cache,
        cache.block_table,
        cache.kv_lens,
        block_ids,
        block_counts,
        sm_scale,
        cache.kv_layout,
    )


def test_empty_lists_attend_the_window_blocks_only():
    _, _, cache, q = fixed_case()
    block_ids = torch.full((3, 4), -1, dtype=torch.int32)
    run_and_check(cache, q, block_ids, torch.zeros(3, dtype=torch.int32), 0.2)


def test_listed_window_blocks_change_nothing():
    _, _, cache, q = fixed_case()
    # P = 8, q = 4, kv_lens 70, 9, 41: the windows start in blocks 8, 0 and 4.
    before = torch.tensor([[1, 3, 7, -1], [-1, -1, -1, -1], [0, 2, -1, -1]], dtype=torch.int32)
    with_window = torch.tensor([[1, 3, 7, 8], [0, 1, -1, -1], [0, 2, 4, 5]], dtype=torch.int32)
    out_a, lse_a = call(cache, q, before, torch.tensor([3, 0, 2], dtype=torch.int32))
    out_b, lse_b = call(cache, q, with_window, torch.tensor([4, 2, 4], dtype=torch.int32))
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)


def test_list_forms_agree():
    gen, kv_lens, cache, q = fixed_case(torch.float32)
    block_ids, block_counts = make_block_lists(kv_lens, 8, None, gen)
    out, lse = call(cache, q, block_ids, block_counts)
    shared = call(cache, q, block_ids[:, None], block_counts[:, None])
    per_head = call(
        cache,
        q,
        block_ids[:, None].expand(-1, 2, -1),
        block_counts[:, None].expand(-1, 2).contiguous(),
    )
    for other_out, other_lse in (shared, per_head):
        assert torch.equal(out, other_out) and torch.equal(lse, other_lse)


def test_per_kv_head_lists_are_independent():
    gen, kv_lens, cache, q = fixed_case(torch.float32)
    block_ids, block_counts = make_block_lists(kv_lens, 8, 2, gen)
    out, lse = call(cache, q, block_ids, block_counts)
    for h in range(2):
        alone_out, alone_lse = call(cache, q, block_ids[:, h], block_counts[:, h].contiguous())
        heads = slice(3 * h, 3 * h + 3)  # G = 3
        assert torch.equal(out[:, :, heads], alone_out[:, :, heads])
        assert torch.equal(lse[:, :, heads], alone_lse[:, :, heads])


def test_strided_views_match_reference():
    gen, kv_lens, cache, _ = fixed_case(torch.float16, "NHD")
    qkv = torch.randn(3, 4, 6 + 2 * 2, 32, generator=gen).to(torch.float16)
    q = qkv[:, :, :6]  # a view into a fused qkv projection
    wide_table = torch.full((3, cache.block_table.shape[1] + 3), -1, dtype=torch.int32)
    wide_table[:, 1:-2] = cache.block_table
    cache.block_table = wide_table[:, 1:-2]
    ids, counts = make_block_lists(kv_lens, 8, 2, gen)
    # Innermost stride 1 is required; outer strides are free.
    wide_ids = torch.cat([ids, ids], dim=-1)[:, :, : ids.shape[-1]]
    assert not q.is_contiguous() and not cache.block_table.is_contiguous()
    assert not wide_ids.is_contiguous()
    run_and_check(cache, q, wide_ids, counts, 0.2)


def test_out_variant_writes_every_element():
    gen, kv_lens, cache, q = fixed_case()
    block_ids, block_counts = make_block_lists(kv_lens, 8, None, gen)
    expected_out, expected_lse = call(cache, q, block_ids, block_counts)
    out = torch.full_like(q, math.nan)
    lse = torch.full(q.shape[:3], math.nan)
    ops.sparse_verify_out(
        q,
        cache.k_cache,
        cache.v_cache,
        cache.block_table,
        cache.kv_lens,
        block_ids,
        block_counts,
        0.2,
        cache.kv_layout,
        out,
        lse,
    )
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


def test_workspace_bytes_is_zero_on_cpu():
    gen, kv_lens, cache, q = fixed_case()
    block_ids, _ = make_block_lists(kv_lens, 8, None, gen)
    assert (
        ops.sparse_verify_workspace_bytes(q, cache.k_cache, cache.block_table, block_ids, "HND")
        == 0
    )


def test_results_do_not_depend_on_the_thread_count():
    script = (
        "import torch, dustin, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from conftest import make_paged_cache, make_block_lists\n"
        "g = torch.Generator().manual_seed(5)\n"
        "c = make_paged_cache([4000, 77], 16, 1, 64, torch.bfloat16, 'HND', generator=g)\n"
        "ids, counts = make_block_lists([4000, 77], 16, None, g)\n"
        "q = torch.randn(2, 3, 4, 64, generator=g).to(torch.bfloat16)\n"
        "out, lse = dustin.ops.sparse_verify(q, c.k_cache, c.v_cache, c.block_table, c.kv_lens,"
        " ids, counts, 0.125, 'HND')\n"
        "print(hash(out.float().numpy().tobytes()), hash(lse.numpy().tobytes()))\n"
    )
    tests_dir = str(Path(__file__).parent)
    results = set()
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONHASHSEED="0")
        proc = subprocess.run(
            [sys.executable, "-c", script, tests_dir],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results.add(proc.stdout)
    assert len(results) == 1, results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_visible_token_returns_its_value_exactly(dtype):
    """Every 16-bit pattern goes through the twin's conversions and back unchanged: with one
    token in the cache the softmax weight is exactly 1, so out must equal v bit for bit."""
    head_dim = 128
    values = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    batch = values.numel() // head_dim
    v_cache = values.view(batch, 1, 1, head_dim)  # HND, P = 1, one page per sequence
    k_cache = torch.zeros_like(v_cache)
    block_table = torch.arange(batch, dtype=torch.int32)[:, None]
    kv_lens = torch.ones(batch, dtype=torch.int32)
    q = torch.randn(batch, 1, 1, head_dim).to(dtype)
    block_ids = torch.zeros(batch, 1, dtype=torch.int32)
    out, lse = ops.sparse_verify(
        q, k_cache, v_cache, block_table, kv_lens, block_ids, torch.zeros_like(kv_lens), 0.1, "HND"
    )
    expected = v_cache[:, 0, 0].float()
    nan = expected.isnan()
    assert torch.equal(out[:, 0, 0].float().isnan(), nan)
    assert torch.equal(out[:, 0, 0].float()[~nan], expected[~nan])
    assert torch.equal(lse, torch.zeros_like(lse))
