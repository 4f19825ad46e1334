# SPDX-License-Identifier: Apache-2.0
"""The CUDA sparse_verify kernel against a float64 reference and the CPU twin.

Fresh random inputs every run (the seed is in each failure message), outputs poisoned first.
Covers both dtypes, head dims and layouts, page sizes 1/8/16/64/128, G in {1, 4, 6, 7, 8, 16},
q in {1, 2, 5, 8, 16}, lengths that are not multiples of P, empty, full and random lists, per-KV-
head lists, split and unsplit launches, query rows beyond one CTA (G * q > 64), B up to 64,
CUDA-graph replay, and ids or lengths outside the contract (skipped or clamped, never read).
On Hopper, 64-row CTAs (G * q > 16) run as two warpgroups when the grid has at most one CTA per
SM (the small batches here) and as one warpgroup otherwise (B = 64 in
test_batches_and_row_chunks and test_split_and_unsplit_paths_agree): both kernels are covered.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import reference
import torch
from conftest import PagedCache, fresh_generator, make_block_lists, make_paged_cache
from dustin import ops

# conftest skips `cuda` tests with the reason when no GPU or no CUDA build is present.
pytestmark = pytest.mark.cuda

GROUPS = (1, 4, 6, 7, 8, 16)
QUERY_LENS = (1, 2, 5, 8, 16)
PAGE_SIZES = (1, 8, 16, 64, 128)
LIST_MODES = ("random", "full", "empty")
# ||out - ref|| / ||ref|| bounds (P is rounded to the input dtype before P V) and lse bounds.
OUT_RTOL = {torch.bfloat16: 1e-2, torch.float16: 4e-3}
LSE_ATOL = 2e-3


@dataclass
class Case:
    q: torch.Tensor
    cache: PagedCache
    ids: torch.Tensor
    counts: torch.Tensor
    scale: float

    def args(self):
        c = self.cache
        return (
            self.q,
            c.k_cache,
            c.v_cache,
            c.block_table,
            c.kv_lens,
            self.ids,
            self.counts,
            self.scale,
            c.kv_layout,
        )

    def workspace_bytes(self) -> int:
        c = self.cache
        return ops.sparse_verify_workspace_bytes(
            self.q, c.k_cache, c.block_table, self.ids, c.kv_layout
        )

    def to_cpu(self) -> tuple:
        return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in self.args())


def make_case(
    gen: torch.Generator,
    *,
    batch: int,
    q_len: int,
    group: int,
    num_kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    layout: str,
    mode: str,
    per_head: bool,
    max_len: int = 700,
    min_len: int = 0,
    pooled: bool = False,
) -> Case:
    """Shared random paged cache (NaN past every length), a strided q (a view of a fused qkv)
    and random, full ("every block": dense) or empty lists."""
    lens = torch.randint(max(q_len, min_len), max_len + 1, (batch,), generator=gen).tolist()
    lens[0] = max(q_len, lens[0] // page * page + (page > 1))  # a partly filled last page
    cache = make_paged_cache(
        lens,
        page,
        num_kv_heads,
        head_dim,
        dtype,
        layout,
        device="cuda",
        generator=gen,
        pooled=pooled,
    )
    num_lists = num_kv_heads if per_head else None
    if mode == "random":
        ids, counts = make_block_lists(lens, page, num_lists, gen)
    elif mode == "full":
        ids, counts = ops.dense_block_lists(cache.kv_lens.cpu(), page)
        if per_head:
            ids = ids[:, None].expand(-1, num_kv_heads, -1).contiguous()
            counts = counts[:, None].expand(-1, num_kv_heads).contiguous()
    else:
        shape = (batch, num_kv_heads) if per_head else (batch,)
        ids = torch.full((*shape, 1), 2**30, dtype=torch.int32)
        counts = torch.zeros(shape, dtype=torch.int32)
    hq = group * num_kv_heads
    qkv = torch.randn(batch, q_len, hq + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    return Case(
        q=qkv.cuda()[:, :, :hq],
        cache=cache,
        ids=ids.cuda(),
        counts=counts.cuda(),
        scale=head_dim**-0.5,
    )


def poisoned_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
    return out, lse


def run_cuda(
    c: Case, workspace: torch.Tensor | None = None, validate: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_verify_out into poisoned buffers (value checks are test_errors.py's subject; the
    last test here runs them on CUDA inputs once)."""
    out, lse = poisoned_outputs(c.q)
    ops.sparse_verify_out(*c.args(), out, lse, workspace, validate=validate)
    return out, lse


