# SPDX-License-Identifier: Apache-2.0
"""store_kv on the CPU: exactly the indexed assignment it replaces, in both layouts, every dtype,
page sizes 1/16/128, D 64/128, N from 0, strided inputs, int32 and int64 indices, pool views;
out-of-range pages and slots raise before anything is written; PagedKVCache.store uses it.

The argument checks (one row per rule, CPU and CUDA) are in test_errors.py; CUDA against this
CPU twin in test_cuda_store_kv.py.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from dustin import ops
from dustin.cache import PagedKVCache

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_store(k_cache, v_cache, pages, slots, k, v, kv_layout):
    """The indexed assignment PagedKVCache.store did before store_kv (on copies)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    pages, slots = pages.long(), slots.long()
    if kv_layout == "HND":
        k_cache[pages, :, slots] = k
        v_cache[pages, :, slots] = v
    else:
        k_cache[pages, slots] = k
        v_cache[pages, slots] = v
    return k_cache, v_cache


def make_caches(num_pages, hkv, page, d, dtype, kv_layout, gen, pooled, layers=3, layer=1):
    """Random caches; pooled: views ``pool[layer, 0]``, ``pool[layer, 1]`` of one
    ``[L, 2, pages, ...]`` pool, as ``PagedKVCache.k(layer)`` / ``.v(layer)`` are."""
    tile = (hkv, page) if kv_layout == "HND" else (page, hkv)
    if pooled:
        pool = torch.randn(layers, 2, num_pages, *tile, d, generator=gen).to(dtype)
        return pool, pool[layer, 0], pool[layer, 1]
    k_cache = torch.randn(num_pages, *tile, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, *tile, d, generator=gen).to(dtype)
    return None, k_cache, v_cache


