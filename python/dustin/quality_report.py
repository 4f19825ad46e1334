# SPDX-License-Identifier: Apache-2.0
"""Writes the results of ``dustin eval``: one JSON file, a Markdown summary and plots per context."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from dustin.provenance import source_commit
from dustin.quality_metrics import paired_difference

__all__ = ["CAVEAT", "target_checks", "write_results"]

CAVEAT = (
    "The texts are public-domain Jane Austen novels, which are very likely in the models' training "
    "data; absolute perplexities and acceptance are therefore optimistic. The comparisons between "
    "policies at equal budget are the point."
)
RETENTION_TARGET = 0.97  # issue 6: Dustin keeps >= 97% of dense's mean accepted length at 512


def _split(label: str) -> tuple[str, int, int]:
    policy, budget, block = label.split("/")
    return policy, int(budget[1:]), int(block[1:])


def target_checks(entry: dict, budget: int, block: int) -> list[str]:
    """The issue's targets at one budget and block size, each as a met/missed sentence."""
    lines = []
    for mode in ("teacher_forced", "free_running"):
        rows = entry.get(mode, {})
        mine = rows.get(f"dustin/b{budget}/p{block}")
        if mine is None:
            continue
        others = {
            _split(label)[0]: r
            for label, r in rows.items()
            if label != "dense"
            and _split(label)[1:] == (budget, block)
            and not label.startswith("dustin/")
        }
        gaps = {k: _gap(mine, r) for k, r in others.items()}  # paired, each computed once
        name = mode.replace("_", "-")
        verdict = "met" if mine["retention"] >= RETENTION_TARGET else "MISSED"
        lines.append(
            f"{name}: Dustin keeps {100 * mine['retention']:.1f}% of dense's mean accepted length "
            f"(target >= {100 * RETENTION_TARGET:.0f}%): {verdict}"
        )
        rivals = {k: r for k, r in others.items() if k != "dustin-default"}
        beaten = [
            k for k, r in rivals.items() if mine["mean_accepted_length"] > r["mean_accepted_length"]
        ]
        verdict = "met" if rivals and len(beaten) == len(rivals) else "MISSED"
        detail = ", ".join(
            f"{k} {r['mean_accepted_length']:.3f}{_versus(gaps[k], k)}"
            for k, r in sorted(rivals.items())
        )
        lines.append(
            f"{name}: Dustin {mine['mean_accepted_length']:.3f} vs {detail}: more than every other "
            f"policy: {verdict}{_noise(mine, rivals, gaps)}"
        )
        if "dustin-default" in others:
            d = others["dustin-default"]
            verdict = (
                "met" if mine["mean_accepted_length"] > d["mean_accepted_length"] else "MISSED"
            )
            lines.append(
                f"{name}: calibrated {mine['mean_accepted_length']:.3f} vs default config "
                f"{d['mean_accepted_length']:.3f}{_versus(gaps['dustin-default'], 'default')}: "
                f"calibrated beats default: {verdict}{_noise(mine, {'dustin-default': d}, gaps)}"
            )
            fidelity = (
                "top1_agreement_with_dense" if mode == "teacher_forced" else "agreement_with_dense"
            )
            lines.append(
                f"{name}: fidelity to dense, calibrated vs default: agreement {mine[fidelity]:.3f} vs "
                f"{d[fidelity]:.3f}"
                + (
                    f", attention recall {mine['attention_recall']:.3f} vs {d['attention_recall']:.3f}, "
                    f"perplexity {mine['perplexity']:.2f} vs {d['perplexity']:.2f}"
                    if mode == "teacher_forced"
                    else ""
                )
            )
    return lines


def _gap(mine: dict, other: dict) -> tuple[float, float] | None:
    """Dustin's paired difference from ``other`` in accepted drafts per verification, with its
    standard error; None where a row lacks per-verification counts (free-running rows, and
    teacher-forced results written before 2026-11-29's fifth session)."""
    if "accepted_per_step" not in mine or "accepted_per_step" not in other:
        return None
    return paired_difference(mine["accepted_per_step"], other["accepted_per_step"])


def _versus(gap: tuple[float, float] | None, name: str) -> str:
    return "" if gap is None else f" (Dustin - {name} {gap[0]:+.3f} ± {gap[1]:.3f})"


def _noise(mine: dict, rivals: dict, gaps: dict) -> str:
    """Says whether any rival at or ahead of Dustin leads by two standard errors or more (a tie,
    such as draft-only against Dustin at draft share 1, is no lead)."""
    ahead = [
        gaps[k]
        for k, r in rivals.items()
        if r["mean_accepted_length"] >= mine["mean_accepted_length"]
    ]
    if not ahead or any(g is None or math.isnan(g[1]) for g in ahead):
        return ""
    if any(diff < 0 and -diff >= 2 * stderr for diff, stderr in ahead):
        return " (at least one lead over Dustin is two standard errors or more)"
    return " (every lead over Dustin is within two standard errors: not resolved by this sample)"


def _paired(row: dict) -> str:
    """Paired difference of accepted drafts from dense, with its standard error (if recorded)."""
    if "accepted_diff_vs_dense" not in row:
        return "-"
    return f"{row['accepted_diff_vs_dense']:+.3f} ± {row['accepted_diff_stderr']:.3f}"


