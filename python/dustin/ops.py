# SPDX-License-Identifier: Apache-2.0
"""Typed wrappers over ``torch.ops.dustin.*``: output allocation, out-variants, value checks.

The contracts are those of ``docs/ops.md``. Shape letters: B sequences, q query tokens, Hq query
heads, Hkv KV heads, D head dim, P page size, NB score blocks, K list capacity.

Every op checks its arguments' metadata (dtype, device, rank, shape, stride). Checks of tensor
*values* (lengths, pages, ids) always run on CPU tensors; for CUDA tensors they need a copy to
the host, so the wrappers run them when ``validate=True`` (the default) unless a CUDA graph is
being captured or the call is being traced by ``torch.compile``.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from dustin import _C

__all__ = [
    "DECODE_LINEAR_MAX_NORMED_K",
    "DECODE_LINEAR_MAX_ROWS",
    "SUPPORTED",
    "block_scores",
    "decode_linear",
    "dense_block_lists",
    "select_blocks",
    "select_blocks_out",
    "select_capacity",
    "sparse_verify",
    "sparse_verify_out",
    "sparse_verify_workspace_bytes",
    "store_kv",
]

#: What the built kernels support: ``head_dims``, ``max_group_size``, ``max_query_len``,
#: ``max_score_rows``, ``decode_linear_max_rows``, ``decode_linear_max_normed_k``,
#: ``page_sizes`` (inclusive range), ``cuda_dtypes`` and ``cpu_dtypes``.
SUPPORTED = MappingProxyType(dict(_C.SUPPORTED))
#: Most rows (the product of x's leading dims) ``decode_linear`` takes.
DECODE_LINEAR_MAX_ROWS = SUPPORTED["decode_linear_max_rows"]
#: Most K ``decode_linear`` takes with ``norm_weight`` on CUDA.
DECODE_LINEAR_MAX_NORMED_K = SUPPORTED["decode_linear_max_normed_k"]


def _validate_on_host(validate: bool, tensor: torch.Tensor) -> bool:
    """True when the value checks must be run here (CUDA tensors, outside capture and tracing)."""
    return (
        validate
        and tensor.is_cuda
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def sparse_verify(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_ids: torch.Tensor,
    block_counts: torch.Tensor,
    sm_scale: float,
    kv_layout: str = "HND",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a verification window over listed KV blocks plus the window's own blocks.

    Query token i of sequence b sits at position ``kv_lens[b] - q + i`` and attends, causally,
    to every token of the listed blocks and of the blocks holding the window. Listing every
    block (``dense_block_lists``) gives dense causal attention.

    Args:
        q: ``[B, q, Hq, D]`` bf16 | fp16 (fp32 too on CPU), innermost stride 1.
        k_cache: ``[num_pages, P, Hkv, D]`` (NHD) or ``[num_pages, Hkv, P, D]`` (HND), dtype of q.
        v_cache: same shape, strides and dtype as ``k_cache``.
        block_table: ``[B, max_pages]`` int32 physical page of each logical page.
        kv_lens: ``[B]`` int32 tokens in the cache, the window included (``q <= kv_lens[b]``).
        block_ids: ``[B, K]`` int32 (one list per sequence) or ``[B, Hkv, K]`` (one per KV
            head; ``[B, 1, K]`` is shared): ascending, unique logical block ids.
        block_counts: ``[B]`` or ``[B, Hkv]`` int32 valid ids per list, in ``[0, K]``.
        sm_scale: scale of ``q . k`` before the softmax, usually ``D ** -0.5``.
        kv_layout: ``"HND"`` or ``"NHD"``.
        validate: check tensor values of CUDA inputs on the host first (CPU: always checked).

    Returns:
        ``(out, lse)``: ``out [B, q, Hq, D]`` in q's dtype and ``lse [B, q, Hq]`` float32, the
        natural log of the sum of ``exp(sm_scale * q . k)`` over the attended positions.

    Raises:
        TypeError: a dtype is wrong.
        IndexError: a length, page or block id is out of range.
        NotImplementedError: D, G, q or the dtype has no CUDA kernel (see ``SUPPORTED``).
        ValueError: any other argument breaks the contract.

    Example:
        >>> ids, counts = dense_block_lists(kv_lens, page_size=16)
        >>> out, lse = sparse_verify(q, k_cache, v_cache, block_table, kv_lens, ids, counts,
        ...                          q.shape[-1] ** -0.5, "HND")
    """
    if _validate_on_host(validate, q):
        _C.validate_sparse_verify(
            q, k_cache, v_cache, block_table, kv_lens, block_ids, block_counts, sm_scale, kv_layout
        )
    return torch.ops.dustin.sparse_verify(
        q, k_cache, v_cache, block_table, kv_lens, block_ids, block_counts, sm_scale, kv_layout
    )