def distinct_places(n, num_pages, page, gen, index_dtype=torch.int64):
    """n distinct (page, slot) places drawn at random from the pool."""
    flat = torch.randperm(num_pages * page, generator=gen)[:n]
    return (flat // page).to(index_dtype), (flat % page).to(index_dtype)


def strided_rows(n, hkv, d, dtype, gen, kind):
    """k or v ``[n, Hkv, D]``: contiguous, a slice of a fused projection, transposed, or one
    token expanded over N (stride 0)."""
    if kind == "contiguous":
        return torch.randn(n, hkv, d, generator=gen).to(dtype)
    if kind == "fused":
        fused = torch.randn(n, 3 * hkv + 1, d, generator=gen).to(dtype)
        return fused[:, hkv + 1 : 2 * hkv + 1]
    if kind == "transposed":
        return torch.randn(hkv, n, d, generator=gen).to(dtype).transpose(0, 1)
    return torch.randn(1, hkv, d, generator=gen).to(dtype).expand(n, hkv, d)


def seed_of(*args) -> int:
    return zlib.crc32(repr(args).encode())


def check_against_reference(k_cache, v_cache, pages, slots, k, v, kv_layout):
    expected_k, expected_v = reference_store(k_cache, v_cache, pages, slots, k, v, kv_layout)
    ops.store_kv(k, v, k_cache, v_cache, pages, slots, kv_layout)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("kv_layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [1, 16, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_matches_indexed_assignment(kv_layout, dtype, page, d, n):
    gen = torch.Generator().manual_seed(seed_of(kv_layout, dtype, page, d, n))
    num_pages, hkv = max(3, -(-n // page) + 2), 2
    pool, k_cache, v_cache = make_caches(num_pages, hkv, page, d, dtype, kv_layout, gen, True)
    pages, slots = distinct_places(n, num_pages, page, gen)
    k = torch.randn(n, hkv, d, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(dtype)
    others = pool.clone()
    check_against_reference(k_cache, v_cache, pages, slots, k, v, kv_layout)
    # The other layers of the pool are untouched.
    others[1] = pool[1]
    assert torch.equal(pool, others)


@pytest.mark.parametrize("kv_layout", ["HND", "NHD"])
@pytest.mark.parametrize("kind", ["fused", "transposed", "expanded"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_strided_inputs_and_int32_indices(kv_layout, kind, index_dtype):
    gen = torch.Generator().manual_seed(seed_of(kv_layout, kind, index_dtype))
    n, hkv, page, d, num_pages = 23, 4, 16, 64, 5
    _, k_cache, v_cache = make_caches(
        num_pages, hkv, page, d, torch.bfloat16, kv_layout, gen, False
    )
    pages, slots = distinct_places(n, num_pages, page, gen, index_dtype)
    k = strided_rows(n, hkv, d, torch.bfloat16, gen, kind)
    v = strided_rows(n, hkv, d, torch.bfloat16, gen, "fused" if kind != "fused" else "transposed")
    check_against_reference(k_cache, v_cache, pages, slots, k, v, kv_layout)


def test_strided_pages_and_slots():
    gen = torch.Generator().manual_seed(3)
    n, hkv, page, d, num_pages = 9, 2, 8, 16, 4
    _, k_cache, v_cache = make_caches(num_pages, hkv, page, d, torch.float32, "HND", gen, False)
    pages, slots = distinct_places(n, num_pages, page, gen)
    places = torch.stack([pages, slots], 1)  # pages = places[:, 0]: stride 2
    k, v = (torch.randn(n, hkv, d, generator=gen) for _ in range(2))
    check_against_reference(k_cache, v_cache, places[:, 0], places[:, 1], k, v, "HND")


@pytest.mark.parametrize("d", [1, 3, 8, 80])
def test_any_head_dim(d):
    gen = torch.Generator().manual_seed(d)
    _, k_cache, v_cache = make_caches(3, 3, 5, d, torch.float16, "NHD", gen, True)
    pages, slots = distinct_places(7, 3, 5, gen)
    k, v = (torch.randn(7, 3, d, generator=gen).half() for _ in range(2))
    check_against_reference(k_cache, v_cache, pages, slots, k, v, "NHD")


def test_raw_op_defaults_to_hnd_and_writes_in_place():
    gen = torch.Generator().manual_seed(4)
    _, k_cache, v_cache = make_caches(2, 1, 4, 8, torch.float32, "HND", gen, False)
    k, v = torch.ones(1, 1, 8), torch.full((1, 1, 8), 2.0)
    torch.ops.dustin.store_kv(k, v, k_cache, v_cache, torch.tensor([1]), torch.tensor([3]))
    assert torch.equal(k_cache[1, 0, 3], k[0, 0]) and torch.equal(v_cache[1, 0, 3], v[0, 0])


@pytest.mark.parametrize("bad", ["page", "negative-page", "slot", "negative-slot"])
@pytest.mark.parametrize("validate", [True, False])
def test_out_of_range_raises_and_writes_nothing(bad, validate):
    gen = torch.Generator().manual_seed(5)
    num_pages, page = 4, 16
    _, k_cache, v_cache = make_caches(num_pages, 2, page, 8, torch.float32, "HND", gen, False)
    pages, slots = distinct_places(6, num_pages, page, gen)
    column, index, value = {
        "page": ("pages", 2, num_pages),
        "negative-page": ("pages", 0, -1),
        "slot": ("slots", 5, page),
        "negative-slot": ("slots", 1, -3),
    }[bad]
    (pages if column == "pages" else slots)[index] = value
    k, v = (torch.randn(6, 2, 8, generator=gen) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    rule = (
        "a page in \\[0, num_pages\\) = \\[0, 4\\)"
        if column == "pages"
        else ("a slot in \\[0, P\\) = \\[0, 16\\)")
    )
    with pytest.raises(
        IndexError,
        match=rf"^dustin\.store_kv: {column}\[{index}\] must be {rule}, "
        rf"got {value}$",
    ):
        ops.store_kv(k, v, k_cache, v_cache, pages, slots, "HND", validate=validate)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ---- PagedKVCache.store ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_cache_store_uses_the_op_and_matches_indexing(layout, dtype):
    gen = torch.Generator().manual_seed(seed_of(layout, dtype))
    cache = PagedKVCache(2, 2, 16, 3, 40, page_size=16, layout=layout, dtype=dtype)
    assert cache._store_with_op
    fallback = cache.clone()
    fallback._store_with_op = False
    for n, seqs in [(5, None), (17, [1]), (1, [0, 2])]:
        for c in (cache, fallback):
            c.append(n, seqs)
        rows = 3 if seqs is None else len(seqs)
        for layer in range(2):
            k, v = (torch.randn(rows, n, 2, 16, generator=gen) for _ in range(2))
            cache.write(layer, k, v)  # float32 in: converted to the cache's dtype
            fallback.write(layer, k, v)
    assert torch.equal(cache._pool, fallback._pool)


def test_paged_cache_falls_back_for_other_dtypes():
    cache = PagedKVCache(1, 2, 8, 1, 8, page_size=4, dtype=torch.float64)
    assert not cache._store_with_op
    cache.append(3)
    k = torch.arange(48, dtype=torch.float64).view(1, 3, 2, 8)
    cache.write(0, k, -k)
    keys, values = cache.gather(0, 0)
    assert torch.equal(keys, k[0].transpose(0, 1)) and torch.equal(values, -keys)
