# SPDX-License-Identifier: Apache-2.0
"""block_scores on CUDA against a float64 reference: both layouts, D 64/128, bf16/fp16, cache
page size != score block size, block sizes for both partial paths (fragment: multiples of 8;
scan: the rest), shared and distinct KV heads, multi-split contexts; accumulation, determinism,
the workspace contract and CUDA-graph capture."""

import subprocess
import sys

import pytest
import torch

import reference
from conftest import make_paged_cache
from dustin import ops

pytestmark = pytest.mark.cuda

# Relative error bound of float32 math against float64 (issue 4, docs gpu.md).
REL_TOL = 1e-5


CASES = [
    # layout, D, dtype, page, block size, head_map, n, kv_lens, pooled k/v
    ("HND", 128, torch.bfloat16, 16, 16, [0, 1, 2, 3], 5, [37, 3000, 9000], False),
    ("NHD", 128, torch.bfloat16, 16, 64, [0, 0, 0, 0], 5, [4096, 513, 6001], True),
    ("HND", 64, torch.float16, 32, 16, [1, 1, 0], 4, [2049, 5000, 64], True),
    ("NHD", 64, torch.bfloat16, 7, 48, [2, 0, 2, 1], 3, [100, 7777, 1], False),
    ("HND", 128, torch.float16, 128, 1, [0, 2], 6, [300, 1500, 4100], False),
    ("NHD", 128, torch.bfloat16, 1, 128, [3, 3, 1, 1, 0, 0, 2, 2], 16, [5000, 16, 2222], False),
    # Partials of 8 keys (block 8; block 24 straddles the 64-key tiles), and the scan path
    # for a block size that is not a multiple of 8.
    ("HND", 128, torch.bfloat16, 16, 8, [0, 1], 5, [1000, 70, 4097], False),
    ("NHD", 64, torch.float16, 16, 24, [1, 0, 1], 2, [3001, 24, 777], True),
    ("HND", 64, torch.bfloat16, 8, 12, [0, 0], 7, [1234, 12, 2500], False),
    # Pages shorter than a warp's 16 keys of a tile: the fragment path's per-key page lookups.
    ("HND", 128, torch.bfloat16, 8, 16, [0, 1], 5, [1000, 4097, 63], False),
]