def assert_close(out, lse, ref_out, ref_lse, dtype, what: str) -> None:
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite output"
    err = reference.relative_error(out, ref_out)
    assert err < OUT_RTOL[dtype], f"{what}: relative error {err:.2e}"
    lse_err = (lse.double() - ref_lse).abs().max()
    assert lse_err < LSE_ATOL, f"{what}: lse error {lse_err:.2e}"


# Each (dtype, D, layout, P) case runs three shapes; the rotation below gives every G, q, list
# mode and list form a turn across the parametrisation.
SHAPE_ROTATION = list(itertools.product(GROUPS, QUERY_LENS))


@pytest.mark.parametrize("page", PAGE_SIZES)
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference(dtype, head_dim, layout, page):
    gen, seed = fresh_generator()
    index = (
        PAGE_SIZES.index(page)
        + 5 * (layout == "NHD")
        + 10 * (head_dim == 128)
        + 20 * (dtype == torch.float16)
    )
    for j in range(3):
        n = 3 * index + j
        group, q_len = SHAPE_ROTATION[(7 * n) % len(SHAPE_ROTATION)]
        mode = LIST_MODES[n % len(LIST_MODES)]
        per_head = (n // 3) % 2 == 1
        c = make_case(
            gen,
            batch=1 + n % 4,
            q_len=q_len,
            group=group,
            num_kv_heads=2,
            head_dim=head_dim,
            page=page,
            dtype=dtype,
            layout=layout,
            mode=mode,
            per_head=per_head,
            max_len=400 if page == 1 else 700,
            pooled=n % 2 == 0,  # k and v as views of one pool: page stride twice the page
        )
        what = f"seed {seed}, G={group} q={q_len} mode={mode} per_head={per_head}"
        out, lse = run_cuda(c)
        ref_out, ref_lse = reference.sparse_verify(*c.args())
        assert_close(out, lse, ref_out, ref_lse, dtype, what)


@pytest.mark.parametrize("batch", [1, 3, 17, 64])
@pytest.mark.parametrize("group,q_len", [(8, 5), (7, 2), (16, 16), (6, 16)])
def test_batches_and_row_chunks(batch, group, q_len):
    gen, seed = fresh_generator()
    c = make_case(
        gen,
        batch=batch,
        q_len=q_len,
        group=group,
        num_kv_heads=4,
        head_dim=128,
        page=16,
        dtype=torch.bfloat16,
        layout="HND",
        mode="random",
        per_head=batch % 2 == 1,
        max_len=1500,
    )
    out, lse = run_cuda(c)
    ref_out, ref_lse = reference.sparse_verify(*c.args())
    assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, f"seed {seed}")


def test_split_and_unsplit_paths_agree():
    """Few (b, h) pairs split the list (workspace > 0); many do not; both match the reference."""
    gen, seed = fresh_generator()
    for batch, expect_split in ((2, True), (64, False)):
        c = make_case(
            gen,
            batch=batch,
            q_len=5,
            group=8,
            num_kv_heads=8,
            head_dim=128,
            page=16,
            dtype=torch.bfloat16,
            layout="HND",
            mode="full",
            per_head=False,
            max_len=3000,
        )
        nbytes = c.workspace_bytes()
        assert (nbytes > 0) == expect_split, f"B={batch}: workspace {nbytes}"
        ref_out, ref_lse = reference.sparse_verify(*c.args())
        workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        out, lse = run_cuda(c, workspace)
        assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, f"seed {seed} B={batch}")
        out2, lse2 = ops.sparse_verify(*c.args(), validate=False)
        assert_close(out2, lse2, ref_out, ref_lse, torch.bfloat16, f"seed {seed} B={batch} op")


