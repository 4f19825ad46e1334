# SPDX-License-Identifier: Apache-2.0
"""Verification policies: which KV blocks the target attends to in each speculative step.

Each policy is one small object with one job, ``select``: given the step's scoring signals, return
the block lists for ``sparse_verify`` (or None: every block, dense). The speculative loop
(``dustin.spec``) computes only the signals a policy asks for through ``draft_heads`` (lookahead:
the draft's queries at the drafted positions over the draft's cache) and ``target_heads``
(history: the target's queries of its previous verification over the target's cache).

Retrieval heads, draft share and budget of a model pair live in a JSON file (``PairConfig``);
``configs/`` holds the defaults for the bundled Qwen2.5-Coder pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dustin import ops
from dustin.config import ModelConfig
from dustin.model import BlockSelection

__all__ = [
    "POLICIES",
    "Dense",
    "DraftOnly",
    "Dustin",
    "HistoryOnly",
    "PairConfig",
    "Policy",
    "Quest",
    "Streaming",
    "make_policy",
]

CONFIG_DIR = Path(__file__).with_name("configs")
Head = tuple[int, int]  # (layer, query head)


@dataclass(frozen=True)
class PairConfig:
    """Sparse-verification settings of one draft/target pair (see ``configs/*.json``).

    ``draft_heads`` and ``target_heads`` are (layer, query head) retrieval heads of each model;
    ``draft_share`` is the share of the free budget filled by lookahead score; ``budget_tokens``,
    ``n_sink`` and ``n_recent`` are in tokens.
    """

    draft_heads: tuple[Head, ...]
    target_heads: tuple[Head, ...]
    draft_share: float = 0.5
    budget_tokens: int = 512
    n_sink: int = 4
    n_recent: int = 16
    note: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.draft_share <= 1.0:
            raise ValueError(f"PairConfig: draft_share must be in [0, 1], got {self.draft_share}")
        for name in ("budget_tokens", "n_sink", "n_recent"):
            if getattr(self, name) < 0:
                raise ValueError(f"PairConfig: {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def load(cls, path: str | Path) -> PairConfig:
        """Reads a pair config JSON file.

        Raises:
            FileNotFoundError: no such file. ValueError: the file is not a valid pair config.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"pair config {path}: not valid JSON ({exc})") from exc
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown or not {"draft_heads", "target_heads"} <= set(raw):
            raise ValueError(
                f"pair config {path}: needs draft_heads and target_heads, may have "
                f"{sorted(known)}; unknown keys {sorted(unknown)}"
            )
        try:
            raw["draft_heads"] = tuple((int(l), int(h)) for l, h in raw["draft_heads"])
            raw["target_heads"] = tuple((int(l), int(h)) for l, h in raw["target_heads"])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"pair config {path}: heads must be [layer, head] pairs ({exc})"
            ) from exc
        return cls(**raw)

    @classmethod
    def default_for(cls, draft: ModelConfig, target: ModelConfig) -> PairConfig:
        """Uncalibrated defaults for any pair: the first query head of every KV group in two
        layers at 1/2 and 2/3 of the depth, where retrieval heads are most often found."""

        def heads(config: ModelConfig) -> tuple[Head, ...]:
            layers = sorted({config.num_layers // 2, (2 * config.num_layers) // 3})
            group = config.num_heads // config.num_kv_heads
            return tuple((l, g * group) for l in layers for g in range(config.num_kv_heads))

        return cls(
            heads(draft), heads(target), note="uncalibrated defaults (PairConfig.default_for)"
        )

    def check(self, draft: ModelConfig, target: ModelConfig) -> None:
        """Raises ValueError when a head does not exist in its model."""
        for role, config, heads in (
            ("draft", draft, self.draft_heads),
            ("target", target, self.target_heads),
        ):
            for layer, head in heads:
                if not (0 <= layer < config.num_layers and 0 <= head < config.num_heads):
                    raise ValueError(
                        f"pair config: {role} head ({layer}, {head}) does not exist in the {role} "
                        f"model ({config.num_layers} layers, {config.num_heads} heads)"
                    )


def heads_by_layer(heads: tuple[Head, ...], device: torch.device) -> dict[int, torch.Tensor]:
    """layer -> ``[Hs]`` int64 query heads, the form ``Transformer`` records queries in."""
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(layer, []).append(head)
    return {
        l: torch.tensor(sorted(set(h)), dtype=torch.long, device=device) for l, h in layers.items()
    }


@dataclass(frozen=True)
class Signals:
    """Block scores ``[B, NB]`` float32 of one step; None where the policy asked for none."""

    lookahead: torch.Tensor | None
    history: torch.Tensor | None


@dataclass
class Policy:
    """Base of the policies: the signals wanted and the selection rule."""

    name = "policy"
    draft_heads: tuple[Head, ...] = ()
    target_heads: tuple[Head, ...] = ()

    def select(
        self, signals: Signals, kv_lens: torch.Tensor, q_len: int, page_size: int
    ) -> BlockSelection | None:
        """Blocks for one verification of ``q_len`` tokens; ``kv_lens`` ``[B]`` int32 counts the
        window. None means every block (dense)."""
        raise NotImplementedError


@dataclass
class Dense(Policy):
    """Classic speculative decoding: verification reads every block."""

    name = "dense"

    def select(self, signals, kv_lens, q_len, page_size):
        return None


@dataclass
class _Budgeted(Policy):
    """Shared fields of the policies that keep a budget of blocks (``select_blocks``)."""

    budget_tokens: int = 512
    n_sink: int = 4
    n_recent: int = 16

    def __post_init__(self) -> None:
        for name in ("budget_tokens", "n_sink", "n_recent"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{type(self).__name__}: {name} must be >= 0, got {getattr(self, name)}"
                )

    def _select(self, first, second, kv_lens, q_len, page_size, draft_share) -> BlockSelection:
        ids, counts = ops.select_blocks(
            first,
            second,
            kv_lens,
            q_len,
            page_size,
            -(-self.budget_tokens // page_size),
            self.n_sink,
            self.n_recent,
            draft_share,
        )
        return BlockSelection(ids, counts)


@dataclass
class Dustin(_Budgeted):
    """Hybrid: sinks and recent, then ``draft_share`` of the rest by lookahead, then history."""

    name = "dustin"
    draft_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.draft_share <= 1.0:
            raise ValueError(f"Dustin: draft_share must be in [0, 1], got {self.draft_share}")
        if not self.draft_heads or not self.target_heads:
            raise ValueError(
                "Dustin: needs retrieval heads of both models (draft_heads, target_heads)"
            )

    def select(self, signals, kv_lens, q_len, page_size):
        return self._select(
            signals.lookahead, signals.history, kv_lens, q_len, page_size, self.draft_share
        )


@dataclass
class DraftOnly(_Budgeted):
    """Sinks and recent, then the budget filled by lookahead score alone."""

    name = "draft-only"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.draft_heads:
            raise ValueError("DraftOnly: needs the draft's retrieval heads (draft_heads)")
        self.target_heads = ()

    def select(self, signals, kv_lens, q_len, page_size):
        return self._select(signals.lookahead, None, kv_lens, q_len, page_size, 1.0)


@dataclass
class HistoryOnly(_Budgeted):
    """Sinks and recent, then the budget filled by the previous verification's attention."""

    name = "history-only"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.target_heads:
            raise ValueError("HistoryOnly: needs the target's retrieval heads (target_heads)")
        self.draft_heads = ()

    def select(self, signals, kv_lens, q_len, page_size):
        # With no second signal select_blocks fills by the first: here the history.
        return self._select(signals.history, None, kv_lens, q_len, page_size, 0.0)


@dataclass
class Streaming(_Budgeted):
    """StreamingLLM-style: the sink blocks and the most recent blocks that fit the budget."""

    name = "streaming"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.draft_heads = self.target_heads = ()

    def select(self, signals, kv_lens, q_len, page_size):
        # A score rising with the block id makes the budget fill from the end: recency.
        num_blocks = -(-int(kv_lens.max()) // page_size)
        recency = torch.arange(num_blocks, dtype=torch.float32, device=kv_lens.device)
        return self._select(
            recency.expand(kv_lens.shape[0], num_blocks).contiguous(),
            None,
            kv_lens,
            q_len,
            page_size,
            1.0,
        )


POLICIES = {p.name: p for p in (Dense, Dustin, DraftOnly, HistoryOnly, Streaming)}


def make_policy(name: str, pair: PairConfig, budget_tokens: int | None = None) -> Policy:
    """The policy called ``name`` with the pair's heads and settings (budget overridable).

    Raises:
        ValueError: unknown name.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "dense":
        return Dense()
    kwargs = {
        "draft_heads": pair.draft_heads,
        "target_heads": pair.target_heads,
        "budget_tokens": pair.budget_tokens if budget_tokens is None else budget_tokens,
        "n_sink": pair.n_sink,
        "n_recent": pair.n_recent,
    }
    if name == "dustin":
        kwargs["draft_share"] = pair.draft_share
    return POLICIES[name](**kwargs)


@dataclass
class Quest(_Budgeted):
    """Quest-style query-aware selection (Tang et al., 2024), the strongest query-aware baseline.

    In every layer each page's keys are bounded by their elementwise min and max; the
    verification window's own queries give an upper bound of their attention logit on a page,
    ``q+ . k_max + q- . k_min``; each KV head keeps sinks, recent and then the pages with the
    highest bound over its query heads and window tokens. Because it selects per layer and per
    KV head from the verification's own queries it cannot choose once before the forward pass
    as the other policies do: it runs through ``select_layer`` inside the layer loop
    (``dustin.evaluate.forward_per_layer``).
    """

    name = "quest"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.draft_heads = self.target_heads = ()

    def select(self, signals, kv_lens, q_len, page_size):
        raise NotImplementedError(
            "Quest selects inside every layer from the verification's own queries; call "
            "select_layer from the layer loop (dustin.evaluate.forward_per_layer)"
        )

    def select_layer(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        block_table: torch.Tensor,
        kv_lens: torch.Tensor,
        page_size: int,
        layout: str,
    ) -> BlockSelection:
        """Per-KV-head blocks for one layer.

        Args:
            q: ``[B, q, Hq, D]`` the window's queries in this layer (post-RoPE).
            k_cache: this layer's key pages, ``[num_pages, Hkv, P, D]`` (HND) or
                ``[num_pages, P, Hkv, D]`` (NHD), the window already written.
            block_table: ``[B, NB]`` int32; kv_lens: ``[B]`` int32 counting the window.
            page_size: P, the selection block; layout: ``"HND"`` or ``"NHD"``.

        Returns:
            ``BlockSelection`` with ``[B, Hkv, K]`` ids and ``[B, Hkv]`` counts.
        """
        page_axis = 2 if layout == "HND" else 1
        # Bounds of whole pages: slots past a sequence's end lie only in the window's last
        # page, which is always attended, so they never change a choice.
        k_max = k_cache.amax(page_axis).float()  # [num_pages, Hkv, D]
        k_min = k_cache.amin(page_axis).float()
        pages = block_table.long()
        k_max = k_max[pages].transpose(1, 2)  # [B, Hkv, NB, D]
        k_min = k_min[pages].transpose(1, 2)
        batch, q_len, num_heads, dim = q.shape
        num_kv_heads = k_max.shape[1]
        # [B, Hkv, G * q, D]: the query heads of one KV head and the window's tokens as rows.
        rows = q.float().view(batch, q_len, num_kv_heads, num_heads // num_kv_heads, dim)
        rows = rows.permute(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, -1, dim)
        bound = rows.clamp(min=0) @ k_max.transpose(-1, -2) + rows.clamp(max=0) @ k_min.transpose(
            -1, -2
        )
        scores = bound.amax(2).contiguous()  # [B, Hkv, NB]: a page matters if any row may attend it
        ids, counts = ops.select_blocks(
            scores,
            None,
            kv_lens,
            q_len,
            page_size,
            -(-self.budget_tokens // page_size),
            self.n_sink,
            self.n_recent,
            1.0,
        )
        return BlockSelection(ids, counts)
