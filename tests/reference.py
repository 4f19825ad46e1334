# SPDX-License-Identifier: Apache-2.0
"""Float64 pure-PyTorch references of the three ops, written from docs/ops.md, not from the C++.

Each reference works sequence by sequence on plain gathered tensors, so it shares no indexing
code with the twins or kernels it checks.
"""

from __future__ import annotations

import math

import torch


def gather_tokens(
    cache: torch.Tensor, block_table: torch.Tensor, b: int, kv_len: int, kv_layout: str
) -> torch.Tensor:
    """Tokens 0..kv_len-1 of sequence b as a float64 ``[kv_len, Hkv, D]`` tensor."""
    page_size = cache.shape[1] if kv_layout == "NHD" else cache.shape[2]
    positions = torch.arange(kv_len, device=cache.device)
    pages = block_table[b].long()[positions // page_size]
    slots = positions % page_size
    tokens = cache[pages, slots] if kv_layout == "NHD" else cache[pages, :, slots]
    return tokens.double()


def attended_mask(
    kv_len: int, q_len: int, page_size: int, listed: list[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[q, kv_len]`` bool: listed blocks and the window's blocks, masked causally."""
    block_of = torch.arange(kv_len, device=device) // page_size
    first_window_block = (kv_len - q_len) // page_size
    in_set = block_of >= first_window_block
    if listed:
        in_set |= torch.isin(block_of, torch.tensor(listed, device=device))
    query_pos = kv_len - q_len + torch.arange(q_len, device=device)
    causal = torch.arange(kv_len, device=device)[None, :] <= query_pos[:, None]
    return in_set[None, :] & causal


def lists_of(block_ids: torch.Tensor, block_counts: torch.Tensor) -> list[list[list[int]]]:
    """Python lists ``[b][s]`` of the valid ids of each list (s over 1 or Hkv lists)."""
    ids = block_ids if block_ids.dim() == 3 else block_ids[:, None]
    counts = block_counts if block_counts.dim() == 2 else block_counts[:, None]
    return [
        [ids[b, s, : int(counts[b, s])].tolist() for s in range(ids.shape[1])]
        for b in range(ids.shape[0])
    ]


def sparse_verify(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    block_ids: torch.Tensor,
    block_counts: torch.Tensor,
    sm_scale: float,
    kv_layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(out [B, q, Hq, D], lse [B, q, Hq])`` of the sparse_verify contract."""
    batch, q_len, num_qo_heads = q.shape[:3]
    page_size = k_cache.shape[1] if kv_layout == "NHD" else k_cache.shape[2]
    num_kv_heads = k_cache.shape[2] if kv_layout == "NHD" else k_cache.shape[1]
    group = num_qo_heads // num_kv_heads
    lists = lists_of(block_ids, block_counts)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float64, device=q.device)
    for b in range(batch):
        kv_len = int(kv_lens[b])
        keys = gather_tokens(k_cache, block_table, b, kv_len, kv_layout)
        values = gather_tokens(v_cache, block_table, b, kv_len, kv_layout)
        for h in range(num_qo_heads):
            kv_head = h // group
            listed = lists[b][kv_head if len(lists[b]) > 1 else 0]
            mask = attended_mask(kv_len, q_len, page_size, listed, q.device)
            logits = sm_scale * (q[b, :, h].double() @ keys[:, kv_head].T)  # [q, kv_len]
            logits = logits.masked_fill(~mask, -math.inf)
            out[b, :, h] = torch.softmax(logits, dim=-1) @ values[:, kv_head]
            lse[b, :, h] = torch.logsumexp(logits, dim=-1)
    return out, lse


def block_scores(
    q_srh: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    head_map: torch.Tensor,
    sm_scale: float,
    block_size: int,
    kv_layout: str,
    num_blocks: int,
) -> torch.Tensor:
    """Float64 ``[B, NB]`` that block_scores adds into its scores."""
    batch, n, num_heads, _ = q_srh.shape
    added = torch.zeros(batch, num_blocks, dtype=torch.float64, device=q_srh.device)
    for b in range(batch):
        kv_len = int(kv_lens[b])
        keys = gather_tokens(k_cache, block_table, b, kv_len, kv_layout)
        for h in range(num_heads):
            kv_head = int(head_map[h])
            for i in range(n):
                pos = kv_len - n + i
                logits = sm_scale * (keys[: pos + 1, kv_head] @ q_srh[b, i, h].double())
                probs = torch.softmax(logits, dim=0)
                blocks = torch.arange(pos + 1, device=q_srh.device) // block_size
                added[b].index_add_(0, blocks, probs)
    return added


def select_capacity(
    num_blocks: int, budget_blocks: int, n_sink: int, n_recent: int, q_len: int, block_size: int
) -> int:
    """K of docs/ops.md."""
    forced_max = math.ceil(n_sink / block_size) + math.ceil((n_recent + q_len - 1) / block_size) + 1
    return min(num_blocks, max(budget_blocks, forced_max))


def rank_key(scores: list[float]):
    """Sort key of the ranking: score descending, ties toward the lower id, NaN last."""

    def key(blk: int) -> tuple[int, float, int]:
        score = scores[blk]
        return (1, 0.0, blk) if math.isnan(score) else (0, -score, blk)

    return key


def select_list(
    draft: list[float],
    target: list[float] | None,
    kv_len: int,
    q_len: int,
    block_size: int,
    budget_blocks: int,
    n_sink: int,
    n_recent: int,
    draft_share: float,
) -> list[int]:
    """The ascending ids of one list, following the four steps of docs/ops.md."""
    nblk = math.ceil(kv_len / block_size)
    forced = {t // block_size for t in range(min(n_sink, kv_len))}
    forced |= {t // block_size for t in range(max(0, kv_len - n_recent - q_len), kv_len)}
    count = min(nblk, max(budget_blocks, len(forced)))
    rest = count - len(forced)
    free = [blk for blk in range(nblk) if blk not in forced]
    by_draft = sorted(free, key=rank_key(draft))[: math.floor(rest * draft_share)]
    remaining = [blk for blk in free if blk not in by_draft]
    fill = sorted(remaining, key=rank_key(target if target is not None else draft))
    chosen = forced | set(by_draft) | set(fill[: rest - len(by_draft)])
    return sorted(chosen)


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
) -> list[list[list[int]]]:
    """The chosen ids ``[b][h]`` of every list (h over 1 list for ``[B, NB]`` scores)."""
    draft = draft_scores if draft_scores.dim() == 3 else draft_scores[:, None]
    target = None
    if target_scores is not None:
        target = target_scores if target_scores.dim() == 3 else target_scores[:, None]
    return [
        [
            select_list(
                draft[b, h].tolist(),
                None if target is None else target[b, h].tolist(),
                int(kv_lens[b]),
                q_len,
                block_size,
                budget_blocks,
                n_sink,
                n_recent,
                draft_share,
            )
            for h in range(draft.shape[1])
        ]
        for b in range(draft.shape[0])
    ]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))