def sparse_verify_out(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_ids: torch.Tensor,
    block_counts: torch.Tensor,
    sm_scale: float,
    kv_layout: str,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None = None,
    validate: bool = True,
) -> None:
    """``sparse_verify`` writing into caller buffers (CUDA-graph safe with a workspace).

    Args:
        q, k_cache, v_cache, block_table, kv_lens, block_ids, block_counts, sm_scale, kv_layout:
            as for ``sparse_verify``.
        out: ``[B, q, Hq, D]`` contiguous, dtype of q.
        lse: ``[B, q, Hq]`` contiguous float32.
        workspace: uint8 ``[bytes]`` on q's device, ``sparse_verify_workspace_bytes(...)``
            bytes, or None to let the op allocate it from PyTorch's caching allocator. A smaller
            one caps how far the kernel splits long lists (same results; empty: no split).
        validate: as for ``sparse_verify``.

    Raises:
        As ``sparse_verify``; ValueError also for a wrong ``out``, ``lse`` or ``workspace``.

    Example:
        >>> out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
        >>> sparse_verify_out(q, k_cache, v_cache, block_table, kv_lens, ids, counts,
        ...                   q.shape[-1] ** -0.5, "HND", out, lse)
    """
    if _validate_on_host(validate, q):
        _C.validate_sparse_verify(
            q, k_cache, v_cache, block_table, kv_lens, block_ids, block_counts, sm_scale, kv_layout
        )
    torch.ops.dustin.sparse_verify_out(
        q,
        k_cache,
        v_cache,
        block_table,
        kv_lens,
        block_ids,
        block_counts,
        sm_scale,
        kv_layout,
        out,
        lse,
        workspace,
    )


def sparse_verify_workspace_bytes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_ids: torch.Tensor,
    kv_layout: str = "HND",
) -> int:
    """Bytes of the ``workspace`` that lets ``sparse_verify_out`` split long lists on CUDA.

    Depends only on the shapes (and the current GPU), so one workspace serves every step of a
    captured graph. 0 for CPU tensors and when no split would be used.

    Args:
        q: ``[B, q, Hq, D]``; k_cache: the cache; block_table: ``[B, max_pages]``;
        block_ids: ``[B, K]`` or ``[B, Hkv, K]``; kv_layout: ``"HND"`` or ``"NHD"``.

    Returns:
        The workspace size in bytes.

    Example:
        >>> nbytes = sparse_verify_workspace_bytes(q, k_cache, block_table, ids, "HND")
        >>> workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    """
    return int(_C.sparse_verify_workspace_bytes(q, k_cache, block_table, block_ids, kv_layout))


def block_scores(
    q_srh: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    head_map: torch.Tensor,
    sm_scale: float,
    block_size: int,
    kv_layout: str,
    scores: torch.Tensor,
    workspace: torch.Tensor | None = None,
    validate: bool = True,
) -> None:
    """Adds the softmax attention of retrieval-head queries into per-block ``scores``.

    Query i of the n queries of sequence b sits at position ``kv_lens[b] - n + i``; for each
    query and head its exact softmax over positions ``0..pos`` is added into
    ``scores[b, position // block_size]``. Calling it once per retrieval layer accumulates.

    Args:
        q_srh: ``[B, n, Hs, D]`` queries of the Hs retrieval heads, dtype of the cache.
        k_cache: the cache read (``[num_pages, P, Hkv, D]`` NHD or ``[num_pages, Hkv, P, D]``
            HND); its page size P may differ from ``block_size``.
        block_table: ``[B, max_pages]`` int32.
        kv_lens: ``[B]`` int32, ``n <= kv_lens[b] <= max_pages * P``.
        head_map: ``[Hs]`` int32 KV head each retrieval head reads.
        sm_scale: scale of ``q . k``.
        block_size: tokens per score block (the consumer's page size).
        kv_layout: ``"HND"`` or ``"NHD"``.
        scores: ``[B, NB]`` float32, innermost stride 1, ``NB >= ceil(kv_lens[b] / block_size)``;
            accumulated into.
        workspace: uint8 scratch on the device, or None to allocate it (CUDA only).
        validate: check tensor values of CUDA inputs on the host first (CPU: always checked).

    Raises:
        TypeError, IndexError, NotImplementedError, ValueError: as for ``sparse_verify``.

    Example:
        >>> scores = torch.zeros(B, num_blocks, dtype=torch.float32)
        >>> block_scores(q_srh, k_cache, block_table, kv_lens, head_map, D ** -0.5, 16, "HND",
        ...              scores)
    """
    if _validate_on_host(validate, q_srh):
        _C.validate_block_scores(
            q_srh, k_cache, block_table, kv_lens, head_map, sm_scale, block_size, kv_layout, scores
        )
    torch.ops.dustin.block_scores(
        q_srh,
        k_cache,
        block_table,
        kv_lens,
        head_map,
        sm_scale,
        block_size,
        kv_layout,
        scores,
        workspace,
    )


