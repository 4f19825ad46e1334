# SPDX-License-Identifier: Apache-2.0
"""store_kv on CUDA is bit-identical to the CPU twin (it is a copy): both layouts, every dtype,
page sizes 1/16/128, every vector width (16-byte rows, odd head dims, misaligned starts),
strided inputs, int32 indices; out-of-range entries are skipped without writing out of bounds;
validate=True catches them on the host; CUDA-graph capture and replay; PagedKVCache.store."""

import zlib

import pytest
import torch
from dustin import ops
from dustin.cache import PagedKVCache

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _caches(num_pages, hkv, page, d, dtype, kv_layout, gen, layers=2):
    """k_cache, v_cache as views of a random ``[L, 2, pages, ...]`` pool (on the CPU), and the pool."""
    tile = (hkv, page) if kv_layout == "HND" else (page, hkv)
    pool = torch.randn(layers, 2, num_pages, *tile, d, generator=gen).to(dtype)
    return pool, pool[layers - 1, 0], pool[layers - 1, 1]


def _places(n, num_pages, page, gen, index_dtype=torch.int64):
    flat = torch.randperm(num_pages * page, generator=gen)[:n]
    return (flat // page).to(index_dtype), (flat % page).to(index_dtype)


def _run_both(pool, k_cache, v_cache, k, v, pages, slots, kv_layout):
    """store_kv on CPU copies and on CUDA copies of the same inputs; returns both pools."""
    pool_gpu = pool.cuda()
    layer = k_cache.storage_offset() // pool[0].numel()
    k_gpu, v_gpu = _like_on_cuda(k), _like_on_cuda(v)
    ops.store_kv(
        k_gpu, v_gpu, pool_gpu[layer, 0], pool_gpu[layer, 1], pages.cuda(), slots.cuda(), kv_layout
    )
    ops.store_kv(k, v, k_cache, v_cache, pages, slots, kv_layout)
    torch.cuda.synchronize()
    return pool, pool_gpu.cpu()


def _like_on_cuda(t: torch.Tensor) -> torch.Tensor:
    """t on the GPU with the same strides and storage offset: the same view of a copy of its
    whole storage (so expanded and misaligned views stay so)."""
    storage = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    return storage.cuda().as_strided(t.shape, t.stride(), t.storage_offset())


def _assert_bit_identical(cpu: torch.Tensor, gpu: torch.Tensor):
    a, b = cpu.view(torch.uint8), gpu.view(torch.uint8)
    mismatch = (a != b).nonzero()
    assert mismatch.numel() == 0, f"bytes differ at {mismatch[:5].tolist()}"


@pytest.mark.parametrize("kv_layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [1, 16, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [0, 1, 5, 80, 4099])
def test_matches_cpu(kv_layout, dtype, page, d, n):
    gen = _gen(kv_layout, dtype, page, d, n)
    hkv = 4
    num_pages = -(-n // page) + 3
    pool, k_cache, v_cache = _caches(num_pages, hkv, page, d, dtype, kv_layout, gen)
    pages, slots = _places(n, num_pages, page, gen)
    k = torch.randn(n, hkv, d, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(dtype)
    _assert_bit_identical(*_run_both(pool, k_cache, v_cache, k, v, pages, slots, kv_layout))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 12, 80, 256])
def test_every_vector_width(dtype, d):
    """Row bytes of 2..1024: 16-, 8-, 4- and 2-byte copies, rows wider than a warp's vectors."""
    gen = _gen(dtype, d)
    pool, k_cache, v_cache = _caches(6, 3, 16, d, dtype, "NHD", gen)
    pages, slots = _places(50, 6, 16, gen, torch.int32)
    k, v = (torch.randn(50, 3, d, generator=gen).to(dtype) for _ in range(2))
    _assert_bit_identical(*_run_both(pool, k_cache, v_cache, k, v, pages, slots, "NHD"))


@pytest.mark.parametrize("offset", [1, 2, 4])
def test_misaligned_starts_fall_back_to_narrow_copies(offset):
    """k, v and the caches starting `offset` elements past a 16-byte boundary."""
    gen = _gen("misaligned", offset)
    d, hkv, page, num_pages, n = 64, 2, 16, 4, 30
    k_big, v_big = (torch.randn(n * hkv * d + offset, generator=gen).half() for _ in range(2))
    k = k_big[offset:].view(n, hkv, d)
    v = v_big[offset:].view(n, hkv, d)
    tile = num_pages * hkv * page * d
    pool_flat = torch.randn(2 * tile + offset, generator=gen).half()
    pool = pool_flat[offset:].view(1, 2, num_pages, hkv, page, d)
    pages, slots = _places(n, num_pages, page, gen)
    pool_gpu = _like_on_cuda(pool)
    ops.store_kv(
        _like_on_cuda(k),
        _like_on_cuda(v),
        pool_gpu[0, 0],
        pool_gpu[0, 1],
        pages.cuda(),
        slots.cuda(),
        "HND",
    )
    ops.store_kv(k, v, pool[0, 0], pool[0, 1], pages, slots, "HND")
    _assert_bit_identical(pool, pool_gpu.cpu())


@pytest.mark.parametrize("kind", ["fused", "transposed", "expanded"])
def test_strided_inputs(kind):
    gen = _gen("strided", kind)
    n, hkv, d = 33, 4, 128
    if kind == "fused":  # k and v slices of one qkv projection [n, Hq + 2 Hkv, D]
        qkv = torch.randn(n, 8 + 2 * hkv, d, generator=gen).bfloat16()
        k, v = qkv[:, 8 : 8 + hkv], qkv[:, 8 + hkv :]
    elif kind == "transposed":
        k, v = (torch.randn(hkv, n, d, generator=gen).bfloat16().transpose(0, 1) for _ in range(2))
    else:
        k, v = (
            torch.randn(1, hkv, d, generator=gen).bfloat16().expand(n, hkv, d) for _ in range(2)
        )
    pool, k_cache, v_cache = _caches(5, hkv, 16, d, torch.bfloat16, "HND", gen)
    pages, slots = _places(n, 5, 16, gen)
    _assert_bit_identical(*_run_both(pool, k_cache, v_cache, k, v, pages, slots, "HND"))


@pytest.mark.parametrize("kv_layout", ["HND", "NHD"])
def test_out_of_range_entries_are_skipped(kv_layout):
    """With validate=False the kernel skips bad (page, slot) entries and never writes past the
    caches: guard pages around them keep their bytes."""
    gen = _gen("skip", kv_layout)
    n, hkv, page, d, num_pages = 40, 2, 16, 64, 4
    guard, tile = 2, (hkv, page) if kv_layout == "HND" else (page, hkv)
    big = torch.randn(2, num_pages + 2 * guard, *tile, d, generator=gen).bfloat16()
    pages, slots = _places(n, num_pages, page, gen)
    bad = torch.zeros(n, dtype=torch.bool)
    for i, (p, s) in enumerate([(-1, 0), (num_pages, 3), (guard + 1, -1), (0, page), (-3, -3)]):
        pages[7 * i], slots[7 * i] = p, s
        bad[7 * i] = True
    k, v = (torch.randn(n, hkv, d, generator=gen).bfloat16() for _ in range(2))
    big_gpu = big.cuda()
    inner = slice(guard, guard + num_pages)
    ops.store_kv(
        k.cuda(),
        v.cuda(),
        big_gpu[0, inner],
        big_gpu[1, inner],
        pages.cuda(),
        slots.cuda(),
        kv_layout,
        validate=False,
    )
    good = ~bad
    ops.store_kv(
        k[good], v[good], big[0, inner], big[1, inner], pages[good], slots[good], kv_layout
    )
    torch.cuda.synchronize()
    _assert_bit_identical(big, big_gpu.cpu())


def test_validate_catches_out_of_range_on_the_host():
    gen = _gen("validate")
    _, k_cache, v_cache = _caches(3, 2, 16, 64, torch.float16, "HND", gen)
    k, v = (torch.randn(4, 2, 64, generator=gen).half().cuda() for _ in range(2))
    pages = torch.tensor([0, 2, 3, 1], device="cuda")
    slots = torch.tensor([0, 1, 2, 3], device="cuda")
    caches = k_cache.cuda(), v_cache.cuda()
    with pytest.raises(
        IndexError,
        match=r"^dustin\.store_kv: pages\[2\] must be a page in "
        r"\[0, num_pages\) = \[0, 3\), got 3$",
    ):
        ops.store_kv(k, v, *caches, pages, slots, "HND")
    pages[2], slots[1] = 2, 16
    with pytest.raises(
        IndexError,
        match=r"^dustin\.store_kv: slots\[1\] must be a slot in "
        r"\[0, P\) = \[0, 16\), got 16$",
    ):
        ops.store_kv(k, v, *caches, pages, slots, "HND")


def test_graph_capture_and_replay():
    """store_kv inside a CUDA graph (no host sync, no allocation): new k, v, pages and slots in
    the same buffers between replays."""
    gen = _gen("graph")
    n, hkv, page, d, num_pages = 80, 4, 16, 128, 12
    pool, _, _ = _caches(num_pages, hkv, page, d, torch.bfloat16, "HND", gen)
    pool_gpu = pool.cuda()
    k = torch.randn(n, hkv, d, generator=gen).bfloat16().cuda()
    v = torch.randn(n, hkv, d, generator=gen).bfloat16().cuda()
    pages, slots = (t.cuda() for t in _places(n, num_pages, page, gen))
    args = (k, v, pool_gpu[1, 0], pool_gpu[1, 1], pages, slots, "HND")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.store_kv(*args)  # warm-up outside capture (validate=True runs here)
    torch.cuda.current_stream().wait_stream(stream)
    # The warm-up wrote the first window: the reference pool gets it too.
    ops.store_kv(k.cpu(), v.cpu(), pool[1, 0], pool[1, 1], pages.cpu(), slots.cpu(), "HND")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.store_kv(*args)  # validate=True is skipped during capture
    for _ in range(2):
        new_k, new_v = (torch.randn(n, hkv, d, generator=gen).bfloat16() for _ in range(2))
        new_pages, new_slots = _places(n, num_pages, page, gen)
        for buffer, value in ((k, new_k), (v, new_v), (pages, new_pages), (slots, new_slots)):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        ops.store_kv(new_k, new_v, pool[1, 0], pool[1, 1], new_pages, new_slots, "HND")
        _assert_bit_identical(pool, pool_gpu.cpu())


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_cache_store_matches_indexing(layout, dtype):
    gen = _gen("cache", layout, dtype)
    cache = PagedKVCache(2, 4, 64, 3, 200, page_size=16, layout=layout, dtype=dtype, device="cuda")
    assert cache._store_with_op
    fallback = cache.clone()
    fallback._store_with_op = False
    for n, seqs in [(37, None), (5, [1]), (1, [0, 2])]:
        for c in (cache, fallback):
            c.append(n, seqs)
        rows = 3 if seqs is None else len(seqs)
        for layer in range(2):
            k, v = (torch.randn(rows, n, 4, 64, generator=gen).cuda() for _ in range(2))
            cache.write(layer, k, v)
            fallback.write(layer, k, v)
    torch.cuda.synchronize()
    _assert_bit_identical(fallback._pool.cpu(), cache._pool.cpu())
