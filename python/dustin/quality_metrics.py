# SPDX-License-Identifier: Apache-2.0
"""Quality metrics of sparse verification: true attention mass, attended sets, recall, tallies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dustin import ops
from dustin.cache import PagedKVCache
from dustin.model import BlockSelection, Transformer

__all__ = [
    "Tally",
    "attended_blocks",
    "attended_mask",
    "attention_recall",
    "paired_difference",
    "per_head_block_scores",
    "token_nll",
    "true_attention_mass",
]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over paired samples and its standard error.

    Teacher-forced variants verify the same drafts at the same positions, so per-verification
    differences cancel the noise the positions share; that error is what a difference between
    two policies must beat to mean anything.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} samples against {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean = _mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    spread = sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(spread / len(diffs))


@dataclass
class Tally:
    """Per-variant sums over the teacher-forced steps of all windows."""

    accepted: list[int] = field(default_factory=list)  # accepted drafts per (step, window)
    nll: list[float] = field(default_factory=list)  # per predicted real token
    agree: list[bool] = field(default_factory=list)  # argmax equals dense's, per real token
    recall: list[float] = field(default_factory=list)  # per (step, window)
    read_share: list[float] = field(default_factory=list)  # per step

    def summary(self, gamma: int, dense: Tally | None) -> dict:
        accepted = _mean(self.accepted)
        out = {
            "mean_accepted_length": accepted + 1.0,
            "acceptance_rate": accepted / gamma,
            "top1_agreement_with_dense": _mean([float(a) for a in self.agree]),
            "perplexity": math.exp(_mean(self.nll)),
            "attention_recall": _mean(self.recall),
            "kv_read_share": _mean(self.read_share),
            "steps": len(self.accepted),
            # In verification order, the same for every variant: reports pair any two rows.
            "accepted_per_step": list(self.accepted),
        }
        if dense is not None:
            out["retention"] = out["mean_accepted_length"] / (_mean(dense.accepted) + 1.0)
            diff, stderr = paired_difference(self.accepted, dense.accepted)
            out["accepted_diff_vs_dense"] = diff
            out["accepted_diff_stderr"] = stderr
        return out


def true_attention_mass(
    model: Transformer, cache: PagedKVCache, queries: dict[int, torch.Tensor]
) -> torch.Tensor:
    """``[B, L, Hkv, T]``: attention mass on each position, summed over each KV head's query
    heads and the window's queries, per layer (``T`` = longest sequence)."""
    c = model.config
    group = c.num_heads // c.num_kv_heads
    length = int(cache.kv_lens.max())
    mass = torch.zeros(
        cache.batch_size,
        c.num_layers,
        c.num_kv_heads,
        length,
        dtype=torch.float32,
        device=model.device,
    )
    for layer, q in queries.items():
        for g in range(c.num_kv_heads):
            heads = q[:, :, g * group : (g + 1) * group].contiguous()
            head_map = torch.full((group,), g, dtype=torch.int32, device=model.device)
            ops.block_scores(
                heads,
                cache.k(layer),
                cache.block_table,
                cache.kv_lens,
                head_map,
                model.sm_scale,
                1,
                cache.layout,
                mass[:, layer, g],
            )
    return mass


def attended_blocks(
    selection: BlockSelection | None,
    kv_lens: torch.Tensor,
    q_len: int,
    page_size: int,
    num_blocks: int,
) -> torch.Tensor:
    """``[B, Hs, NB]`` bool: blocks a verification attends (listed blocks plus the window's
    blocks); ``Hs`` is 1 for shared lists and for None (dense), the list count otherwise."""
    batch = kv_lens.shape[0]
    block = torch.arange(num_blocks, device=kv_lens.device)
    if selection is None:
        return torch.ones(batch, 1, num_blocks, dtype=torch.bool, device=kv_lens.device)
    first_window = ((kv_lens - q_len) // page_size).long()
    ids, counts = selection.block_ids.long(), selection.block_counts
    if ids.dim() == 2:
        ids, counts = ids[:, None], counts[:, None]
    listed = (
        (torch.arange(ids.shape[-1], device=ids.device) < counts[..., None])
        & (ids >= 0)
        & (ids < num_blocks)
    )
    blocks = torch.zeros(
        batch, ids.shape[1], num_blocks + 1, dtype=torch.bool, device=kv_lens.device
    )
    blocks.scatter_(
        2, torch.where(listed, ids, num_blocks), True
    )  # unlisted slots land in the spare column
    return blocks[..., :num_blocks] | (block >= first_window[:, None, None])


def attended_mask(
    selection: BlockSelection | None, kv_lens: torch.Tensor, q_len: int, page_size: int, length: int
) -> torch.Tensor:
    """``[B, Hs, T]`` bool: ``attended_blocks`` spread over the first ``length`` positions."""
    blocks = attended_blocks(selection, kv_lens, q_len, page_size, -(-length // page_size))
    return blocks.repeat_interleave(page_size, dim=2)[..., :length]


def attention_recall(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` share of the true mass (``[B, L, Hkv, T]``) on attended positions; ``mask``
    ``[B, Hs, T]`` (one mask for all layers) or ``[B, L, Hkv, T]`` (per layer and KV head)."""
    if mask.dim() == 3:
        mask = mask[:, None]
    return (mass * mask).sum((1, 2, 3)) / mass.sum((1, 2, 3))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).tolist()


def per_head_block_scores(
    model: Transformer, cache: PagedKVCache, queries: dict[int, torch.Tensor], page_size: int
) -> torch.Tensor:
    """``[B, L * Hq, NB]``: each (layer, query head)'s block scores, head ``layer * Hq + h``."""
    c = model.config
    group = c.num_heads // c.num_kv_heads
    num_blocks = -(-int(cache.kv_lens.max()) // page_size)
    scores = torch.zeros(
        cache.batch_size,
        c.num_layers * c.num_heads,
        num_blocks,
        dtype=torch.float32,
        device=model.device,
    )
    for layer, q in queries.items():
        for h in range(c.num_heads):
            head_map = torch.tensor([h // group], dtype=torch.int32, device=model.device)
            ops.block_scores(
                q[:, :, h : h + 1].contiguous(),
                cache.k(layer),
                cache.block_table,
                cache.kv_lens,
                head_map,
                model.sm_scale,
                page_size,
                cache.layout,
                scores[:, layer * c.num_heads + h],
            )
    return scores
