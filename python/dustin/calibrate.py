# SPDX-License-Identifier: Apache-2.0
"""Calibration of a draft/target pair: retrieval heads of both models and the draft share.

Three stages on teacher-forced windows of calibration text (``dustin.evaluate.teacher_forced``):

1. rank every (layer, query head) of each model by how well its attention predicts the target's
   true attention mass (all layers and heads) on the following positions: the draft's heads
   from its queries at the drafted positions (lookahead), the target's from its queries at the
   previous verification window (history). A head's score is the share of the true mass
   recalled by the blocks ``select_blocks`` would choose from that head alone at the budget;
2. choose layers greedily, each bringing its best ``heads_per_layer`` heads, adding the layer
   that most raises the recall of the summed scores until the gain is negligible;
3. search the draft share on a grid, for the chosen heads and for the default heads alike:
   Dustin verifies teacher-forced drafts with each (heads, share); the objective is acceptance
   retention (mean accepted length relative to dense verification), counted only up to 1, plus
   a quarter of the attention recall, which breaks the ties a few hundred drafts leave in
   retention. Retention above 1 is not a gain: a sparse verifier that accepts more drafts than
   dense has drifted toward the draft (its top-1 agreement with dense falls). The best candidate
   wins, so the result never scores below the uncalibrated defaults on the calibration windows
   (on the H200 at 32k, the greedy heads alone scored below them: 0.950 retention against 0.972);
4. adopt the winner over the defaults only when its accepted drafts per verification lead
   theirs by a margin that survives having picked the best of many candidates (paired
   difference at least ``z`` standard errors, ``z`` the two-sided 5% family-wise bound over the
   comparisons, 2.81 for ten); otherwise the config is the defaults. On the H200 at 32k the
   winner (default heads at share 0.75) led the defaults by 0.090 +- 0.034 drafts on its eight
   calibration windows and by -0.002 +- 0.011 on twelve held-out ones: a winner's curse.

The result is a ``PairConfig`` JSON the engine reads (``--pair-config``), plus a report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dustin import ops
from dustin.evaluate import PrefilledWindow, Variant, teacher_forced
from dustin.model import BlockSelection, Transformer
from dustin.policies import Dustin, PairConfig
from dustin.quality_metrics import attended_blocks, paired_difference

__all__ = [
    "add_arguments",
    "adopt_over_defaults",
    "calibrate",
    "choose_heads",
    "head_recall",
    "run",
]

RECALL_WEIGHT = 0.25  # objective = min(retention, 1) + RECALL_WEIGHT * recall
DEFAULT_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def adopt_over_defaults(
    summaries: dict[str, dict], best_label: str, default_label: str, comparisons: int
) -> tuple[bool, dict]:
    """Whether the best candidate replaces the defaults, and why.

    It must accept more drafts per verification than the defaults on the same teacher-forced
    steps by at least ``z`` paired standard errors, ``z`` the two-sided 5% Bonferroni bound for
    ``comparisons`` candidates tried against the defaults: the best of many noisy candidates
    leads by chance, so one standard margin is not enough.
    """
    z = statistics.NormalDist().inv_cdf(1.0 - 0.05 / (2 * max(comparisons, 1)))
    if best_label == default_label:
        return False, {"best": best_label, "margin_z": z, "lead": 0.0, "lead_stderr": 0.0}
    lead, stderr = paired_difference(
        summaries[best_label]["accepted_per_step"], summaries[default_label]["accepted_per_step"]
    )
    adopted = lead > 0.0 and lead >= z * stderr
    return adopted, {"best": best_label, "margin_z": z, "lead": lead, "lead_stderr": stderr}


def _pad(scores: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Scores ``[..., nb]`` zero-padded (or cut) to ``num_blocks`` blocks, contiguous."""
    if scores.shape[-1] >= num_blocks:
        return scores[..., :num_blocks].contiguous()
    return torch.nn.functional.pad(scores, (0, num_blocks - scores.shape[-1])).contiguous()


