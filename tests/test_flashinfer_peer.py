# SPDX-License-Identifier: Apache-2.0
"""The FlashInfer peer's page lists and float32 reference (bench/flashinfer_peer.py), checked
without FlashInfer or a GPU: the lists must name the blocks sparse_verify attends, and the
reference it checks FlashInfer against must agree with dustin's CPU op."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_paged_cache
from dustin import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import flashinfer_peer  # noqa: E402


@given(
    kv_len=st.integers(1, 300),
    q_len=st.integers(1, 16),
    page=st.sampled_from([1, 7, 16, 64]),
    data=st.data(),
)
def test_sparse_blocks_are_the_listed_ones_before_the_window_then_the_window(
    kv_len, q_len, page, data
):
    q_len = min(q_len, kv_len)
    blocks = -(-kv_len // page)
    listed = sorted(data.draw(st.sets(st.integers(0, blocks - 1))))
    got = flashinfer_peer.sparse_blocks(
        torch.tensor([kv_len]), q_len, page, [torch.tensor(listed, dtype=torch.long)]
    )[0].tolist()
    first_window = (kv_len - q_len) // page
    expected = sorted({b for b in listed if b < first_window} | set(range(first_window, blocks)))
    assert got == expected  # ascending, unique, the window's blocks always, never past the end
    assert flashinfer_peer.dense_blocks(torch.tensor([kv_len]), page)[0].tolist() == list(
        range(blocks)
    )


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_reference_matches_dustins_cpu_op(layout):
    gen = torch.Generator().manual_seed(3)
    kv_lens, q_len, page, hq, hkv, d = [70, 33, 129], 5, 16, 8, 2, 64
    cache = make_paged_cache(kv_lens, page, hkv, d, torch.float32, layout, generator=gen)
    q = torch.randn(len(kv_lens), q_len, hq, d, generator=gen)
    ids = torch.tensor([[0, 2, 3], [0, 1, -1], [1, 4, 6]], dtype=torch.int32)
    counts = torch.tensor([3, 2, 3], dtype=torch.int32)
    sm_scale = d**-0.5
    out, _ = ops.sparse_verify(
        q, cache.k_cache, cache.v_cache, cache.block_table, cache.kv_lens, ids, counts,
        sm_scale, layout,
    )
    for b, kv_len in enumerate(kv_lens):
        ref = flashinfer_peer.reference(
            q[b], cache.k_cache, cache.v_cache, cache.block_table[b], kv_len,
            ids[b, : counts[b]].long(), kv_layout=layout, sm_scale=sm_scale,
        )
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


def test_per_kv_head_lists_are_refused_by_name():
    ids = torch.zeros(2, 4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="per-KV-head"):
        flashinfer_peer._single_lists(ids, torch.zeros(2, 4, dtype=torch.int32))
