# SPDX-License-Identifier: Apache-2.0
"""select_blocks on CUDA is bit-identical to the CPU twin: random and tie-heavy scores, every
budget regime, per-sequence and per-KV-head lists, both the shared-memory and the long-list path."""

import zlib

import pytest
import torch

from dustin import ops

pytestmark = pytest.mark.cuda

# Largest NB whose keys the kernel stages in shared memory (select_blocks.cuh).
SMEM_KEY_BLOCKS = 16384


def _scores(shape, kind: str, gen: torch.Generator) -> torch.Tensor:
    """float32 scores: "random" (distinct), "ties" (few values, signed zeros, NaN, +-inf)."""
    if kind == "random":
        return torch.rand(shape, generator=gen)
    values = torch.tensor(
        [0.0, -0.0, 1.0, 2.0, -1.0, float("nan"), float("inf"), float("-inf"), 0.5],
        dtype=torch.float32,
    )
    return values[torch.randint(0, len(values), shape, generator=gen)]


def _run_both(draft, target, kv_lens, q_len, bs, budget, n_sink, n_recent, share):
    args = (q_len, bs, budget, n_sink, n_recent, share)
    ids_cpu, counts_cpu = ops.select_blocks(draft, target, kv_lens, *args)
    ids_gpu, counts_gpu = ops.select_blocks(
        draft.cuda(), None if target is None else target.cuda(), kv_lens.cuda(), *args
    )
    return (ids_cpu, counts_cpu), (ids_gpu.cpu(), counts_gpu.cpu())


def _assert_identical(cpu, gpu):
    (ids_cpu, counts_cpu), (ids_gpu, counts_gpu) = cpu, gpu
    assert torch.equal(counts_gpu, counts_cpu), (counts_gpu, counts_cpu)
    mismatch = (ids_gpu != ids_cpu).nonzero()
    assert mismatch.numel() == 0, f"ids differ at {mismatch[:5].tolist()}"


def _lens(batch: int, nb: int, bs: int, q_len: int, gen: torch.Generator) -> torch.Tensor:
    """Different lengths across the batch, the longest filling all NB blocks."""
    lens = torch.randint(q_len, nb * bs + 1, (batch,), generator=gen, dtype=torch.int32)
    lens[0] = nb * bs
    if batch > 1:
        lens[1] = max(q_len, (nb - 1) * bs + 1)  # a partly filled last block
    return lens


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("bs", [1, 16, 64])
def test_matches_cpu_every_budget(kind, per_head, with_target, bs):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, per_head, with_target, bs)).encode()))
    batch, heads, q_len = 5, 3, 5
    nb = max(8, 4096 // bs)
    shape = (batch, heads, nb) if per_head else (batch, nb)
    draft = _scores(shape, kind, gen)
    target = _scores(shape, kind, gen) if with_target else None
    kv_lens = _lens(batch, nb, bs, q_len, gen)
    for budget in (0, 1, 7, nb // 3, nb, nb + 5):  # none past forced ... more than all
        for share in (0.0, 0.37, 1.0):
            cpu, gpu = _run_both(draft, target, kv_lens, q_len, bs, budget, 4, 16, share)
            _assert_identical(cpu, gpu)


@pytest.mark.parametrize("bs", [1, 16])
def test_sink_and_recent_overlap_the_window(bs):
    """Sink and recent spans that overlap each other and the window, short sequences."""
    gen = torch.Generator().manual_seed(7)
    batch, q_len, nb = 6, 9, 64
    draft, target = _scores((batch, nb), "ties", gen), _scores((batch, nb), "random", gen)
    kv_lens = torch.tensor([q_len, q_len + 1, 20, 33, 100, nb * bs], dtype=torch.int32)
    kv_lens = kv_lens.clamp(max=nb * bs)
    for n_sink, n_recent in [(0, 0), (4, 16), (40, 40), (nb * bs, 0), (0, nb * bs)]:
        for budget in (0, 3, nb):
            cpu, gpu = _run_both(draft, target, kv_lens, q_len, bs, budget, n_sink, n_recent, 0.5)
            _assert_identical(cpu, gpu)


@pytest.mark.parametrize("nb", [SMEM_KEY_BLOCKS, SMEM_KEY_BLOCKS + 1, 131072])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_long_lists(nb, kind):
    """The shared-memory path at its limit and the global-memory path up to 128k blocks."""
    gen = torch.Generator().manual_seed(nb + (kind == "ties"))
    batch, heads, q_len = 2, 2, 5
    draft = _scores((batch, heads, nb), kind, gen)
    target = _scores((batch, heads, nb), kind, gen)
    kv_lens = _lens(batch, nb, 1, q_len, gen)
    for budget in (2048, nb // 2):
        cpu, gpu = _run_both(draft, target, kv_lens, q_len, 1, budget, 4, 16, 0.25)
        _assert_identical(cpu, gpu)


def test_ties_resolve_to_lower_ids():
    """All-equal scores: the lowest free ids win; an independent check of the rule."""
    nb, bs, q_len = 100, 1, 1
    draft = torch.zeros(1, nb)
    kv_lens = torch.tensor([nb], dtype=torch.int32)
    ids, counts = ops.select_blocks(draft.cuda(), None, kv_lens.cuda(), q_len, bs, 10, 2, 3, 1.0)
    # forced: [0, 2) and the last n_recent + q_len = 4 tokens [96, 100); free picks 2..5.
    expected = [0, 1, 2, 3, 4, 5, 96, 97, 98, 99]
    assert counts.item() == 10
    assert ids[0, :10].tolist() == expected


def test_nan_ranks_below_minus_infinity():
    nb = 8
    draft = torch.tensor([[float("nan"), float("-inf"), float("nan"), 1.0, -0.0, 0.0, 2.0, 3.0]])
    kv_lens = torch.tensor([nb], dtype=torch.int32)
    ids, counts = ops.select_blocks(draft.cuda(), None, kv_lens.cuda(), 1, 1, 7, 0, 0, 1.0)
    # window block 7 is forced; then 6, 3, then the tied zeros (4 before 5), then -inf, then NaN 0.
    assert counts.item() == 7
    assert ids[0].tolist() == [0, 1, 3, 4, 5, 6, 7]


def test_graph_capture_and_replay():
    """select_blocks_out runs inside a CUDA graph (no host sync, no allocation)."""
    gen = torch.Generator().manual_seed(3)
    batch, nb, bs, q_len, budget = 4, 2048, 16, 5, 32
    draft = torch.rand(batch, nb, generator=gen).cuda()
    target = torch.rand(batch, nb, generator=gen).cuda()
    kv_lens = _lens(batch, nb, bs, q_len, gen).cuda()
    k = ops.select_capacity(nb, budget, 4, 16, q_len, bs)
    ids = torch.full((batch, k), -7, dtype=torch.int32, device="cuda")
    counts = torch.full((batch,), -7, dtype=torch.int32, device="cuda")
    args = (draft, target, kv_lens, q_len, bs, budget, 4, 16, 0.5)
    ops.select_blocks_out(*args, ids, counts, validate=False)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.select_blocks_out(*args, ids, counts, validate=False)
    draft.copy_(torch.rand(batch, nb, generator=gen))  # new scores, same buffers
    ids.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    expected = ops.select_blocks(draft.cpu(), target.cpu(), kv_lens.cpu(), q_len, bs, budget, 4, 16, 0.5)
    _assert_identical(expected, (ids.cpu(), counts.cpu()))
