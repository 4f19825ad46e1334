# SPDX-License-Identifier: Apache-2.0
"""block_scores on the CPU against the float64 reference."""

from __future__ import annotations

import math

import reference
import torch
from conftest import make_paged_cache
from dustin import ops
from hypothesis import given, settings
from hypothesis import strategies as st

# Float32 softmax and float32 sums into scores of up to Hs * n.
SCORE_ATOL = 1e-5
SCORE_RTOL = 1e-5


@st.composite
def score_cases(draw):
    return {
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        "kv_layout": draw(st.sampled_from(["NHD", "HND"])),
        "page_size": draw(st.sampled_from([1, 3, 8, 16, 64, 128])),
        "block_size": draw(st.sampled_from([1, 3, 8, 16, 64, 128])),
        "num_queries": draw(st.sampled_from([1, 2, 5, 16])),
        "num_kv_heads": draw(st.integers(1, 3)),
        "num_heads": draw(st.integers(1, 4)),
        "head_dim": draw(st.sampled_from([16, 40, 64, 128])),
        "extra_lens": draw(st.lists(st.integers(0, 300), min_size=1, max_size=3)),
        "extra_blocks": draw(st.integers(0, 3)),
        "pooled": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n = case["num_queries"]
    kv_lens = [n + extra for extra in case["extra_lens"]]
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
    num_blocks = math.ceil(max(kv_lens) / case["block_size"]) + case["extra_blocks"]
    q_srh = torch.randn(len(kv_lens), n, case["num_heads"], case["head_dim"], generator=gen)
    head_map = torch.randint(0, case["num_kv_heads"], (case["num_heads"],), generator=gen)
    scores = torch.rand(len(kv_lens), num_blocks, generator=gen)
    return cache, q_srh.to(case["dtype"]), head_map.to(torch.int32), scores


def call(cache, q_srh, head_map, block_size, scores, sm_scale=0.3):
    ops.block_scores(
        q_srh,
        cache.k_cache,
        cache.block_table,
        cache.kv_lens,
        head_map,
        sm_scale,
        block_size,
        cache.kv_layout,
        scores,
    )


@settings(max_examples=60)
@given(case=score_cases())
def test_matches_reference(case):
    cache, q_srh, head_map, scores = make_inputs(case)
    before = scores.clone()
    call(cache, q_srh, head_map, case["block_size"], scores)
    added = reference.block_scores(
        q_srh,
        cache.k_cache,
        cache.block_table,
        cache.kv_lens,
        head_map,
        0.3,
        case["block_size"],
        cache.kv_layout,
        scores.shape[1],
    )
    torch.testing.assert_close(
        scores.double(), before.double() + added, atol=SCORE_ATOL, rtol=SCORE_RTOL
    )
    # Every (query, head) softmax sums to one, and blocks past a sequence get nothing.
    total = (scores.double() - before.double()).sum(dim=1)
    expected_total = q_srh.shape[1] * q_srh.shape[2]
    torch.testing.assert_close(total, torch.full_like(total, expected_total), atol=1e-5, rtol=1e-5)
    for b, kv_len in enumerate(cache.kv_lens.tolist()):
        nblk = math.ceil(kv_len / case["block_size"])
        assert torch.equal(scores[b, nblk:], before[b, nblk:])


def fixed_case():
    return make_inputs(
        {
            "dtype": torch.bfloat16,
            "kv_layout": "HND",
            "page_size": 16,
            "block_size": 8,
            "num_queries": 5,
            "num_kv_heads": 2,
            "num_heads": 3,
            "head_dim": 64,
            "extra_lens": [600, 31],
            "extra_blocks": 2,
            "pooled": False,
            "seed": 1,
        }
    )


def test_calls_accumulate():
    cache, q_srh, head_map, scores = fixed_case()
    once = torch.zeros_like(scores)
    call(cache, q_srh, head_map, 8, once)
    twice = torch.zeros_like(scores)
    call(cache, q_srh, head_map, 8, twice)
    call(cache, q_srh, head_map, 8, twice)
    torch.testing.assert_close(twice, 2 * once, atol=1e-6, rtol=0)


def test_deterministic():
    cache, q_srh, head_map, scores = fixed_case()
    first, second = torch.zeros_like(scores), torch.zeros_like(scores)
    call(cache, q_srh, head_map, 8, first)
    call(cache, q_srh, head_map, 8, second)
    assert torch.equal(first, second)


def test_scores_may_be_a_strided_view():
    cache, q_srh, head_map, scores = fixed_case()
    num_blocks = scores.shape[1]
    wide = torch.zeros(2, num_blocks + 10)
    call(cache, q_srh, head_map, 8, wide[:, 5 : 5 + num_blocks])
    compact = torch.zeros_like(scores)
    call(cache, q_srh, head_map, 8, compact)
    assert torch.equal(wide[:, 5 : 5 + num_blocks], compact)
    assert not wide[:, :5].any() and not wide[:, 5 + num_blocks :].any()


def test_retrieval_heads_may_share_a_kv_head():
    cache, q_srh, _, scores = fixed_case()
    shared = torch.tensor([1, 1, 1], dtype=torch.int32)
    together = torch.zeros_like(scores)
    call(cache, q_srh, shared, 8, together)
    separately = torch.zeros_like(scores)
    for h in range(3):
        call(cache, q_srh[:, :, h : h + 1], shared[h : h + 1], 8, separately)
    torch.testing.assert_close(together, separately, atol=1e-5, rtol=0)
