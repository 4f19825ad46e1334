# SPDX-License-Identifier: Apache-2.0
"""Op registration: torch.library.opcheck, Meta shapes against real outputs, torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import make_block_lists, make_paged_cache
from dustin import ops

SM_SCALE = 0.125


def verify_inputs(dtype=torch.bfloat16, kv_layout="HND", per_head=False):
    gen = torch.Generator().manual_seed(0)
    cache = make_paged_cache([45, 20], 16, 2, 64, dtype, kv_layout, generator=gen)
    q = torch.randn(2, 3, 4, 64, generator=gen).to(dtype)
    block_ids, block_counts = make_block_lists([45, 20], 16, 2 if per_head else None, gen)
    return (
        q,
        cache.k_cache,
        cache.v_cache,
        cache.block_table,
        cache.kv_lens,
        block_ids,
        block_counts,
        SM_SCALE,
        kv_layout,
    )


def scores_inputs(dtype=torch.bfloat16, kv_layout="NHD"):
    gen = torch.Generator().manual_seed(1)
    cache = make_paged_cache([45, 20], 16, 2, 64, dtype, kv_layout, generator=gen)
    q_srh = torch.randn(2, 3, 3, 64, generator=gen).to(dtype)
    head_map = torch.tensor([0, 1, 1], dtype=torch.int32)
    return (
        q_srh,
        cache.k_cache,
        cache.block_table,
        cache.kv_lens,
        head_map,
        SM_SCALE,
        8,
        kv_layout,
        torch.rand(2, 7, generator=gen),
    )


def select_inputs(per_head=False, with_target=True):
    gen = torch.Generator().manual_seed(2)
    shape = (2, 3, 12) if per_head else (2, 12)
    target = torch.randn(shape, generator=gen) if with_target else None
    kv_lens = torch.tensor([90, 33], dtype=torch.int32)
    return (torch.randn(shape, generator=gen), target, kv_lens, 3, 8, 4, 4, 8, 0.5)


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck_sparse_verify(kv_layout, per_head):
    args = verify_inputs(kv_layout=kv_layout, per_head=per_head)
    torch.library.opcheck(torch.ops.dustin.sparse_verify.default, args)
    out = torch.empty_like(args[0])
    lse = torch.empty(args[0].shape[:3])
    torch.library.opcheck(torch.ops.dustin.sparse_verify_out.default, (*args, out, lse, None))


def test_opcheck_block_scores():
    torch.library.opcheck(torch.ops.dustin.block_scores.default, (*scores_inputs(), None))


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("with_target", [False, True])
def test_opcheck_select_blocks(per_head, with_target):
    args = select_inputs(per_head, with_target)
    torch.library.opcheck(torch.ops.dustin.select_blocks.default, args)
    ids, counts = ops.select_blocks(*args)
    torch.library.opcheck(
        torch.ops.dustin.select_blocks_out.default,
        (*args, torch.empty_like(ids), torch.empty_like(counts)),
    )


def store_inputs(dtype=torch.bfloat16, kv_layout="HND", index_dtype=torch.int64):
    """store_kv arguments: N = 6 tokens, Hkv = 2, D = 64, P = 16, 5 pages."""
    gen = torch.Generator().manual_seed(4)
    tile = (2, 16) if kv_layout == "HND" else (16, 2)
    flat = torch.randperm(5 * 16, generator=gen)[:6]
    return (
        torch.randn(6, 2, 64, generator=gen).to(dtype),
        torch.randn(6, 2, 64, generator=gen).to(dtype),
        torch.randn(5, *tile, 64, generator=gen).to(dtype),
        torch.randn(5, *tile, 64, generator=gen).to(dtype),
        (flat // 16).to(index_dtype),
        (flat % 16).to(index_dtype),
        kv_layout,
    )


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_opcheck_store_kv(kv_layout, index_dtype):
    args = store_inputs(kv_layout=kv_layout, index_dtype=index_dtype)
    torch.library.opcheck(torch.ops.dustin.store_kv.default, args)


def to_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


def assert_same_layout(meta: torch.Tensor, real: torch.Tensor):
    assert meta.device.type == "meta"
    assert (meta.shape, meta.dtype, meta.stride()) == (real.shape, real.dtype, real.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_head", [False, True])
def test_meta_shapes_match_sparse_verify(dtype, per_head):
    args = verify_inputs(dtype, per_head=per_head)
    real = ops.sparse_verify(*args)
    meta = torch.ops.dustin.sparse_verify(*to_meta(args))
    for m, r in zip(meta, real):
        assert_same_layout(m, r)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("num_blocks", [1, 3, 12, 40])
def test_meta_shapes_match_select_blocks(per_head, num_blocks):
    draft, _, _, *scalars = select_inputs(per_head)
    draft = draft[..., :1].expand(*draft.shape[:-1], num_blocks).contiguous()
    kv_lens = torch.tensor([3, 8 * num_blocks], dtype=torch.int32)
    args = (draft, None, kv_lens, *scalars)
    real = ops.select_blocks(*args)
    meta = torch.ops.dustin.select_blocks(*to_meta(args))
    for m, r in zip(meta, real):
        assert_same_layout(m, r)


def test_store_kv_meta_accepts_meta_tensors():
    args = to_meta(store_inputs(torch.float16, "NHD"))
    torch.ops.dustin.store_kv(*args)  # no output; only the checks run


def test_compile_store_kv_fullgraph_on_cpu():
    k, v, k_cache, v_cache, pages, slots, kv_layout = store_inputs(torch.float32)

    def step(k, v, k_cache, v_cache, pages, slots):
        ops.store_kv(k * 2, v, k_cache, v_cache, pages, slots, kv_layout)
        return k_cache.sum()

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = step(k, v, expected_k, expected_v, pages, slots)
    torch._dynamo.reset()
    actual = torch.compile(step, fullgraph=True, backend="aot_eager")(
        k, v, k_cache, v_cache, pages, slots
    )
    torch.testing.assert_close(actual, expected)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_compile_fullgraph_on_cpu():
    q, k_cache, v_cache, block_table, kv_lens, _, _, sm_scale, kv_layout = verify_inputs(
        torch.float32
    )
    gen = torch.Generator().manual_seed(3)
    draft = torch.randn(2, 3, generator=gen)  # P = 16: 45 tokens -> 3 blocks
    head_map = torch.tensor([1], dtype=torch.int32)

    def step(q, k_cache, v_cache, block_table, kv_lens, draft):
        scores = torch.zeros(2, 3)
        ops.block_scores(
            q[:, :, :1], k_cache, block_table, kv_lens, head_map, sm_scale, 16, kv_layout, scores
        )
        ids, counts = ops.select_blocks(scores + draft, None, kv_lens, 3, 16, 2, 0, 0, 1.0)
        out, lse = ops.sparse_verify(
            q, k_cache, v_cache, block_table, kv_lens, ids, counts, sm_scale, kv_layout
        )
        return out * 2, lse, ids

    args = (q, k_cache, v_cache, block_table, kv_lens, draft)
    expected = step(*args)
    torch._dynamo.reset()
    # aot_eager: dynamo capture, fake-tensor propagation through the Meta kernels and
    # functionalisation of the mutating ops, without depending on a host C++ toolchain.
    actual = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
