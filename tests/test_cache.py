# SPDX-License-Identifier: Apache-2.0
"""PagedKVCache: append and gather in both layouts, rollback, sizing errors, sparse_verify on it."""

from __future__ import annotations

import pytest
import torch
from dustin import ops
from dustin.cache import CacheFullError, PagedKVCache, pages_needed

HKV, D, LAYERS = 2, 8, 2


def _cache(batch=3, max_seq_len=64, **kwargs) -> PagedKVCache:
    return PagedKVCache(LAYERS, HKV, D, batch, max_seq_len, **kwargs)


def _fill(
    cache: PagedKVCache, n: int, seqs=None, seed=0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Appends n random tokens to ``seqs`` in every layer; returns each layer's (k, v) [b, n, Hkv, D]."""
    g = torch.Generator().manual_seed(seed)
    cache.append(n, seqs)
    rows = cache.batch_size if seqs is None else len(seqs)
    written = []
    for layer in range(cache.num_layers):
        k, v = (torch.randn(rows, n, HKV, D, generator=g) for _ in range(2))
        cache.write(layer, k, v)
        written.append((k, v))
    return written


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_append_then_gather_returns_what_was_written(layout, page_size):
    cache = _cache(layout=layout, page_size=page_size)
    expected = {(layer, b): ([], []) for layer in range(LAYERS) for b in range(3)}
    steps = [(5, [0, 2]), (7, None), (1, [1]), (4, None)]  # mixed lengths across the batch
    for i, (n, seqs) in enumerate(steps):
        for layer, (k, v) in enumerate(_fill(cache, n, seqs, seed=i)):
            for row, b in enumerate(range(3) if seqs is None else seqs):
                expected[layer, b][0].append(k[row])
                expected[layer, b][1].append(v[row])
    assert cache.lens == [16, 12, 16]
    assert cache.kv_lens.tolist() == cache.lens
    for (layer, b), (ks, vs) in expected.items():
        k, v = cache.gather(layer, b)
        assert torch.equal(k, torch.cat(ks).transpose(0, 1))
        assert torch.equal(v, torch.cat(vs).transpose(0, 1))
    # The block table maps each sequence's logical pages to distinct physical pages.
    used = [
        int(p) for b in range(3) for p in cache.block_table[b, : -(-cache.lens[b] // page_size)]
    ]
    assert len(used) == len(set(used)) == pages_needed(cache.lens, page_size)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_rollback_equals_a_cache_that_never_saw_the_rejected_tokens(layout):
    seen, fresh = _cache(layout=layout, page_size=4), _cache(layout=layout, page_size=4)
    for cache in (seen, fresh):
        _fill(cache, 9, seed=1)  # shared prefix
    window = _fill(seen, 6, seed=2)  # a verification window...
    accepted = [2, 0, 6]
    seen.truncate([9 + a for a in accepted])  # ...cut back to the accepted tokens
    for b, a in enumerate(accepted):  # the fresh cache only ever gets the accepted tokens
        if a:
            fresh.append(a, [b])
            for layer, (k, v) in enumerate(window):
                fresh.write(layer, k[b : b + 1, :a], v[b : b + 1, :a])
    assert seen.lens == fresh.lens and seen.kv_lens.tolist() == fresh.kv_lens.tolist()
    assert seen.free_pages == fresh.free_pages
    for cache in (seen, fresh):  # both continue with the same next window
        _fill(cache, 5, seed=3)
    q = torch.randn(3, 5, 2 * HKV, D)
    for layer in range(LAYERS):
        for b in range(3):
            assert all(
                torch.equal(x, y) for x, y in zip(seen.gather(layer, b), fresh.gather(layer, b))
            )
        outs = []
        for cache in (seen, fresh):
            ids, counts = ops.dense_block_lists(cache.kv_lens, cache.page_size)
            outs.append(
                ops.sparse_verify(
                    q,
                    cache.k(layer),
                    cache.v(layer),
                    cache.block_table,
                    cache.kv_lens,
                    ids,
                    counts,
                    D**-0.5,
                    layout,
                )[0]
            )
        assert torch.equal(*outs)


def test_truncate_returns_pages_to_the_pool():
    cache = _cache(page_size=4, token_budget=48)
    _fill(cache, 16)
    assert cache.free_pages == 0
    cache.truncate([5, 16, 0])
    assert cache.free_pages == 12 - 2 - 4
    _fill(cache, 10, [2])  # the freed pages serve another sequence
    assert cache.lens == [5, 16, 10]


def test_request_that_does_not_fit_raises_and_changes_nothing():
    cache = _cache(page_size=4, token_budget=40)
    _fill(cache, 12)
    before = (list(cache.lens), cache.free_pages, cache.block_table.clone())
    with pytest.raises(CacheFullError, match="out of pages.*token_budget"):
        cache.append(4)
    assert (cache.lens, cache.free_pages) == before[:2] and torch.equal(
        cache.block_table, before[2]
    )
    with pytest.raises(CacheFullError, match="max_seq_len 64"):
        _cache().append(65)


def test_clone_is_independent():
    cache = _cache()
    _fill(cache, 8)
    copy = cache.clone()
    _fill(copy, 3, seed=5)
    copy.truncate([0, 0, 0])
    assert cache.lens == [8, 8, 8] and copy.lens == [0, 0, 0]
    assert cache.gather(1, 2)[0].shape == (HKV, 8, D)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"page_size": 0}, "page_size must be in \\[1, 128\\]"),
        ({"page_size": 129}, "page_size must be in \\[1, 128\\]"),
        ({"layout": "HDN"}, "layout must be one of"),
        ({"token_budget": 0}, "token_budget must be >= 1"),
        ({"batch": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _cache(**kwargs)


def test_bad_rollback_and_write():
    with pytest.raises(RuntimeError, match="call append"):
        _cache().write(0, torch.zeros(3, 1, HKV, D), torch.zeros(3, 1, HKV, D))
    cache = _cache()
    _fill(cache, 4)
    with pytest.raises(ValueError, match="lens\\[1\\] must be in \\[0, 4\\], got 5"):
        cache.truncate([4, 5, 4])
    with pytest.raises(ValueError, match="lens must have 3 entries"):
        cache.truncate([4, 4])
    cache.append(2)
    with pytest.raises(ValueError, match="k holds 3 tokens, the window 6"):
        cache.write(0, torch.zeros(3, 1, HKV, D), torch.zeros(3, 1, HKV, D))