@pytest.mark.parametrize("layout,d,dtype,page,bs,head_map,n,kv_lens,pooled", CASES)
def test_matches_float64_reference(layout, d, dtype, page, bs, head_map, n, kv_lens, pooled):
    gen = torch.Generator().manual_seed(len(kv_lens) * 1000 + d + page + bs)
    kv_lens = [max(length, n) for length in kv_lens]
    cache = make_paged_cache(kv_lens, page, 4, d, dtype, layout, generator=gen, pooled=pooled)
    q = torch.randn(len(kv_lens), n, len(head_map), d, generator=gen).to(dtype)
    head_map_t = torch.tensor(head_map, dtype=torch.int32)
    nb = (max(kv_lens) + bs - 1) // bs + 2  # spare columns past every sequence
    sm_scale = d**-0.5
    args = (cache.k_cache, cache.block_table, cache.kv_lens, head_map_t, sm_scale, bs, layout)
    ref = reference.block_scores(q, *args, nb)

    # Columns past each sequence's blocks are poisoned: the op must leave them alone.
    poison = 7.0
    scores = torch.zeros(len(kv_lens), nb)
    for b, length in enumerate(kv_lens):
        scores[b, (length + bs - 1) // bs :] = poison
    valid = scores != poison
    cpu = scores.clone()
    ops.block_scores(q, *args, cpu)  # the CPU twin, compared at the end
    out = scores.cuda()
    ops.block_scores(q.cuda(), *[a.cuda() if torch.is_tensor(a) else a for a in args], out)
    out = out.cpu()
    assert torch.all(out[~valid] == poison), "blocks past a sequence were written"
    out = torch.where(valid, out, 0.0)
    err = reference.relative_error(out, ref)
    assert err < REL_TOL, f"relative error {err:.2e}"
    # Each query's softmax sums to one, so every sequence's scores total Hs * n.
    totals = out.double().sum(1)
    torch.testing.assert_close(totals, torch.full_like(totals, len(head_map) * n), rtol=1e-5, atol=0)
    assert reference.relative_error(torch.where(valid, cpu, 0.0), out) < REL_TOL, "CPU twin differs"


def test_accumulates_and_is_deterministic():
    gen = torch.Generator().manual_seed(11)
    kv_lens = [7000, 12000]
    cache = make_paged_cache(kv_lens, 16, 2, 128, torch.bfloat16, "HND", generator=gen)
    q = torch.randn(2, 5, 4, 128, generator=gen).to(torch.bfloat16)
    args = [t.cuda() for t in (q, cache.k_cache, cache.block_table, cache.kv_lens)]
    head_map = torch.tensor([0, 1, 1, 0], dtype=torch.int32, device="cuda")
    nb = 12000 // 16
    first = torch.zeros(2, nb, device="cuda")
    ops.block_scores(*args, head_map, 128**-0.5, 16, "HND", first)
    again = torch.zeros(2, nb, device="cuda")
    ops.block_scores(*args, head_map, 128**-0.5, 16, "HND", again)
    assert torch.equal(first, again), "two runs differ: the sums are not deterministic"
    ops.block_scores(*args, head_map, 128**-0.5, 16, "HND", again)  # a second layer
    assert torch.equal(again, 2 * first)


def test_graph_capture_with_workspace():
    gen = torch.Generator().manual_seed(5)
    kv_lens = [3000, 5000]
    cache = make_paged_cache(kv_lens, 16, 2, 64, torch.float16, "NHD", generator=gen)
    q = torch.randn(2, 4, 2, 64, generator=gen).to(torch.float16)
    args = [t.cuda() for t in (q, cache.k_cache, cache.block_table, cache.kv_lens)]
    head_map = torch.tensor([1, 0], dtype=torch.int32, device="cuda")
    nb = 5000 // 16 + 1
    expected = torch.zeros(2, nb, device="cuda")
    ops.block_scores(*args, head_map, 0.125, 16, "NHD", expected)

    nbytes = 2 * 2 * 4 * 8 * (nb + 64)  # generous: B * Hs * n * float2 * (NB + splits)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    scores = torch.zeros_like(expected)
    ops.block_scores(*args, head_map, 0.125, 16, "NHD", scores, workspace, validate=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.block_scores(*args, head_map, 0.125, 16, "NHD", scores, workspace, validate=False)
    scores.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(scores, expected)


# Run in a child process: a crash on bad input must fail this test, not end the session.
_SMALL_WORKSPACE = """
import torch, dustin
from dustin import ops
q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(4, 1, 16, 64, device="cuda", dtype=torch.bfloat16)
table = torch.arange(4, dtype=torch.int32, device="cuda").view(1, 4)
lens = torch.tensor([60], dtype=torch.int32, device="cuda")
head_map = torch.zeros(1, dtype=torch.int32, device="cuda")
scores = torch.zeros(1, 4, device="cuda")
try:
    ops.block_scores(q, k, table, lens, head_map, 0.125, 16, "HND", scores,
                     torch.empty(16, dtype=torch.uint8, device="cuda"))
except ValueError as exc:
    assert "workspace" in str(exc), exc
    print("raised ValueError")
"""


def test_small_workspace_is_an_error():
    child = subprocess.run([sys.executable, "-c", _SMALL_WORKSPACE], capture_output=True, text=True)
    assert child.returncode == 0 and "raised ValueError" in child.stdout, (
        f"exit {child.returncode}: {child.stdout[-500:]} {child.stderr[-2000:]}"
    )
