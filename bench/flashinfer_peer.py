# SPDX-License-Identifier: Apache-2.0
"""FlashInfer as a peer of sparse_verify: batch prefill over the paged KV cache.

FlashInfer's BatchPrefillWithPagedKVCacheWrapper attends each sequence's q-token window over a
list of pages with a bottom-right causal mask (query i of a window of q sits at list position
len - q + i). That is verification when the list is

- dense: every block of the sequence, in order;
- sparse: the listed blocks before the window (ascending), then the window's blocks
  (`(kv_len - q) // P` to the last one). The listed blocks all precede the window, so the
  bottom-right causal mask over the shortened list masks exactly what masking by absolute
  position does, and the tokens attended are those `sparse_verify` attends.

Planning (page lists, `wrapper.plan`, the first call's JIT build) happens when a `Verification`
is made; calling it only runs `wrapper.run` into a preallocated output. The wrapper is made in
FlashInfer's CUDA-graph mode (fixed plan buffers, as serving engines use it), so the call can be
captured in a CUDA graph like Dustin's out-variant. `check()` compares the output with a float32
PyTorch reference written from docs/ops.md (it shares no list code with the setup).

    ok, why = flashinfer_peer.available()
    for backend in flashinfer_peer.backends():          # "fa2", and "fa3" on Hopper
        fn = flashinfer_peer.Verification(q, k, v, table, kv_lens, ids, counts, backend=backend)
        fn.check()                                     # raises if the output is wrong
        t = time_cuda(fn)

Only one list per sequence (`block_ids [B, K]` or `[B, 1, K]`): FlashInfer's page lists are
shared by all KV heads. `python bench/flashinfer_peer.py` checks both layouts, page sizes 16
and 64, dense and sparse, on every backend, on a small case.
"""

from __future__ import annotations

import math

import torch

WORKSPACE_BYTES = 256 << 20  # FlashInfer's float workspace (split-KV partials); 128 MiB advised
REL_TOL = 1e-2  # ||out - ref|| / ||ref||, as tests/test_cuda_sparse_verify.py allows for bf16


def available() -> tuple[bool, str]:
    """(True, version) when FlashInfer imports and a CUDA device is present, else (False, why)."""
    try:
        import flashinfer
    except Exception as exc:  # noqa: BLE001  (missing or broken install: a peer that is skipped)
        return False, f"flashinfer does not import: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"flashinfer {flashinfer.__version__}"


def new_workspace(device: torch.device) -> torch.Tensor:
    """A float workspace for `Verification`s. Several may share one when their calls run one
    after another on one stream: it holds only a run's split-KV partials (each plan keeps its
    own plan buffers)."""
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def backends() -> tuple[str, ...]:
    """FlashInfer's prefill backends on this device: FA2, and FA3 on Hopper."""
    return ("fa2", "fa3") if torch.cuda.get_device_capability()[0] == 9 else ("fa2",)


def _cache_dims(k_cache: torch.Tensor, kv_layout: str) -> tuple[int, int]:
    """(page size, KV heads) of a `[pages, P, Hkv, D]` (NHD) or `[pages, Hkv, P, D]` (HND) cache."""
    if kv_layout == "HND":
        return k_cache.shape[2], k_cache.shape[1]
    if kv_layout == "NHD":
        return k_cache.shape[1], k_cache.shape[2]
    raise ValueError(f"kv_layout must be 'HND' or 'NHD', not {kv_layout!r}")