def head_recall(
    head_data: Sequence[dict],
    role: str,
    heads: Sequence[int] | None,
    pair: PairConfig,
    page_size: int,
) -> torch.Tensor:
    """Recall of the true attention mass by the blocks chosen from per-head scores.

    Args:
        head_data: ``TeacherForcedResult.head_data`` (per step: ``role`` scores ``[W, L*H, NB]``,
            true ``mass`` ``[W, NB]``, ``kv_lens`` ``[W]`` counting the window, ``q_len``).
        role: ``"draft"`` or ``"target"``.
        heads: flat head ids (``layer * H + h``) whose scores are summed into one selection;
            None ranks every head alone.
        pair: budget, sinks and recent of the selection.

    Returns:
        ``[L*H]`` mean recall per head (heads None), else a 0-d tensor for the summed set.
    """
    budget_blocks = -(-pair.budget_tokens // page_size)
    total, count = 0.0, 0
    for step in head_data:
        mass, kv_lens, q_len = step["mass"], step["kv_lens"], step["q_len"]
        scores = _pad(step[role], mass.shape[-1])
        if heads is not None:
            scores = scores[:, list(heads)].sum(1)
        ids, counts = ops.select_blocks(
            scores, None, kv_lens, q_len, page_size, budget_blocks, pair.n_sink, pair.n_recent, 1.0
        )
        blocks = attended_blocks(
            BlockSelection(ids, counts), kv_lens, q_len, page_size, mass.shape[-1]
        )
        recalled = (blocks * mass[:, None]).sum(-1) / mass.sum(-1, keepdim=True)  # [W, Hs]
        total = total + recalled.sum(0)
        count += recalled.shape[0]
    result = total / count
    return result if heads is None else result[0]


def choose_heads(
    head_data: Sequence[dict],
    role: str,
    model: Transformer,
    pair: PairConfig,
    page_size: int,
    heads_per_layer: int = 2,
    max_layers: int = 3,
    min_gain: float = 0.002,
) -> tuple[tuple[tuple[int, int], ...], dict]:
    """Greedy layer choice for one model; returns ``((layer, head), ...)`` and a report."""
    num_heads = model.config.num_heads
    alone = head_recall(head_data, role, None, pair, page_size)  # [L*H]
    per_layer = {
        layer: sorted(
            range(layer * num_heads, (layer + 1) * num_heads), key=lambda h: -float(alone[h])
        )[:heads_per_layer]
        for layer in range(model.config.num_layers)
    }
    chosen: list[int] = []
    best, trail = 0.0, []
    while len(trail) < max_layers:
        candidates = {
            layer: float(head_recall(head_data, role, chosen + heads, pair, page_size))
            for layer, heads in per_layer.items()
            if heads[0] not in chosen
        }
        if not candidates:
            break
        layer, recall = max(candidates.items(), key=lambda kv: kv[1])
        if trail and recall - best < min_gain:
            break
        chosen += per_layer[layer]
        best = recall
        trail.append(
            {"layer": layer, "heads": [h % num_heads for h in per_layer[layer]], "recall": recall}
        )
    top = sorted(range(alone.numel()), key=lambda h: -float(alone[h]))[:10]
    report = {
        "greedy_layers": trail,
        "best_single_heads": [
            {"layer": h // num_heads, "head": h % num_heads, "recall": float(alone[h])} for h in top
        ],
    }
    return tuple(sorted((h // num_heads, h % num_heads) for h in chosen)), report


def calibrate(
    target: Transformer,
    draft: Transformer,
    windows: Sequence[PrefilledWindow],
    *,
    gamma: int = 4,
    head_steps: int = 12,
    share_steps: int = 12,
    budget_tokens: int = 512,
    page_size: int = 16,
    shares: Sequence[float] = DEFAULT_SHARES,
    heads_per_layer: int = 2,
    max_layers: int = 3,
    min_gain: float = 0.002,
    progress: bool = False,
) -> tuple[PairConfig, dict]:
    """Chooses retrieval heads and draft share for the pair on the prefilled windows.

    Returns:
        ``(config, report)``: the calibrated ``PairConfig`` and what each stage measured.
    """
    if not shares or any(not 0.0 <= s <= 1.0 for s in shares):
        raise ValueError(
            f"calibrate: shares must be a non-empty list of values in [0, 1], got {list(shares)}"
        )
    default = dataclasses.replace(
        PairConfig.default_for(draft.config, target.config), budget_tokens=budget_tokens
    )
    start = time.perf_counter()
    ranked = teacher_forced(
        target,
        draft,
        windows,
        [],
        gamma=gamma,
        steps=head_steps,
        head_data_page_size=page_size,
        progress=progress,
    )
    (draft_heads, draft_report), (target_heads, target_report) = (
        choose_heads(
            ranked.head_data, role, model, default, page_size, heads_per_layer, max_layers, min_gain
        )
        for role, model in (("draft", draft), ("target", target))
    )

    def dustin(draft_heads, target_heads, share):
        return Dustin(
            draft_heads=draft_heads,
            target_heads=target_heads,
            budget_tokens=budget_tokens,
            n_sink=default.n_sink,
            n_recent=default.n_recent,
            draft_share=share,
        )

    # Candidates "<heads>/share=<s>": the greedy heads and the default heads at every share, and
    # the defaults as they are (their own share) for reference.
    heads_of = {
        "chosen": (draft_heads, target_heads),
        "default": (default.draft_heads, default.target_heads),
    }
    candidates = {
        f"{name}/share={s:g}": (name, s)
        for name in heads_of
        for s in sorted({*shares, default.draft_share} if name == "default" else set(shares))
    }
    default_label = f"default/share={default.draft_share:g}"
    variants = [
        Variant(label, dustin(*heads_of[name], s), page_size)
        for label, (name, s) in candidates.items()
    ]
    searched = teacher_forced(
        target, draft, windows, variants, gamma=gamma, steps=share_steps, progress=progress
    )
    objective = {
        label: min(s["retention"], 1.0) + RECALL_WEIGHT * s["attention_recall"]
        for label, s in searched.summaries.items()
    }
    # Ties: the greedy heads (listed first), then the share nearer an even split.
    best_label = max(
        candidates, key=lambda label: (objective[label], -abs(candidates[label][1] - 0.5))
    )
    adopted, adoption = adopt_over_defaults(
        searched.summaries, best_label, default_label, comparisons=len(candidates) - 1
    )
    config_label = best_label if adopted else default_label
    config_heads, config_share = candidates[config_label]
    best = searched.summaries[best_label]
    reference = searched.summaries[default_label]
    texts = ", ".join(f"{w.window.text}@{w.window.start}" for w in windows)
    measured = (
        f"best candidate {best_label}: teacher-forced retention {best['retention']:.3f}, "
        f"attention recall {best['attention_recall']:.3f} (defaults: {reference['retention']:.3f}, "
        f"{reference['attention_recall']:.3f})"
    )
    if best_label != default_label:
        verdict = "adopted" if adopted else "not adopted, the defaults kept"
        measured += (
            f"; it leads the defaults by {adoption['lead']:+.3f} +- {adoption['lead_stderr']:.3f} "
            f"accepted drafts per verification against a margin of {adoption['margin_z']:.2f} "
            f"standard errors: {verdict}"
        )
    config = dataclasses.replace(
        default,
        draft_heads=heads_of[config_heads][0],
        target_heads=heads_of[config_heads][1],
        draft_share=config_share,
        note=(
            f"calibrated by `dustin calibrate` on {texts} (context {windows[0].window.context}, gamma {gamma}, "
            f"budget {budget_tokens}, block {page_size}): {measured}"
        ),
    )
    report = {
        "windows": [
            {"text": w.window.text, "start": w.window.start, "context": w.window.context}
            for w in windows
        ],
        "gamma": gamma,
        "budget_tokens": budget_tokens,
        "page_size": page_size,
        "head_steps": head_steps,
        "share_steps": share_steps,
        "min_gain": min_gain,
        "draft": draft_report,
        "target": target_report,
        "share_search": {
            "method": "grid",
            "objective": f"min(retention, 1) + {RECALL_WEIGHT} * attention_recall",
            "results": searched.summaries,
            "objective_values": objective,
        },
        "dense": searched.dense,
        "adoption": adoption | {"adopted": adopted},
        "chosen": {
            "candidate": config_label,
            "draft_heads": config.draft_heads,
            "target_heads": config.target_heads,
            "draft_share": config_share,
        },
        "seconds": time.perf_counter() - start,
    }
    return config, report


def write_config(config: PairConfig, path: Path) -> None:
    """Writes ``config`` as the JSON ``PairConfig.load`` reads (and checks it reads back)."""
    raw = dataclasses.asdict(config)
    raw = {"note": raw.pop("note"), **raw}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=2) + "\n")
    if PairConfig.load(path) != config:
        raise RuntimeError(f"write_config: {path} does not read back as the config written")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dustin calibrate``."""
    from dustin.quality_cli import add_model_arguments

    add_model_arguments(parser, default_texts="emma", default_context=4096)
    parser.add_argument(
        "--head-steps",
        type=int,
        default=12,
        help="teacher-forced verifications per window for ranking heads (default: 12)",
    )
    parser.add_argument(
        "--share-steps",
        type=int,
        default=12,
        help="teacher-forced verifications per window for each draft share (default: 12)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=512,
        help="tokens each sparse verification reads besides the window (default: 512)",
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=16,
        help="block (page) size the config is calibrated for (default: 16)",
    )
    parser.add_argument(
        "--shares",
        default=",".join(f"{s:g}" for s in DEFAULT_SHARES),
        help="comma-separated draft shares to try (default: 0,0.25,0.5,0.75,1)",
    )
    parser.add_argument(
        "--heads-per-layer",
        type=int,
        default=2,
        help="retrieval heads taken from each chosen layer (default: 2)",
    )
    parser.add_argument(
        "--max-layers", type=int, default=3, help="most layers chosen per model (default: 3)"
    )
    parser.add_argument(
        "--min-gain",
        type=float,
        default=0.002,
        help="smallest rise in recall (share of the total attention mass) for which the greedy "
        "search adds another layer; sinks and recent blocks hold most of the mass, so a layer's "
        "gain is small in these units (default: 0.002)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("qwen2.5-coder-0.5b_1.5b.calibrated.json"),
        help="where to write the pair config JSON; a report goes beside it as <name>.report.json",
    )


def run(args: argparse.Namespace) -> int:
    """``dustin calibrate``: prefill (or load) the windows, calibrate, write config and report."""
    from dustin.quality_cli import prepare

    try:
        shares = [float(s) for s in args.shares.split(",") if s.strip()]
    except ValueError as exc:
        raise ValueError(
            f"--shares must be comma-separated numbers in [0, 1], got {args.shares!r}"
        ) from exc
    for name in (
        "head_steps",
        "share_steps",
        "budget",
        "page_size",
        "heads_per_layer",
        "max_layers",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.min_gain < 1.0:
        raise ValueError(f"--min-gain must be in [0, 1), got {args.min_gain}")
    continuation = max(args.head_steps, args.share_steps) * (args.gamma + 1) + 1
    target, draft, prefilled = prepare(args, [args.context], continuation)
    windows = prefilled[args.context]
    config, report = calibrate(
        target,
        draft,
        windows,
        gamma=args.gamma,
        head_steps=args.head_steps,
        share_steps=args.share_steps,
        budget_tokens=args.budget,
        page_size=args.page_size,
        shares=shares,
        heads_per_layer=args.heads_per_layer,
        max_layers=args.max_layers,
        min_gain=args.min_gain,
        progress=not args.no_progress,
    )
    write_config(config, args.out)
    report_path = args.out.with_name(args.out.name.removesuffix(".json") + ".report.json")
    report_path.write_text(json.dumps(report, indent=2, default=list) + "\n")
    tqdm.write(f"wrote {args.out} and {report_path}")
    tqdm.write(config.note)
    return 0
