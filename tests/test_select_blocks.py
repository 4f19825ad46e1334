# SPDX-License-Identifier: Apache-2.0
"""select_blocks on the CPU: exact agreement with the reference and the selection properties."""

from __future__ import annotations

import math

import reference
import torch
from dustin import ops
from hypothesis import given, settings
from hypothesis import strategies as st

NAN, INF = math.nan, math.inf

# Few distinct values make ties common; NaN and infinities test the ranking's edges.
score_values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 2.0, -1.0, NAN, INF, -INF]),
    st.floats(width=32, allow_nan=False),
)


@st.composite
def selection_cases(draw):
    block_size = draw(st.sampled_from([1, 3, 8, 16, 64, 128]))
    q_len = draw(st.sampled_from([1, 2, 5, 16]))
    num_blocks = draw(st.integers(math.ceil(q_len / block_size), 40))
    batch = draw(st.integers(1, 3))
    lists = draw(st.sampled_from([None, 1, 2, 3]))  # None: [B, NB] scores
    shape = (batch, num_blocks) if lists is None else (batch, lists, num_blocks)
    size = math.prod(shape)
    draft = torch.tensor(draw(st.lists(score_values, min_size=size, max_size=size))).view(shape)
    target = None
    if draw(st.booleans()):
        target = torch.tensor(draw(st.lists(score_values, min_size=size, max_size=size))).view(
            shape
        )
    kv_lens = draw(
        st.lists(st.integers(q_len, num_blocks * block_size), min_size=batch, max_size=batch)
    )
    return {
        "draft_scores": draft,
        "target_scores": target,
        "kv_lens": torch.tensor(kv_lens, dtype=torch.int32),
        "q_len": q_len,
        "block_size": block_size,
        "budget_blocks": draw(st.integers(0, 20)),
        "n_sink": draw(st.sampled_from([0, 1, 4, 17, 200])),
        "n_recent": draw(st.sampled_from([0, 1, 16, 33, 300])),
        "draft_share": draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))),
    }