def _markdown(tag: str, meta: dict, results: dict) -> str:
    pair, default = meta["pair_config"], meta["default_pair_config"]
    out = [
        f"# Quality of sparse verification: {tag}",
        "",
        f"**Caveat.** {CAVEAT}",
        "",
        (
            f"Target `{Path(meta['target']).name}`, draft `{Path(meta['draft']).name}`; "
            f"{meta['device']} {meta['dtype']}; gamma {meta['gamma']}; greedy; commit {meta['commit']}, "
            f"{meta['date']}."
        ),
        (
            f"Teacher-forced: {meta['steps_per_window']} verifications per window; free-running: "
            f"{meta['free_tokens_per_window']} new tokens per window."
        ),
        (
            f"`dustin` config: draft heads {pair['draft_heads']}, target heads {pair['target_heads']}, "
            f"draft share {pair['draft_share']} ({pair['note'] or 'no note'})."
        ),
        (
            f"`dustin-default`: draft heads {default['draft_heads']}, target heads "
            f"{default['target_heads']}, draft share {default['draft_share']}."
        ),
        "",
        (
            "Mean accepted length = tokens per verification (accepted drafts + the bonus token); "
            "acceptance rate = accepted drafts / gamma; retention = mean accepted length / dense's; "
            "top-1 agreement = share of real-text positions where the sparse verifier's argmax equals "
            "dense's; perplexity of the real continuation; attention recall = share of the target's "
            "true attention mass (all layers, heads, window queries) on the attended positions; KV "
            "read = share of the context's blocks read per verification."
        ),
    ]
    for context, entry in results.items():
        windows = ", ".join(f"{w['text']}@{w['start']}" for w in meta["windows"][context])
        out += ["", f"## Context {context} ({windows})", "", "### Teacher-forced", ""]
        out += [
            (
                "| policy | budget | block | mean accepted length | acceptance rate | retention "
                "| accepted - dense (± s.e.) | top-1 agreement | perplexity | attention recall "
                "| KV read |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = [("dense", entry["dense"])] + sorted(
            entry["teacher_forced"].items(),
            key=lambda kv: (_split(kv[0])[2], _split(kv[0])[1], kv[0]),
        )
        for label, r in rows:
            policy, budget, block = ("dense", "-", "-") if label == "dense" else _split(label)
            out.append(
                f"| {policy} | {budget} | {block} | {r['mean_accepted_length']:.3f} | {r['acceptance_rate']:.3f} | "
                f"{r['retention']:.3f} | {_paired(r)} | {r['top1_agreement_with_dense']:.3f} | "
                f"{r['perplexity']:.2f} | "
                f"{r['attention_recall']:.3f} | {100 * r['kv_read_share']:.1f}% |"
            )
        free = entry.get("free_running")
        if free:
            out += ["", "### Free-running (the engine's loop)", ""]
            out += [
                "| policy | budget | block | mean accepted length | acceptance rate | retention | same tokens as dense | KV read |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for label, r in free.items():
                policy, budget, block = ("dense", "-", "-") if label == "dense" else _split(label)
                out.append(
                    f"| {policy} | {budget} | {block} | {r['mean_accepted_length']:.3f} | {r['acceptance_rate']:.3f} | "
                    f"{r['retention']:.3f} | {100 * r['agreement_with_dense']:.1f}% | {100 * r['kv_read_share']:.1f}% |"
                )
        checks = target_checks(entry, meta["main_budget"], meta["main_block_size"])
        if checks:
            out += [
                "",
                f"### Issue 6 targets at budget {meta['main_budget']}, block {meta['main_block_size']}",
                "",
            ]
            out += [f"- {line}" for line in checks]
    return "\n".join(out) + "\n"


def _plot(path: Path, context: int, entry: dict, meta: dict) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("dustin eval plots need matplotlib: pip install 'dustin[eval]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = entry["teacher_forced"]
    policies = sorted({_split(label)[0] for label in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        (axes[0], "mean_accepted_length", "budget", "mean accepted length (tokens/verification)"),
        (axes[1], "attention_recall", "budget", "attention recall"),
        (axes[2], "retention", "block", "retention vs dense"),
    )
    for ax, metric, sweep, ylabel in panels:
        for policy in policies:
            if sweep == "budget":
                points = sorted(
                    (b, r[metric])
                    for l, r in rows.items()
                    if _split(l)[0] == policy and _split(l)[2] == meta["main_block_size"]
                    for _, b, _ in [_split(l)]
                )
            else:
                points = sorted(
                    (p, r[metric])
                    for l, r in rows.items()
                    if _split(l)[0] == policy and _split(l)[1] == meta["main_budget"]
                    for _, _, p in [_split(l)]
                )
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=policy)
        if metric != "attention_recall":
            ax.axhline(entry["dense"][metric], color="black", linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{sweep} ({'tokens' if sweep == 'budget' else 'tokens per block'})")
        ax.set_ylabel(ylabel)
        fixed = (
            f"block {meta['main_block_size']}"
            if sweep == "budget"
            else f"budget {meta['main_budget']}"
        )
        ax.set_title(f"context {context}, {fixed}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"teacher-forced, {Path(meta['target']).name} / {Path(meta['draft']).name}; public-domain text likely seen in training"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: Path, tag: str, meta: dict, results: dict) -> list[Path]:
    """Writes ``quality-<tag>.json``, ``quality-<tag>.md`` and one plot per context.

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        **meta,
        "commit": source_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "caveat": CAVEAT,
    }
    paths = [out_dir / f"quality-{tag}.json", out_dir / f"quality-{tag}.md"]
    paths[0].write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=list) + "\n"
    )
    paths[1].write_text(_markdown(tag, meta, results))
    for context, entry in results.items():
        path = out_dir / f"quality-{tag}-ctx{context}.png"
        _plot(path, context, entry, meta)
        paths.append(path)
    return paths
