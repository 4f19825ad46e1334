# SPDX-License-Identifier: Apache-2.0
"""block_scores on CUDA against a float64 reference: both layouts, D 64/128, bf16/fp16, cache
page size != score block size, shared and distinct KV heads, multi-split contexts; accumulation,
determinism, the workspace contract and CUDA-graph capture."""

import pytest
import torch

import dustin
from dustin import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and dustin.built_with_cuda()),
        reason="needs a CUDA GPU and a libdustin built with CUDA",
    ),
]

# Relative error bound of float32 math against float64 (issue 4, docs gpu.md).
REL_TOL = 1e-5


def _paged_cache(kv_lens, page, hkv, d, dtype, layout, gen):
    """Random keys in a shuffled page pool; returns (k_cache, block_table)."""
    batch = len(kv_lens)
    max_pages = (max(kv_lens) + page - 1) // page + 1  # a spare column past every length
    num_pages = batch * max_pages + 3
    shape = (num_pages, hkv, page, d) if layout == "HND" else (num_pages, page, hkv, d)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    table = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
    return k_cache, table.view(batch, max_pages).to(torch.int32)


def _reference(q, k_cache, table, kv_lens, head_map, sm_scale, bs, layout, nb):
    """float64 block scores from the same 16-bit values."""
    batch, n, hs, d = q.shape
    page = k_cache.shape[2] if layout == "HND" else k_cache.shape[1]
    out = torch.zeros(batch, nb, dtype=torch.float64)
    for b in range(batch):
        length = int(kv_lens[b])
        pages = table[b, : (length + page - 1) // page].long()
        kb = k_cache[pages].double()  # [pages, Hkv, P, D] or [pages, P, Hkv, D]
        keys = kb.permute(1, 0, 2, 3) if layout == "HND" else kb.permute(2, 0, 1, 3)
        keys = keys.reshape(keys.shape[0], -1, d)[:, :length]  # [Hkv, L, D]
        for h in range(hs):
            logits = sm_scale * q[b, :, h].double() @ keys[int(head_map[h])].T  # [n, L]
            pos = torch.arange(length)
            qpos = length - n + torch.arange(n)
            logits = logits.masked_fill(pos[None, :] > qpos[:, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1).sum(0)  # [L]
            nblk = (length + bs - 1) // bs
            padded = torch.zeros(nblk * bs, dtype=torch.float64)
            padded[:length] = probs
            out[b, :nblk] += padded.view(nblk, bs).sum(-1)
    return out


def _rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


CASES = [
    # layout, D, dtype, page, block size, head_map, n, kv_lens
    ("HND", 128, torch.bfloat16, 16, 16, [0, 1, 2, 3], 5, [37, 3000, 9000]),
    ("NHD", 128, torch.bfloat16, 16, 64, [0, 0, 0, 0], 5, [4096, 513, 6001]),
    ("HND", 64, torch.float16, 32, 16, [1, 1, 0], 4, [2049, 5000, 64]),
    ("NHD", 64, torch.bfloat16, 7, 48, [2, 0, 2, 1], 3, [100, 7777, 1]),
    ("HND", 128, torch.float16, 128, 1, [0, 2], 6, [300, 1500, 4100]),
    ("NHD", 128, torch.bfloat16, 1, 128, [3, 3, 1, 1, 0, 0, 2, 2], 16, [5000, 16, 2222]),
]


@pytest.mark.parametrize("layout,d,dtype,page,bs,head_map,n,kv_lens", CASES)
def test_matches_float64_reference(layout, d, dtype, page, bs, head_map, n, kv_lens):
    gen = torch.Generator().manual_seed(len(kv_lens) * 1000 + d + page + bs)
    kv_lens = [max(length, n) for length in kv_lens]
    hkv = 4
    k_cache, table = _paged_cache(kv_lens, page, hkv, d, dtype, layout, gen)
    q = torch.randn(len(kv_lens), n, len(head_map), d, generator=gen).to(dtype)
    head_map_t = torch.tensor(head_map, dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    nb = (max(kv_lens) + bs - 1) // bs + 2  # spare columns past every sequence
    sm_scale = d**-0.5
    ref = _reference(q, k_cache, table, lens, head_map_t, sm_scale, bs, layout, nb)

    # Columns past each sequence's blocks are poisoned: the op must leave them alone.
    poison = 7.0
    scores = torch.zeros(len(kv_lens), nb)
    for b, length in enumerate(kv_lens):
        scores[b, (length + bs - 1) // bs :] = poison
    dev = [t.cuda() for t in (q, k_cache, table, lens, head_map_t)]
    out = scores.cuda()
    ops.block_scores(*dev[:4], dev[4], sm_scale, bs, layout, out)
    out = out.cpu()
    valid = scores != poison
    assert torch.all(out[~valid] == poison), "blocks past a sequence were written"
    err = _rel_err(torch.where(valid, out, 0.0), ref)
    assert err < REL_TOL, f"relative error {err:.2e}"
    # Each query's softmax sums to one, so every sequence's scores total Hs * n.
    totals = torch.where(valid, out, 0.0).double().sum(1)
    torch.testing.assert_close(totals, torch.full_like(totals, len(head_map) * n), rtol=1e-5, atol=0)

    # The CPU twin agrees to float32 rounding.
    cpu = scores.clone()
    ops.block_scores(q, k_cache, table, lens, head_map_t, sm_scale, bs, layout, cpu)
    assert _rel_err(torch.where(valid, cpu, 0.0), torch.where(valid, out, 0.0).double()) < REL_TOL


def test_accumulates_and_is_deterministic():
    gen = torch.Generator().manual_seed(11)
    kv_lens = [7000, 12000]
    k_cache, table = _paged_cache(kv_lens, 16, 2, 128, torch.bfloat16, "HND", gen)
    q = torch.randn(2, 5, 4, 128, generator=gen).to(torch.bfloat16)
    args = [t.cuda() for t in (q, k_cache, table, torch.tensor(kv_lens, dtype=torch.int32))]
    head_map = torch.tensor([0, 1, 1, 0], dtype=torch.int32, device="cuda")
    nb = 12000 // 16
    first = torch.zeros(2, nb, device="cuda")
    ops.block_scores(*args, head_map, 128**-0.5, 16, "HND", first)
    again = torch.zeros(2, nb, device="cuda")
    ops.block_scores(*args, head_map, 128**-0.5, 16, "HND", again)
    assert torch.equal(first, again), "two runs differ: the sums are not deterministic"
    ops.block_scores(*args, head_map, 128**-0.5, 16, "HND", again)  # a second layer
    assert torch.equal(again, 2 * first)


def test_workspace_contract_and_graph_capture():
    gen = torch.Generator().manual_seed(5)
    kv_lens = [3000, 5000]
    k_cache, table = _paged_cache(kv_lens, 16, 2, 64, torch.float16, "NHD", gen)
    q = torch.randn(2, 4, 2, 64, generator=gen).to(torch.float16)
    args = [t.cuda() for t in (q, k_cache, table, torch.tensor(kv_lens, dtype=torch.int32))]
    head_map = torch.tensor([1, 0], dtype=torch.int32, device="cuda")
    nb = 5000 // 16 + 1
    expected = torch.zeros(2, nb, device="cuda")
    ops.block_scores(*args, head_map, 0.125, 16, "NHD", expected)

    with pytest.raises(ValueError, match="workspace"):
        small = torch.empty(16, dtype=torch.uint8, device="cuda")
        ops.block_scores(*args, head_map, 0.125, 16, "NHD", torch.zeros_like(expected), small)

    nbytes = 2 * 2 * 4 * 8 * (nb + 64)  # generous: B * Hs * n * float2 * (NB + splits)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    scores = torch.zeros_like(expected)
    graph = torch.cuda.CUDAGraph()
    ops.block_scores(*args, head_map, 0.125, 16, "NHD", scores, workspace, validate=False)
    scores.zero_()
    with torch.cuda.graph(graph):
        ops.block_scores(*args, head_map, 0.125, 16, "NHD", scores, workspace, validate=False)
    scores.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(scores, expected)