def _blocks_of(kv_len: int, page: int) -> int:
    return -(-kv_len // page)


def _single_lists(block_ids: torch.Tensor, block_counts: torch.Tensor):
    """`[B, K]` ids and `[B]` counts from the shared-list forms `[B, K]` / `[B, 1, K]`."""
    if block_ids.dim() == 3:
        if block_ids.shape[1] != 1:
            raise ValueError(
                "FlashInfer shares one page list across a sequence's KV heads: "
                "per-KV-head block lists are not supported"
            )
        block_ids, block_counts = block_ids[:, 0], block_counts.reshape(-1)
    return block_ids, block_counts


def dense_blocks(kv_lens: torch.Tensor, page: int) -> list[torch.Tensor]:
    """Logical blocks of each sequence for dense verification: all of them."""
    return [torch.arange(_blocks_of(n, page)) for n in kv_lens.tolist()]


def sparse_blocks(
    kv_lens: torch.Tensor, q_len: int, page: int, listed: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Logical blocks of each sequence for sparse verification: its listed blocks before the
    window (listed ids at or past the window's first block change nothing, as in
    sparse_verify), then the window's blocks."""
    lists = []
    for n, ids in zip(kv_lens.tolist(), listed):
        first_window = (n - q_len) // page
        window = torch.arange(first_window, _blocks_of(n, page))
        lists.append(torch.cat([ids[ids < first_window], window]))
    return lists


class Verification:
    """One planned FlashInfer batch prefill of the window `q [B, q, Hq, D]` over a paged cache
    (`block_table [B, max_pages]`, `kv_lens [B]`, as for sparse_verify): over every block
    (`block_ids` None) or over sparse_verify's lists (`block_ids [B, K]` or `[B, 1, K]`,
    `block_counts [B]` or `[B, 1]`) plus the window's blocks. Calling it writes `out`.
    `workspace` (from `new_workspace()`) may be shared; by default it has its own."""

    def __init__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        kv_lens: torch.Tensor,
        block_ids: torch.Tensor | None = None,
        block_counts: torch.Tensor | None = None,
        *,
        kv_layout: str = "HND",
        sm_scale: float | None = None,
        backend: str = "fa2",
        workspace: torch.Tensor | None = None,
    ):
        import flashinfer

        batch, q_len, num_qo_heads, head_dim = q.shape
        page, num_kv_heads = _cache_dims(k_cache, kv_layout)
        self.q, self.k_cache, self.v_cache, self.kv_layout = q, k_cache, v_cache, kv_layout
        self.block_table, self.kv_lens, self.backend = block_table, kv_lens, backend
        self.sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
        if block_ids is None:
            self.listed = dense_blocks(kv_lens, page)
            blocks = self.listed
        else:
            ids, counts = _single_lists(block_ids, block_counts)
            self.listed = [row[:c].long() for row, c in zip(ids.cpu(), counts.tolist())]
            blocks = sparse_blocks(kv_lens, q_len, page, self.listed)

        table = block_table.cpu().long()
        pages = [table[b, blk] for b, blk in enumerate(blocks)]
        # Every list ends with its sequence's last block, which holds kv_len - (blocks - 1) * P.
        last_page_len = [n - (_blocks_of(n, page) - 1) * page for n in kv_lens.tolist()]
        list_lens = torch.tensor([0] + [len(p) for p in pages])

        def ints(values) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.int32).to(q.device)

        qo_indptr = ints(torch.arange(batch + 1) * q_len)
        kv_indptr = ints(list_lens.cumsum(0))
        kv_indices = ints(torch.cat(pages))
        kv_last_page_len = ints(last_page_len)
        # CUDA-graph mode, as serving engines run it: run() reads the plan from fixed buffers.
        if workspace is None:
            workspace = new_workspace(q.device)
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace,
            kv_layout,
            use_cuda_graph=True,
            qo_indptr_buf=torch.empty_like(qo_indptr),
            paged_kv_indptr_buf=torch.empty_like(kv_indptr),
            paged_kv_indices_buf=torch.empty_like(kv_indices),
            paged_kv_last_page_len_buf=torch.empty_like(kv_last_page_len),
            backend=backend,
        )
        self._wrapper.plan(
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page,
            causal=True,
            sm_scale=self.sm_scale,
            q_data_type=q.dtype,
            kv_data_type=k_cache.dtype,
        )
        self._q_rows = q.reshape(batch * q_len, num_qo_heads, head_dim)  # a view if contiguous
        self.out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self._out_rows = self.out.view(batch * q_len, num_qo_heads, head_dim)
        self._kv = (k_cache, v_cache)

    def __call__(self) -> None:
        self._wrapper.run(self._q_rows, self._kv, out=self._out_rows)

    def check(self, sequences: int = 2) -> float:
        """Run once and compare the first and last `sequences` sequences with `reference`;
        returns the worst ||out - ref|| / ||ref|| and raises AssertionError above REL_TOL."""
        self()
        torch.cuda.synchronize()
        batch = self.q.shape[0]
        worst = 0.0
        for b in sorted({*range(min(sequences, batch)), *range(max(batch - sequences, 0), batch)}):
            ref = reference(
                self.q[b],
                self.k_cache,
                self.v_cache,
                self.block_table[b],
                int(self.kv_lens[b]),
                self.listed[b],
                kv_layout=self.kv_layout,
                sm_scale=self.sm_scale,
            )
            worst = max(worst, ((self.out[b].float() - ref).norm() / ref.norm()).item())
        if not worst <= REL_TOL:
            raise AssertionError(
                f"flashinfer {self.backend} differs from the reference: "
                f"relative error {worst:.2e} > {REL_TOL:.0e}"
            )
        return worst


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_row: torch.Tensor,
    kv_len: int,
    listed: torch.Tensor,
    *,
    kv_layout: str,
    sm_scale: float,
) -> torch.Tensor:
    """Float32 `[q, Hq, D]` attention of one sequence's window `q [q, Hq, D]` over the tokens of
    its `listed` blocks and its window's blocks, masked causally by absolute position
    (docs/ops.md's sparse_verify contract)."""
    q_len, num_qo_heads, head_dim = q.shape
    page, num_kv_heads = _cache_dims(k_cache, kv_layout)
    pos = torch.arange(kv_len, device=q.device)
    pages, slots = block_row.long()[pos // page], pos % page
    if kv_layout == "HND":
        keys, values = k_cache[pages, :, slots], v_cache[pages, :, slots]  # [L, Hkv, D]
    else:
        keys, values = k_cache[pages, slots], v_cache[pages, slots]
    block = pos // page
    in_set = (block >= (kv_len - q_len) // page) | torch.isin(block, listed.to(q.device))
    q_pos = kv_len - q_len + torch.arange(q_len, device=q.device)
    mask = in_set[None, :] & (pos[None, :] <= q_pos[:, None])  # [q, L]
    qg = q.float().view(q_len, num_kv_heads, num_qo_heads // num_kv_heads, head_dim)
    logits = torch.einsum("qhgd,lhd->hgql", qg, keys.float()) * sm_scale
    probs = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
    out = torch.einsum("hgql,lhd->qhgd", probs, values.float())
    return out.reshape(q_len, num_qo_heads, head_dim)


def main() -> None:
    """Check every backend, both layouts, P 16 and 64, dense and sparse, on a small case."""
    ok, why = available()
    print(why)
    if not ok:
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, context, q_len, num_qo_heads, num_kv_heads, head_dim = 3, 3000, 5, 28, 4, 128
    kv_lens = torch.tensor([context, context - 7, 1000], dtype=torch.int32, device="cuda")
    for page in (16, 64):
        blocks = _blocks_of(context, page)
        table = torch.randperm(batch * blocks, device="cuda", generator=gen).to(torch.int32)
        table = table.view(batch, blocks)
        dims = (batch, q_len, num_qo_heads, head_dim)
        q = torch.randn(dims, device="cuda", dtype=torch.bfloat16, generator=gen)
        # Every other block of the shortest sequence (at P 16 its window's first block too).
        ids = torch.arange(0, _blocks_of(int(kv_lens.min()), page), 2, dtype=torch.int32)
        ids = ids.expand(batch, -1).contiguous().cuda()
        counts = torch.full((batch,), ids.shape[1], dtype=torch.int32, device="cuda")
        for layout in ("HND", "NHD"):
            dims = (batch * blocks, num_kv_heads, page, head_dim)
            if layout == "NHD":
                dims = (batch * blocks, page, num_kv_heads, head_dim)
            k = torch.randn(dims, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(dims, device="cuda", dtype=torch.bfloat16, generator=gen)
            for backend in backends():
                for mode, lists in (("dense", ()), ("sparse", (ids, counts))):
                    fn = Verification(
                        q, k, v, table, kv_lens, *lists, kv_layout=layout, backend=backend
                    )
                    err = fn.check()
                    print(f"{backend} {layout} P={page} {mode}: relative error {err:.1e}")


if __name__ == "__main__":
    main()
