# SPDX-License-Identifier: Apache-2.0
"""sparse_verify on CUDA, dense (every block listed) and sparse (token budgets), with its peers.

One run covers contexts x batches x query lengths x attention shapes x page sizes for Dustin's
kernel, and the peers at the issue's comparison points (by default B=16, 32k): PyTorch SDPA on a
contiguous KV (best backend), FlexAttention dense and block-sparse over the same selected blocks,
"gather with index_select, then SDPA", and FlashInfer's paged batch prefill (FA2 and, on
Hopper, FA3) over every block or the same selected blocks, where FlashInfer is installed. Times
are medians of CUDA-graph replays (and eager); bandwidth counts the KV bytes each variant must
read (selected blocks plus the window's blocks for sparse, the whole causal context for dense)
plus q and out once.

    python bench/bench_sparse_verify.py                 # the issue's full grid and peers
    python bench/bench_sparse_verify.py --quick         # a small subset, for a first look
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dustin  # noqa: F401  (registers torch.ops.dustin)
from dustin import ops

from bench import flashinfer_peer
from bench.common import Report, ceiling_note, pct_of_ceiling, read_ceiling_tbps, tbps, time_cuda


@dataclass(frozen=True)
class Shape:
    name: str
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int = 128


SHAPES = {
    "qwen2.5-coder-1.5b": Shape("qwen2.5-coder-1.5b", 12, 2),
    "qwen2.5-7b": Shape("qwen2.5-7b", 28, 4),
    "qwen2.5-72b": Shape("qwen2.5-72b", 64, 8),
}
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element


class PagedCase:
    """One paged HND cache of B sequences of `context` tokens with shuffled pages."""

    def __init__(self, shape: Shape, batch: int, context: int, page: int, gen: torch.Generator):
        self.shape, self.batch, self.context, self.page = shape, batch, context, page
        self.blocks = math.ceil(context / page)
        num_pages = batch * self.blocks
        dims = (num_pages, shape.num_kv_heads, page, shape.head_dim)
        self.k = torch.randn(dims, device="cuda", dtype=DTYPE)
        self.v = torch.randn(dims, device="cuda", dtype=DTYPE)
        perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
        self.table = perm.view(batch, self.blocks)
        self.kv_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.gen = gen

    def lists(self, budget: int | None, q_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ids, counts, attended tokens per sequence): every block for budget None, else
        budget // P random blocks before the window (the kernel adds the window's blocks)."""
        first_window = (self.context - q_len) // self.page
        window_tokens = self.context - first_window * self.page
        if budget is None:
            ids, counts = ops.dense_block_lists(self.kv_lens, self.page, self.blocks)
            return ids, counts, self.context
        n = min(max(budget // self.page, 1), first_window)
        scores = torch.rand(self.batch, first_window, device="cuda", generator=self.gen)
        ids = scores.topk(n, dim=1).indices.sort(dim=1).values.to(torch.int32).contiguous()
        counts = torch.full((self.batch,), n, dtype=torch.int32, device="cuda")
        return ids, counts, n * self.page + window_tokens

    def kv_bytes(self, tokens: int) -> int:
        s = self.shape
        return 2 * self.batch * s.num_kv_heads * tokens * s.head_dim * ELEM

    def dense_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V as contiguous [B, Hkv, L, D] (what dense peers read)."""

        def gather(cache):
            x = cache[self.table.long()]  # [B, blocks, Hkv, P, D]
            x = x.permute(0, 2, 1, 3, 4).reshape(
                self.batch, self.shape.num_kv_heads, -1, self.shape.head_dim
            )
            return x[:, :, : self.context].contiguous()

        return gather(self.k), gather(self.v)


def timing_columns(t, nbytes: int) -> dict:
    """Graph and eager times, and the bandwidth on `nbytes`, as report columns."""
    return {
        "graph_us": t.graph_us,
        "eager_us": t.eager_us,
        "tbps": tbps(nbytes, t.best_us),
        "pct_ceiling": pct_of_ceiling(nbytes, t.best_us),
    }


def row_best_us(row: dict) -> float:
    """A row's graph time, or its eager time where the call could not be captured (as
    Timing.best_us)."""
    return row["graph_us"] if row["graph_us"] is not None else row["eager_us"]


def split_bytes(q: torch.Tensor) -> int:
    """Workspace of one split: fp32 partial output and lse of every output row."""
    batch, q_len, heads, head_dim = q.shape
    return batch * q_len * heads * (head_dim + 1) * 4


def planned_workspace_bytes(case: PagedCase, q: torch.Tensor, ids: torch.Tensor) -> int:
    """Workspace the kernel's planner asks for: its split count times `split_bytes`."""
    return ops.sparse_verify_workspace_bytes(q, case.k, case.table, ids, "HND")


def planned_splits(case: PagedCase, q: torch.Tensor, ids: torch.Tensor) -> int:
    """The split count the kernel's planner picks (read back from the workspace it asks for)."""
    return max(planned_workspace_bytes(case, q, ids) // split_bytes(q), 1)


def dustin_fn(case: PagedCase, q: torch.Tensor, ids, counts, splits: int | None = None):
    """The out-variant call; `splits` caps the split count through the workspace it is given
    (the kernel splits only as far as its workspace allows), None leaves the planner's choice."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="cuda")
    if splits is None:
        nbytes = planned_workspace_bytes(case, q, ids)
    else:
        nbytes = splits * split_bytes(q) if splits > 1 else 0
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    scale = case.shape.head_dim**-0.5
    op = torch.ops.dustin.sparse_verify_out

    def fn():
        op(
            q,
            case.k,
            case.v,
            case.table,
            case.kv_lens,
            ids,
            counts,
            scale,
            "HND",
            out,
            lse,
            workspace,
        )

    return fn, out


def sdpa_best(q, k, v, q_len: int, kv_len: int):
    """Fastest SDPA backend (graph time) on [B, Hq, q, D] x [B, Hkv, L, D], causal with the
    queries at the end, as a lower-right causal bias or as an explicit bool mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    qpos = kv_len - q_len + torch.arange(q_len, device="cuda")
    bool_mask = torch.arange(kv_len, device="cuda")[None, :] <= qpos[:, None]  # [q, L]
    masks = {"lower-right bias": causal_lower_right(q_len, kv_len), "bool mask": bool_mask}
    best = (None, "none")
    for backend in (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ):
        for mask_name, mask in masks.items():

            def fn(backend=backend, mask=mask):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

            try:
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001  (backend or mask form unsupported here)
                print(f"  sdpa {backend.name.lower()} with {mask_name}: {type(exc).__name__}")
                continue
            t = time_cuda(fn)
            if best[0] is None or t.best_us < best[0].best_us:
                best = (t, f"{backend.name.lower()}, {mask_name}")
    return best


def bench_dustin(report: Report, args, gen: torch.Generator) -> dict:
    """Dustin's kernel over the grid; returns {(shape, B, ctx, q, P, mode): graph us}."""
    times = {}
    deadline = time.time() + args.time_budget if args.time_budget else math.inf
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for context in args.contexts:
            for batch in args.batches:
                for page in args.pages:
                    if time.time() > deadline:
                        report.notes.append(
                            f"time budget spent: skipped {shape_name} ctx={context} B={batch} P={page}"
                        )
                        continue
                    case = PagedCase(shape, batch, context, page, gen)
                    for q_len in args.q:
                        q = torch.randn(
                            batch,
                            q_len,
                            shape.num_qo_heads,
                            shape.head_dim,
                            device="cuda",
                            dtype=DTYPE,
                        )
                        for budget in [None, *args.budgets]:
                            ids, counts, tokens = case.lists(budget, q_len)
                            fn, _ = dustin_fn(case, q, ids, counts)
                            t = time_cuda(fn, reps=args.reps)
                            nbytes = case.kv_bytes(tokens) + 2 * q.numel() * ELEM
                            mode = "dense" if budget is None else f"sparse-{budget}"
                            times[(shape_name, batch, context, q_len, page, mode)] = t.best_us
                            report.add(
                                variant="dustin",
                                shape=shape_name,
                                B=batch,
                                ctx=context,
                                q=q_len,
                                P=page,
                                mode=mode,
                                splits=planned_splits(case, q, ids),
                                **timing_columns(t, nbytes),
                            )
                            print(
                                f"dustin {shape_name} B={batch} ctx={context} q={q_len} "
                                f"P={page} {mode}: {t.best_us:.1f} us "
                                f"({tbps(nbytes, t.best_us):.2f} TB/s)",
                                flush=True,
                            )
                    del case
                    torch.cuda.empty_cache()
    return times


def bench_split_sweep(report: Report, args, gen: torch.Generator) -> None:
    """The planner's split count against smaller ones at the headline points (B=16, 32k, q=5,
    P=16): shows what its splitting buys. A workspace only caps the split count, so counts
    above the planner's cannot be forced and are not listed (sweep rows above the planner's
    count in results up to sparse_verify-20261129-211803 ran the planner's count)."""
    for shape_name in args.sweep_shapes:
        shape = SHAPES[shape_name]
        case = PagedCase(shape, 16, 32768, 16, gen)
        q = torch.randn(16, 5, shape.num_qo_heads, shape.head_dim, device="cuda", dtype=DTYPE)
        for budget in (None, 512):
            ids, counts, tokens = case.lists(budget, 5)
            nbytes = case.kv_bytes(tokens) + 2 * q.numel() * ELEM
            chosen = planned_splits(case, q, ids)
            mode = "dense" if budget is None else f"sparse-{budget}"
            for splits in sorted(s for s in {1, 2, 3, 4, 8, chosen} if s <= chosen):
                fn, _ = dustin_fn(case, q, ids, counts, splits)
                t = time_cuda(fn, reps=args.reps)
                label = f"{splits}" + (" (planner)" if splits == chosen else "")
                report.add(
                    variant="dustin-splits",
                    shape=shape_name,
                    B=16,
                    ctx=32768,
                    q=5,
                    P=16,
                    mode=mode,
                    splits=label,
                    **timing_columns(t, nbytes),
                )
                print(f"split sweep {shape_name} {mode} splits={label}: {t.best_us:.1f} us")
        del case
        torch.cuda.empty_cache()


def add_peer_row(
    report: Report,
    ours: dict,
    point: tuple,
    variant: str,
    mode: str,
    t,
    nbytes: int,
    backend: str = "",
) -> None:
    """One peer row, with its time over Dustin's at the same point (the speedup)."""
    shape_name, batch, context, q_len, page = point
    mine = ours.get((*point, mode))
    report.add(
        variant=variant,
        shape=shape_name,
        B=batch,
        ctx=context,
        q=q_len,
        P=page,
        mode=mode,
        **timing_columns(t, nbytes),
        dustin_speedup=t.best_us / mine if mine else None,
        backend=backend,
    )
    print(f"{variant} {shape_name} q={q_len} {mode} [{backend}]: {t.best_us:.1f} us", flush=True)


def bench_peers(report: Report, args, gen: torch.Generator, ours: dict) -> None:
    """Peers at B = args.peer_batch, context args.peer_context, page 16 lists."""
    page, batch, context = args.peer_page, args.peer_batch, args.peer_context
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        case = PagedCase(shape, batch, context, page, gen)
        k_dense, v_dense = case.dense_kv()
        for q_len in args.peer_q:
            q = torch.randn(
                batch, q_len, shape.num_qo_heads, shape.head_dim, device="cuda", dtype=DTYPE
            )
            q_bhsd = q.transpose(1, 2)
            dense_bytes = case.kv_bytes(context) + 2 * q.numel() * ELEM

            add = functools.partial(
                add_peer_row, report, ours, (shape_name, batch, context, q_len, page)
            )

            t, backend = sdpa_best(q_bhsd, k_dense, v_dense, q_len, context)
            if t is not None:
                add("sdpa", "dense", t, dense_bytes, backend)
            if args.flex and shape_name in args.flex_shapes and q_len in args.flex_q:
                bench_flex(case, q_bhsd, k_dense, v_dense, q_len, add, dense_bytes, args)
            if args.flashinfer:
                bench_flashinfer(case, q, None, None, add, "dense", dense_bytes)
            for budget in args.budgets:
                ids, counts, tokens = case.lists(budget, q_len)
                nbytes = case.kv_bytes(tokens) + 2 * q.numel() * ELEM
                t = bench_gather_sdpa(case, q_bhsd, ids, counts, q_len)
                if t is not None:
                    add("gather+sdpa", f"sparse-{budget}", t, nbytes, "efficient")
                if args.flashinfer:
                    bench_flashinfer(case, q, ids, counts, add, f"sparse-{budget}", nbytes)
        del case, k_dense, v_dense
        torch.cuda.empty_cache()


def bench_flashinfer(case: PagedCase, q, ids, counts, add, mode: str, nbytes: int) -> None:
    """FlashInfer's batch prefill over the same paged cache, every block (ids None) or the
    listed blocks plus the window's (bench/flashinfer_peer.py), on each of its backends;
    checked against a float32 reference before it is timed."""
    for backend in flashinfer_peer.backends():
        try:
            fn = flashinfer_peer.Verification(
                q, case.k, case.v, case.table, case.kv_lens, ids, counts, backend=backend
            )
            fn.check()
            add(f"flashinfer-{backend}", mode, time_cuda(fn), nbytes, backend)
        except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
            print(f"  flashinfer {backend} {mode} failed: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:160]}")


def bench_gather_sdpa(case: PagedCase, q_bhsd, ids, counts, q_len):
    """index_select the selected blocks' tokens (plus the window's blocks), then SDPA."""
    page = case.page
    first_window = (case.context - q_len) // page
    window = torch.arange(first_window, case.blocks, device="cuda", dtype=torch.int32)
    blocks = torch.cat([ids, window.expand(case.batch, -1)], dim=1).long()  # [B, nb]
    pages = torch.gather(case.table.long(), 1, blocks)  # [B, nb]
    pos = (blocks[:, :, None] * page + torch.arange(page, device="cuda")).flatten(1)  # [B, n]
    qpos = case.context - q_len + torch.arange(q_len, device="cuda")
    mask = pos[:, None, None, :] <= qpos[None, None, :, None]  # [B, 1, q, n]

    def fn():
        k = case.k.index_select(0, pages.flatten())  # [B * nb, Hkv, P, D]
        v = case.v.index_select(0, pages.flatten())
        shp = (case.batch, -1, case.shape.num_kv_heads, page, case.shape.head_dim)
        k = k.view(shp).permute(0, 2, 1, 3, 4).flatten(2, 3)
        v = v.view(shp).permute(0, 2, 1, 3, 4).flatten(2, 3)
        return F.scaled_dot_product_attention(q_bhsd, k, v, attn_mask=mask, enable_gqa=True)

    try:
        fn()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
        print(f"  gather+sdpa failed: {str(exc).splitlines()[0][:120]}")
        return None
    return time_cuda(fn)


def selected_blocks_mod(selected: torch.Tensor, page: int, offset: int):
    """FlexAttention mask_mod: listed (or window) blocks, causal from position `offset`."""

    def mod(b, h, q_idx, kv_idx):
        return selected[b, kv_idx // page] & (kv_idx <= q_idx + offset)

    return mod


def bench_flex(case, q_bhsd, k_dense, v_dense, q_len, add, dense_bytes, args) -> None:
    """FlexAttention dense (causal, lower right) and block-sparse with the same lists."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return
    flex = torch.compile(flex_attention, dynamic=False)
    context, page = case.context, case.page
    offset = context - q_len

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    try:
        dense_mask = create_block_mask(causal, None, None, q_len, context, device="cuda")
        fn = functools.partial(
            flex, q_bhsd, k_dense, v_dense, block_mask=dense_mask, enable_gqa=True
        )
        fn()
        add("flex", "dense", time_cuda(fn), dense_bytes, "flex")
        for budget in args.flex_budgets:
            ids, _, tokens = case.lists(budget, q_len)
            selected = torch.zeros(case.batch, case.blocks, dtype=torch.bool, device="cuda")
            selected.scatter_(1, ids.long(), True)
            selected[:, offset // page :] = True
            mask = create_block_mask(
                selected_blocks_mod(selected, page, offset),
                case.batch,
                None,
                q_len,
                context,
                device="cuda",
            )
            fn = functools.partial(flex, q_bhsd, k_dense, v_dense, block_mask=mask, enable_gqa=True)
            fn()
            nbytes = case.kv_bytes(tokens) + 2 * q_bhsd.numel() * ELEM
            add("flex", f"sparse-{budget}", time_cuda(fn), nbytes, "flex block-sparse")
    except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
        print(f"  flex failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")


def summarize(report: Report, ours: dict, args) -> None:
    """Notes on the issue's targets, from this run's numbers."""

    def pct(row):
        return row["pct_ceiling"]

    rows = [r for r in report.rows if r["variant"] == "dustin"]
    dense32 = [r for r in rows if r["mode"] == "dense" and r["ctx"] == 32768 and 2 <= r["q"] <= 8]
    if dense32:
        worst = min(dense32, key=pct)
        report.notes.append(
            f"dense q=2..8 at 32k: worst {pct(worst):.0f}% of {read_ceiling_tbps():.2f} TB/s "
            f"({worst['shape']} B={worst['B']} q={worst['q']} P={worst['P']}); target 85%"
        )
    big = [
        r
        for r in rows
        if r["mode"].startswith("sparse")
        and int(r["mode"].split("-")[1]) >= 2048
        and r["B"] * SHAPES[r["shape"]].num_kv_heads >= 64
    ]
    if big:
        worst = min(big, key=pct)
        report.notes.append(
            f"sparse >= 2048 tokens, B*Hkv >= 64: worst {pct(worst):.0f}% "
            f"({worst['shape']} B={worst['B']} ctx={worst['ctx']} q={worst['q']} P={worst['P']}); "
            "target 85%"
        )

    def best_peer(point: tuple, mode: str) -> str:
        """', Nx <peer>' for the fastest peer row at this point and mode, if any ran."""
        peers = [
            p
            for p in report.rows
            if not p["variant"].startswith("dustin") and p["mode"] == mode
            and (p["shape"], p["B"], p["ctx"], p["q"], p["P"]) == point
        ]
        if not peers:
            return ""
        best = min(peers, key=row_best_us)
        return f", {row_best_us(best) / ours[(*point, 'sparse-512')]:.1f}x {best['variant']} {mode}"


    for r in rows:
        if (r["shape"], r["B"], r["ctx"], r["mode"]) == ("qwen2.5-72b", 16, 32768, "sparse-512"):
            point = ("qwen2.5-72b", 16, 32768, r["q"], r["P"])
            dense = ours.get((*point, "dense"))
            ratio = f", {dense / r['graph_us']:.0f}x own dense" if dense and r["graph_us"] else ""
            report.notes.append(
                f"72B B=16 32k budget 512 q={r['q']} P={r['P']}: {r['graph_us']:.1f} us graph "
                f"({r['eager_us']:.1f} eager){ratio}{best_peer(point, 'sparse-512')}"
                f"{best_peer(point, 'dense')}; target <= 12 us, >= 40x own dense, >= 10x the best "
                "sparse peer, >= 150x the best dense peer"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of the grid")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 64])
    parser.add_argument("--q", nargs="+", type=int, default=[2, 4, 5, 8])
    parser.add_argument("--pages", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--budgets", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--peer-batch", type=int, default=16)
    parser.add_argument("--peer-context", type=int, default=32768)
    parser.add_argument("--peer-page", type=int, default=16)
    parser.add_argument("--peer-q", nargs="+", type=int, default=[2, 5, 8])
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument("--no-flashinfer", dest="flashinfer", action="store_false",
                        help="skip FlashInfer (a peer only where it is installed)")
    # FlexAttention compiles per shape (tens of seconds each): by default the headline point.
    parser.add_argument("--flex-shapes", nargs="+", default=["qwen2.5-72b"], choices=list(SHAPES))
    parser.add_argument("--flex-q", nargs="+", type=int, default=[5])
    parser.add_argument("--flex-budgets", nargs="+", type=int, default=[512])
    parser.add_argument(
        "--sweep-shapes",
        nargs="*",
        default=["qwen2.5-coder-1.5b", "qwen2.5-7b", "qwen2.5-72b"],
        choices=list(SHAPES),
        help="shapes of the split-count sweep (none: skip it)",
    )
    parser.add_argument("--tag", default="")
    parser.add_argument("--commit", default=None, help="commit measured, noted in the results")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds for Dustin's grid (then skip)"
    )
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.batches, args.q = [32768], [1, 16, 64], [2, 5, 8]
        args.peer_q, args.flex = [5], False

    gen = torch.Generator(device="cuda").manual_seed(0)
    report = Report(
        name="sparse_verify",
        columns=[
            "variant",
            "shape",
            "B",
            "ctx",
            "q",
            "P",
            "mode",
            "splits",
            "graph_us",
            "eager_us",
            "tbps",
            "pct_ceiling",
            "dustin_speedup",
            "backend",
        ],
    )
    if args.commit:
        report.notes.append(f"commit {args.commit} (given on the command line)")
    if args.peers and args.flashinfer:
        args.flashinfer, why = flashinfer_peer.available()
        report.notes.append(f"FlashInfer peer: {why}")
    start = time.time()
    bench_split_sweep(report, args, gen)
    ours = bench_dustin(report, args, gen)
    if args.peers:
        bench_peers(report, args, gen, ours)
    summarize(report, ours, args)
    report.notes.append(f"bf16, HND, shuffled pages, uniform lengths; {time.time() - start:.0f} s")
    report.notes.append(ceiling_note())
    print(report.markdown())
    for note in report.notes:
        print("note:", note)
    paths = report.save(tag=args.tag)
    print("saved", *paths)


if __name__ == "__main__":
    main()