def forced_blocks(kv_len, q_len, block_size, n_sink, n_recent):
    sink = {t // block_size for t in range(min(n_sink, kv_len))}
    recent = {t // block_size for t in range(max(0, kv_len - n_recent - q_len), kv_len)}
    return sink | recent


@settings(max_examples=300)
@given(case=selection_cases())
def test_matches_reference_and_properties(case):
    block_ids, block_counts = ops.select_blocks(**case)
    draft = case["draft_scores"]
    capacity = reference.select_capacity(
        draft.shape[-1],
        case["budget_blocks"],
        case["n_sink"],
        case["n_recent"],
        case["q_len"],
        case["block_size"],
    )
    assert block_ids.dtype == torch.int32 and block_counts.dtype == torch.int32
    assert block_ids.shape == (*draft.shape[:-1], capacity)
    assert block_counts.shape == draft.shape[:-1]
    assert capacity == ops.select_capacity(
        draft.shape[-1],
        case["budget_blocks"],
        case["n_sink"],
        case["n_recent"],
        case["q_len"],
        case["block_size"],
    )

    expected = reference.select_blocks(**case)
    ids = block_ids if block_ids.dim() == 3 else block_ids[:, None]
    counts = block_counts if block_counts.dim() == 2 else block_counts[:, None]
    for b, kv_len in enumerate(case["kv_lens"].tolist()):
        nblk = math.ceil(kv_len / case["block_size"])
        forced = forced_blocks(
            kv_len, case["q_len"], case["block_size"], case["n_sink"], case["n_recent"]
        )
        for h in range(ids.shape[1]):
            count = int(counts[b, h])
            chosen = ids[b, h, :count].tolist()
            assert chosen == expected[b][h]
            assert count == min(nblk, max(case["budget_blocks"], len(forced)))
            assert chosen == sorted(set(chosen)), "ascending and unique"
            assert forced <= set(chosen), "forced blocks present"
            assert all(0 <= blk < nblk for blk in chosen)
            assert (ids[b, h, count:] == -1).all(), "-1 past the count"


def select(
    draft, target=None, kv_len=64, q_len=1, block_size=4, budget=4, n_sink=0, n_recent=0, share=0.5
):
    ids, counts = ops.select_blocks(
        torch.tensor([draft], dtype=torch.float32),
        None if target is None else torch.tensor([target], dtype=torch.float32),
        torch.tensor([kv_len], dtype=torch.int32),
        q_len,
        block_size,
        budget,
        n_sink,
        n_recent,
        share,
    )
    return ids[0, : int(counts[0])].tolist()


def test_ties_go_to_lower_ids():
    # 16 blocks; forced: block 15 (window). Three free slots, all scores equal.
    assert select([1.0] * 16, budget=4, share=1.0) == [0, 1, 2, 15]
    assert select([1.0] * 16, [2.0] * 16, budget=4, share=0.0) == [0, 1, 2, 15]
    assert select([0.0, -0.0] * 8, budget=3, share=1.0) == [0, 1, 15]


def test_draft_picks_come_before_the_target_fill():
    draft = [0.0] * 16
    draft[9] = 5.0
    draft[7] = 4.0
    target = [0.0] * 16
    target[2], target[3] = 9.0, 8.0
    # rest = 2, draft quota floor(2 * 0.5) = 1: block 9 by draft, then block 2 by target.
    assert select(draft, target, budget=3, share=0.5) == [2, 9, 15]
    assert select(draft, target, budget=3, share=1.0) == [7, 9, 15]
    assert select(draft, target, budget=3, share=0.0) == [2, 3, 15]
    # No target: the fill continues down the draft ranking.
    assert select(draft, None, budget=4, share=0.25) == [0, 7, 9, 15]


def test_nan_ranks_below_every_number():
    draft = [NAN, -INF, NAN, -1e30, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0.0]
    assert select(draft, budget=3, share=1.0) == [1, 3, 15]
    assert select(draft, budget=5, share=1.0) == [0, 1, 2, 3, 15]


def test_forced_blocks_are_kept_past_the_budget():
    # 4 sink tokens -> block 0; 16 recent + 2 window tokens of 64 -> blocks 11..15.
    assert select([9.0] * 16, kv_len=64, q_len=2, budget=0, n_sink=4, n_recent=16) == [
        0,
        11,
        12,
        13,
        14,
        15,
    ]
    # A short sequence: the list is every block it has.
    assert select([1.0] * 16, kv_len=6, budget=8) == [0, 1]


def test_per_head_lists_match_per_sequence_calls():
    gen = torch.Generator().manual_seed(0)
    draft = torch.randn(2, 3, 30, generator=gen)
    target = torch.randn(2, 3, 30, generator=gen)
    kv_lens = torch.tensor([117, 60], dtype=torch.int32)
    args = (kv_lens, 5, 4, 6, 4, 16, 0.5)
    ids, counts = ops.select_blocks(draft, target, *args)
    for h in range(3):
        ids_h, counts_h = ops.select_blocks(draft[:, h], target[:, h], *args)
        assert torch.equal(ids[:, h], ids_h) and torch.equal(counts[:, h], counts_h)


def test_out_variant_matches():
    gen = torch.Generator().manual_seed(1)
    draft = torch.randn(3, 50, generator=gen)
    kv_lens = torch.tensor([200, 13, 199], dtype=torch.int32)
    ids, counts = ops.select_blocks(draft, None, kv_lens, 3, 4, 10, 4, 8, 0.7)
    k = ops.select_capacity(50, 10, 4, 8, 3, 4)
    out_ids = torch.full((3, k), 12345, dtype=torch.int32)
    out_counts = torch.full((3,), 12345, dtype=torch.int32)
    ops.select_blocks_out(draft, None, kv_lens, 3, 4, 10, 4, 8, 0.7, out_ids, out_counts)
    assert torch.equal(ids, out_ids) and torch.equal(counts, out_counts)


@settings(max_examples=200)
@given(
    num_blocks=st.integers(1, 10_000),
    budget=st.integers(0, 5000),
    n_sink=st.integers(0, 1000),
    n_recent=st.integers(0, 1000),
    q_len=st.integers(1, 16),
    block_size=st.integers(1, 128),
)
def test_capacity_formula(num_blocks, budget, n_sink, n_recent, q_len, block_size):
    assert ops.select_capacity(
        num_blocks, budget, n_sink, n_recent, q_len, block_size
    ) == reference.select_capacity(num_blocks, budget, n_sink, n_recent, q_len, block_size)