def select_blocks(
    draft_scores: torch.Tensor,
    target_scores: torch.Tensor | None,
    kv_lens: torch.Tensor,
    q_len: int,
    block_size: int,
    budget_blocks: int,
    n_sink: int,
    n_recent: int,
    draft_share: float,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budgeted block selection: forced sink and recent blocks, draft picks, target fill.

    For a sequence with ``nblk = ceil(kv_lens[b] / block_size)`` blocks: the blocks holding the
    first ``n_sink`` tokens and the last ``n_recent + q_len`` tokens are forced;
    ``count = min(nblk, max(budget_blocks, forced))``; of the ``rest = count - forced`` free
    slots, ``floor(rest * draft_share)`` go to the best other blocks by draft score, the others
    to the best remaining blocks by target score (draft score when ``target_scores`` is None).
    Ranking: score descending, ties toward the lower id, NaN below every number.

    Args:
        draft_scores: ``[B, NB]`` (one list per sequence) or ``[B, H, NB]`` (per KV head)
            float32, innermost stride 1.
        target_scores: same shape and dtype, or None.
        kv_lens: ``[B]`` int32, ``q_len <= kv_lens[b] <= NB * block_size``.
        q_len: tokens of the verification window (>= 1).
        block_size: tokens per block (>= 1).
        budget_blocks: blocks per list before forced blocks are added (>= 0).
        n_sink: leading tokens always kept (>= 0).
        n_recent: tokens before the window always kept (>= 0).
        draft_share: share of the free slots filled by draft score, in ``[0, 1]``.
        validate: check ``kv_lens`` of CUDA inputs on the host first (CPU: always checked).

    Returns:
        ``(block_ids, block_counts)``: ``[B, K]`` / ``[B, H, K]`` int32 ids, ascending, -1 past
        the count, and ``[B]`` / ``[B, H]`` int32 counts; ``K = select_capacity(...)``.

    Raises:
        TypeError, IndexError, ValueError: as for ``sparse_verify``.

    Example:
        >>> ids, counts = select_blocks(draft, target, kv_lens, q_len=5, block_size=16,
        ...                             budget_blocks=32, n_sink=4, n_recent=16, draft_share=0.5)
    """
    if _validate_on_host(validate, draft_scores):
        _C.validate_select_blocks(
            draft_scores,
            target_scores,
            kv_lens,
            q_len,
            block_size,
            budget_blocks,
            n_sink,
            n_recent,
            draft_share,
        )
    return torch.ops.dustin.select_blocks(
        draft_scores,
        target_scores,
        kv_lens,
        q_len,
        block_size,
        budget_blocks,
        n_sink,
        n_recent,
        draft_share,
    )


def select_blocks_out(
    draft_scores: torch.Tensor,
    target_scores: torch.Tensor | None,
    kv_lens: torch.Tensor,
    q_len: int,
    block_size: int,
    budget_blocks: int,
    n_sink: int,
    n_recent: int,
    draft_share: float,
    block_ids: torch.Tensor,
    block_counts: torch.Tensor,
    validate: bool = True,
) -> None:
    """``select_blocks`` writing into caller buffers (CUDA-graph safe).

    Args:
        draft_scores, target_scores, kv_lens, q_len, block_size, budget_blocks, n_sink,
            n_recent, draft_share, validate: as for ``select_blocks``.
        block_ids: ``[B, K]`` / ``[B, H, K]`` int32 contiguous, ``K = select_capacity(...)``.
        block_counts: ``[B]`` / ``[B, H]`` int32 contiguous.

    Raises:
        As ``select_blocks``; ValueError also for wrong ``block_ids`` or ``block_counts``.

    Example:
        >>> k = select_capacity(nb, 32, 4, 16, 5, 16)
        >>> ids = torch.empty(B, k, dtype=torch.int32); counts = torch.empty(B, dtype=torch.int32)
        >>> select_blocks_out(draft, None, kv_lens, 5, 16, 32, 4, 16, 1.0, ids, counts)
    """
    if _validate_on_host(validate, draft_scores):
        _C.validate_select_blocks(
            draft_scores,
            target_scores,
            kv_lens,
            q_len,
            block_size,
            budget_blocks,
            n_sink,
            n_recent,
            draft_share,
        )
    torch.ops.dustin.select_blocks_out(
        draft_scores,
        target_scores,
        kv_lens,
        q_len,
        block_size,
        budget_blocks,
        n_sink,
        n_recent,
        draft_share,
        block_ids,
        block_counts,
    )


def select_capacity(
    num_blocks: int, budget_blocks: int, n_sink: int, n_recent: int, q_len: int, block_size: int
) -> int:
    """Capacity K of each ``select_blocks`` list: enough for the budget and every forced block.

    ``K = min(NB, max(budget_blocks, ceil(n_sink / bs) + ceil((n_recent + q_len - 1) / bs) + 1))``
    (the shared C++ rule of ``include/dustin/select_blocks_params.h``).

    Example:
        >>> select_capacity(num_blocks=512, budget_blocks=32, n_sink=4, n_recent=16, q_len=5,
        ...                 block_size=16)
        32
    """
    return int(_C.select_capacity(num_blocks, budget_blocks, n_sink, n_recent, q_len, block_size))


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    slots: torch.Tensor,
    kv_layout: str = "HND",
    validate: bool = True,
) -> None:
    """Writes a window's keys and values into one layer's paged cache, in one launch.

    Token i goes to slot ``slots[i]`` of physical page ``pages[i]``:
    ``k_cache[pages[i], :, slots[i]] = k[i]`` (HND; ``k_cache[pages[i], slots[i]]`` for NHD), and
    the same for v. Nothing is read back to the host, so a CUDA graph can capture it with
    ``pages`` and ``slots`` computed on the device. On CUDA, entries with a page or slot out of
    range are skipped (never written out of bounds); on the CPU they raise. Which of two entries
    naming the same place lands is unspecified.

    Args:
        k: ``[N, Hkv, D]`` in the caches' dtype (fp32 | fp16 | bf16), innermost stride 1 (other
            strides are free, e.g. a slice of a fused projection).
        v: same shape and dtype as k (its own strides).
        k_cache: ``[num_pages, Hkv, P, D]`` (HND) or ``[num_pages, P, Hkv, D]`` (NHD), innermost
            stride 1, e.g. a view into a larger pool (``PagedKVCache.k(layer)``); written.
        v_cache: same shape, strides, dtype and device as ``k_cache``; written.
        pages: ``[N]`` int64 or int32 physical page of each token, in ``[0, num_pages)``.
        slots: ``[N]`` slot of each token in its page, in ``[0, P)``, dtype of ``pages``.
        kv_layout: ``"HND"`` or ``"NHD"``.
        validate: check ``pages`` and ``slots`` of CUDA inputs on the host first (a sync;
            skipped during CUDA-graph capture; CPU: always checked).

    Raises:
        TypeError: a dtype is wrong.
        IndexError: a page or slot is out of range.
        ValueError: any other argument breaks the contract.

    Example:
        >>> store_kv(k, v, cache.k(layer), cache.v(layer), pages, slots, "HND")
    """
    if _validate_on_host(validate, k_cache):
        _C.validate_store_kv(k, v, k_cache, v_cache, pages, slots, kv_layout)
    torch.ops.dustin.store_kv(k, v, k_cache, v_cache, pages, slots, kv_layout)


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gated: bool = False,
    *,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_columns: int = 0,
) -> torch.Tensor:
    """The linear layer of a decode step: ``x @ weight.T + bias`` for at most 16 rows of x, in one
    launch that streams the weight once (a library GEMM's tiles are made for many rows, and for
    long K it splits K and reduces in a second launch).

    With ``gated``, ``weight`` stacks a gate and an up projection (``[2I, K]``, as a fused
    gate/up weight does) and the result is ``silu(x @ gate.T) * (x @ up.T)`` ``[..., I]``, the
    MLP's activation, without writing the two halves out first. Products accumulate in float32
    and round once, to x's dtype. No host synchronisation: a CUDA graph can capture it.

    The glue of a decoder layer can ride along, so that it costs no launch of its own:
    ``norm_weight`` applies an RMSNorm to x first (the products read ``x * norm_weight``
    rounded to the dtype; the float32 sums are scaled by ``rsqrt(mean(x**2) + norm_eps)`` of
    each row, before bias and activation), ``residual`` is added to the rounded result
    (``residual + y`` as a separate add would round it), and ``rope`` rotates the first
    ``rope_columns`` columns (q and k of a fused q/k/v projection; not with gated or residual)
    as RoPE's rotate-half convention does, heads of ``D = cos.shape[-1]``: the rounded result
    ``v`` becomes ``v * cos + rotate_half(v) * sin`` per head, rounded once.

    Args:
        x: ``[..., K]`` bf16 | fp16 (fp32 too on CPU) with at most 16 rows (the product of the
            leading dims), innermost stride 1; on CUDA K a multiple of 8 and x 16-byte aligned.
        weight: ``[N, K]`` dtype and device of x, innermost stride 1, row stride a multiple of 8
            elements on CUDA (``nn.Linear.weight`` is).
        bias: ``[N]`` contiguous, or None.
        gated: see above; N must be even.
        norm_weight: ``[K]`` contiguous, or None for no norm; on CUDA 16-byte aligned, and K at
            most ``DECODE_LINEAR_MAX_NORMED_K`` (2048: each CTA normalises x in shared memory).
        norm_eps: the RMSNorm's epsilon, finite and >= 0.
        residual: shaped like the result, innermost stride 1, or None.
        rope: ``(cos, sin)``, each ``[..., D]`` with x's leading dims (one row of angles per
            row of x: ``[B, n, 1, D]`` as a model's RoPE tables are works), innermost stride 1,
            one row stride, D a multiple of 8 dividing N; or None.
        rope_columns: how many leading columns rotate, a multiple of D (with ``rope``).

    Returns:
        ``[..., N]``, or ``[..., N / 2]`` when gated, contiguous.

    Raises:
        TypeError: a dtype is wrong.
        ValueError: more than 16 rows, or any other argument breaks the contract.
        NotImplementedError: float32 on CUDA, or a norm with K above 2048 there.

    Example:
        >>> h = decode_linear(x, mlp.fused_gate_up_weight, gated=True)  # [16, I]
        >>> h = decode_linear(x, w_qkv, b_qkv, norm_weight=norm.weight, norm_eps=norm.eps)
        >>> qkv = decode_linear(x, w_qkv, b_qkv, rope=(cos, sin), rope_columns=(hq + hkv) * d)
    """
    lead = x.shape[:-1]
    if residual is not None:
        residual = residual.reshape(-1, residual.shape[-1])
    cos, sin = (None, None) if rope is None else (t.reshape(-1, t.shape[-1]) for t in rope)
    y = torch.ops.dustin.decode_linear(
        x.reshape(-1, x.shape[-1]),
        weight,
        bias,
        gated,
        norm_weight,
        norm_eps,
        residual,
        cos,
        sin,
        rope_columns,
    )
    return y.view(*lead, y.shape[-1])


def dense_block_lists(
    kv_lens: torch.Tensor, page_size: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists naming every block of each sequence: ``sparse_verify`` on them is dense.

    Args:
        kv_lens: ``[B]`` int32 tokens per sequence.
        page_size: P of the cache.
        capacity: list capacity K; None uses the most blocks any sequence has (a host sync).

    Returns:
        ``(block_ids [B, K] int32, block_counts [B] int32)`` on kv_lens' device; ids past a
        sequence's count are -1.

    Example:
        >>> ids, counts = dense_block_lists(torch.tensor([40, 17], dtype=torch.int32), 16)
        >>> ids.tolist(), counts.tolist()
        ([[0, 1, 2], [0, 1, -1]], [3, 2])
    """
    counts = torch.div(kv_lens + (page_size - 1), page_size, rounding_mode="floor").to(torch.int32)
    if capacity is None:
        capacity = int(counts.max()) if counts.numel() else 0
    ids = torch.arange(capacity, dtype=torch.int32, device=kv_lens.device).expand(
        kv_lens.shape[0], capacity
    )
    ids = torch.where(ids < counts[:, None], ids, -1).contiguous()
    return ids, counts