# On Hopper the splits of a list of 16-row CTAs merge on chip when they form one thread-block
# cluster: at most this many splits of at most 16 KV tiles (1024 tokens) each. Other splits
# (and every split of 64-row CTAs) write partials for the merge launch.
MAX_CLUSTER_SPLITS = 8


@pytest.mark.parametrize(
    "group,q_len",
    [(6, 4), (7, 1)],
    ids=["64-row CTA (launch merges)", "16-row CTA (the draft's q = 1; both merges)"],
)
def test_split_counts_and_both_merges(group, q_len):
    """A workspace for fewer splits than planned gives fewer, longer splits: same results, from
    2 splits through the largest cluster merge (16-row CTAs) to the first launch merge and the
    planner's count."""
    gen, seed = fresh_generator()
    c = make_case(
        gen,
        batch=1,
        q_len=q_len,
        group=group,
        num_kv_heads=2,
        head_dim=64,
        page=8,
        dtype=torch.float16,
        layout="HND",
        mode="full",
        per_head=True,
        max_len=2000,
        min_len=1900,
    )
    planned = c.workspace_bytes()
    per_split = c.q.shape[0] * c.q.shape[1] * c.q.shape[2] * (c.q.shape[3] + 1) * 4
    assert planned > (MAX_CLUSTER_SPLITS + 1) * per_split, (
        f"expected a plan of more than {MAX_CLUSTER_SPLITS + 1} splits, got {planned} bytes"
    )
    ref_out, ref_lse = reference.sparse_verify(*c.args())
    for splits in (2, 3, MAX_CLUSTER_SPLITS, MAX_CLUSTER_SPLITS + 1, planned // per_split):
        workspace = torch.empty(splits * per_split, dtype=torch.uint8, device="cuda")
        out, lse = run_cuda(c, workspace)
        assert_close(out, lse, ref_out, ref_lse, torch.float16, f"seed {seed} splits={splits}")


def test_graph_replay_matches_eager():
    gen, seed = fresh_generator()
    c = make_case(
        gen,
        batch=4,
        q_len=5,
        group=7,
        num_kv_heads=4,
        head_dim=128,
        page=16,
        dtype=torch.bfloat16,
        layout="HND",
        mode="random",
        per_head=True,
        max_len=2000,
    )
    nbytes = c.workspace_bytes()
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    q_buf = c.q.clone()
    out = torch.empty_like(q_buf)
    lse = torch.empty(q_buf.shape[:3], dtype=torch.float32, device="cuda")
    args = (q_buf, *c.args()[1:])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.sparse_verify_out(*args, out, lse, workspace, validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sparse_verify_out(*args, out, lse, workspace, validate=False)
    # New queries and shorter lists written in place, as a decoding loop would, then a replay.
    q_buf.copy_(torch.randn(q_buf.shape, generator=gen).to(q_buf.dtype))
    c.counts.copy_(c.counts // 2)
    slots = torch.arange(c.ids.shape[-1], device="cuda")
    c.ids.masked_fill_(slots >= c.counts[..., None], -1)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    c.q = q_buf
    eager_out, eager_lse = run_cuda(c, workspace)
    assert torch.equal(out, eager_out), f"seed {seed}: graph replay differs from eager"
    assert torch.equal(lse, eager_lse), f"seed {seed}: graph replay lse differs from eager"
    ref_out, ref_lse = reference.sparse_verify(*c.args())
    assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, f"seed {seed} replay")


def test_unaligned_query_strides():
    """q whose rows are not 16-byte aligned takes the element-wise load path."""
    gen, seed = fresh_generator()
    c = make_case(
        gen,
        batch=2,
        q_len=3,
        group=4,
        num_kv_heads=2,
        head_dim=64,
        page=8,
        dtype=torch.float16,
        layout="NHD",
        mode="random",
        per_head=False,
    )
    padded = torch.randn(*c.q.shape[:3], 65, generator=gen).to(c.q.dtype).cuda()
    c.q = padded[..., 1:]
    out, lse = run_cuda(c)
    ref_out, ref_lse = reference.sparse_verify(*c.args())
    assert_close(out, lse, ref_out, ref_lse, torch.float16, f"seed {seed}")


def test_out_of_contract_values_are_skipped_not_read():
    """Raw op (no value checks): ids past the sequence, huge or negative are skipped, and so
    are block-table entries outside the pool (-1 past each sequence); kv_lens past the block
    table are clamped to it. Results equal the reference over what remains; nothing faults."""
    gen, seed = fresh_generator()
    c = make_case(
        gen,
        batch=3,
        q_len=4,
        group=4,
        num_kv_heads=2,
        head_dim=128,
        page=16,
        dtype=torch.bfloat16,
        layout="HND",
        mode="full",
        per_head=False,
    )
    ref_out, ref_lse = reference.sparse_verify(*c.args())
    junk = torch.tensor([10**6, 2**31 - 1, -5, -1], dtype=torch.int32, device="cuda")
    bad_ids = torch.cat([c.ids, junk.expand(3, -1)], 1).contiguous()
    args = list(c.args())
    args[5], args[6] = bad_ids, c.counts + junk.numel()
    out, lse = poisoned_outputs(c.q)
    torch.ops.dustin.sparse_verify_out(*args, out, lse, None)
    assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, f"seed {seed} bad ids")
    # Lengths past the table: at most max_pages * P tokens are attended; -1 pages are skipped.
    args = list(c.args())
    args[4] = torch.full_like(c.cache.kv_lens, 10**7)
    torch.ops.dustin.sparse_verify_out(*args, out, lse, None)
    torch.cuda.synchronize()


# The two checks below also run host code that is not this kernel's (the wrappers' value
# checks, the CPU twin). Each runs in a child interpreter, so a crash there fails its test with
# the child's output instead of ending the whole session.
def run_isolated(check: str, *args) -> None:
    code = f"import test_cuda_sparse_verify as t; t.{check}(*{args!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{check}{args} exited {proc.returncode}:\n{proc.stderr[-4000:]}"


def check_wrapper_value_checks() -> None:
    gen, seed = fresh_generator()
    c = make_case(
        gen,
        batch=2,
        q_len=5,
        group=4,
        num_kv_heads=2,
        head_dim=128,
        page=16,
        dtype=torch.bfloat16,
        layout="HND",
        mode="random",
        per_head=False,
    )
    out, lse = run_cuda(c, validate=True)
    ref_out, ref_lse = reference.sparse_verify(*c.args())
    assert_close(out, lse, ref_out, ref_lse, torch.bfloat16, f"seed {seed}")


def test_wrapper_value_checks_accept_valid_cuda_inputs():
    run_isolated("check_wrapper_value_checks")


def check_matches_cpu_twin(dtype_name: str, layout: str) -> None:
    dtype = getattr(torch, dtype_name)
    gen, seed = fresh_generator()
    for group, q_len, page, per_head in ((8, 5, 16, False), (7, 8, 64, True), (16, 16, 1, False)):
        c = make_case(
            gen,
            batch=3,
            q_len=q_len,
            group=group,
            num_kv_heads=2,
            head_dim=128,
            page=page,
            dtype=dtype,
            layout=layout,
            mode="random",
            per_head=per_head,
            max_len=500,
        )
        out, lse = run_cuda(c)
        cpu_out, cpu_lse = ops.sparse_verify(*c.to_cpu())
        what = f"seed {seed}, G={group} q={q_len} P={page} vs CPU twin"
        assert_close(out.cpu(), lse.cpu(), cpu_out.double(), cpu_lse.double(), dtype, what)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_matches_cpu_twin(dtype_name, layout):
    run_isolated("check_matches_cpu_twin", dtype_name, layout)
