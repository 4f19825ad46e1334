# SPDX-License-Identifier: Apache-2.0
"""Command-line glue of ``dustin eval`` and ``dustin calibrate``: shared options, loading, the grid.

``dustin eval`` measures every (policy, budget, block size) of the grid on windows of the
bundled texts, teacher-forced and free-running (``dustin.evaluate``), at one or more context
lengths, and writes JSON, Markdown and plots (``dustin.quality_report``). Prefills are stored on
disk and reused, so a run at a new budget or block size costs no new prefill.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dustin.cli import add_device_arguments, resolve_device_dtype
from dustin.evaluate import (
    Variant,
    cut_windows,
    free_running,
    load_pair,
    prefill_window,
    teacher_forced,
)
from dustin.policies import Quest
from dustin.spec import DecodeOptions

__all__ = ["add_arguments", "add_model_arguments", "prepare", "run", "variants_for"]

POLICY_NAMES = (
    "dense",
    "dustin",
    "dustin-default",
    "draft-only",
    "history-only",
    "streaming",
    "quest",
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    return values


def _name_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names among {', '.join(choices)}; unknown: {unknown or '(empty)'}"
            )
        return list(dict.fromkeys(names))

    return parse


def add_model_arguments(
    parser: argparse.ArgumentParser, default_texts: str, default_context: int
) -> None:
    """Options shared by ``dustin calibrate`` and ``dustin eval``: models, text, device, store."""
    from dustin.texts import TEXT_NAMES

    parser.add_argument(
        "--target",
        type=Path,
        help="target checkpoint: Hugging Face directory or .gguf file (default: the real Qwen2.5-Coder 1.5B, fetched on first use)",
    )
    parser.add_argument(
        "--draft",
        type=Path,
        help="draft checkpoint (default: the real Qwen2.5-Coder 0.5B); give both or neither",
    )
    parser.add_argument(
        "--texts",
        type=_name_list(TEXT_NAMES),
        default=default_texts,
        help=f"comma-separated bundled texts to cut windows from, among {', '.join(TEXT_NAMES)} (default: {default_texts})",
    )
    parser.add_argument(
        "--windows-per-text", type=int, default=1, help="windows cut from each text (default: 1)"
    )
    parser.add_argument(
        "--context",
        type=int,
        default=default_context,
        help=f"prompt tokens per window (default: {default_context})",
    )
    parser.add_argument(
        "--gamma", type=int, default=4, help="drafted tokens per verification, 1..15 (default: 4)"
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--store",
        type=Path,
        help="directory of stored prefills, reused across runs (default: <dustin cache>/eval-prefill)",
    )
    parser.add_argument("--no-store", action="store_true", help="do not store or reuse prefills")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def prepare(args: argparse.Namespace, contexts: Sequence[int], continuation: int):
    """Loads the pair and prefills (or loads) the windows of every context length.

    Returns:
        ``(target, draft, {context: [PrefilledWindow]})``.
    """
    from dustin.fetch import cache_dir, fetch_real_pair

    if (args.target is None) != (args.draft is None):
        raise ValueError("--target and --draft go together: give both or neither")
    for name in ("windows_per_text", "gamma"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.gamma > 15:
        raise ValueError(
            f"--gamma must be in [1, 15] (the window gamma + 1 <= 16), got {args.gamma}"
        )
    device, dtype_name = resolve_device_dtype(args.device, args.dtype)
    dtype = getattr(torch, dtype_name)
    progress = not args.no_progress
    if args.target is None:
        args.draft, args.target = fetch_real_pair(progress=progress)
    target, draft, tokenizer, key = load_pair(args.target, args.draft, dtype, device, progress)
    store = None if args.no_store else (args.store or cache_dir() / "eval-prefill")
    prefilled = {}
    for context in contexts:
        windows = cut_windows(tokenizer, args.texts, context, continuation, args.windows_per_text)
        prefilled[context] = [
            prefill_window(target, draft, w, store, key, progress) for w in windows
        ]
    args.resolved_device, args.resolved_dtype = device, dtype_name
    return target, draft, prefilled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dustin eval``."""
    add_model_arguments(parser, default_texts="prideprejudice,persuasion", default_context=4096)
    parser.add_argument(
        "--contexts",
        type=_int_list,
        help="comma-separated context lengths to run, e.g. 8192,16384,32768 (default: --context)",
    )
    parser.add_argument(
        "--policies",
        type=_name_list(POLICY_NAMES),
        default=list(POLICY_NAMES),
        help=f"comma-separated policies among {', '.join(POLICY_NAMES)} (default: all); dustin uses --pair-config, dustin-default the uncalibrated defaults",
    )
    parser.add_argument(
        "--budgets",
        type=_int_list,
        default=[128, 512, 2048],
        help="comma-separated budgets in tokens (default: 128,512,2048)",
    )
    parser.add_argument(
        "--block-sizes",
        type=_int_list,
        default=[1, 16, 64],
        help="comma-separated block (page) sizes (default: 1,16,64)",
    )
    parser.add_argument(
        "--grid",
        choices=("cross", "full"),
        default="cross",
        help="cross: every budget at --main-block-size and every block size at --main-budget (default); full: every combination",
    )
    parser.add_argument(
        "--main-budget",
        type=int,
        default=512,
        help="budget of the block-size sweep and of free-running decoding (default: 512)",
    )
    parser.add_argument(
        "--main-block-size",
        type=int,
        default=16,
        help="block size of the budget sweep and of free-running decoding (default: 16)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=16,
        help="teacher-forced verifications per window (default: 16)",
    )
    parser.add_argument(
        "--free-tokens",
        type=int,
        default=32,
        help="tokens decoded per window free-running, 0 to skip (default: 32)",
    )
    parser.add_argument(
        "--pair-config",
        type=Path,
        help="pair config of the dustin policy, e.g. the output of dustin calibrate (default: the bundled config of the real pair, else uncalibrated defaults)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("bench/results/quality"),
        help="where JSON, Markdown and plots go (default: bench/results/quality)",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="name suffix of the result files (default: cpu-<contexts> or cuda-<contexts>)",
    )


def variants_for(args: argparse.Namespace, pair, default_pair) -> list[Variant]:
    """The grid of (policy, budget, block size) the options ask for."""
    from dustin.policies import make_policy

    if args.grid == "full":
        cells = [(b, p) for b in args.budgets for p in args.block_sizes]
    else:
        cells = [(b, args.main_block_size) for b in args.budgets]
        cells += [
            (args.main_budget, p) for p in args.block_sizes if (args.main_budget, p) not in cells
        ]
    variants = []
    for name in args.policies:
        if name == "dense":
            continue  # the reference pass of every step
        for budget, page_size in cells:
            if name == "quest":
                policy = Quest(budget_tokens=budget, n_sink=pair.n_sink, n_recent=pair.n_recent)
            elif name == "dustin-default":
                policy = make_policy("dustin", default_pair, budget)
            else:
                policy = make_policy(name, pair, budget)
            variants.append(Variant(f"{name}/b{budget}/p{page_size}", policy, page_size))
    return variants


def run(args: argparse.Namespace) -> int:
    """``dustin eval``: prefill (or load) windows, measure every variant, write the results."""
    import dataclasses

    from dustin.policies import CONFIG_DIR, PairConfig
    from dustin.quality_report import write_results

    contexts = args.contexts or [args.context]
    for name in ("steps", "main_budget", "main_block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.free_tokens < 0:
        raise ValueError(f"--free-tokens must be >= 0, got {args.free_tokens}")
    if any(not 1 <= p <= 128 for p in args.block_sizes + [args.main_block_size]):
        raise ValueError(
            f"--block-sizes and --main-block-size must be in [1, 128], got {args.block_sizes}, {args.main_block_size}"
        )
    real_pair = args.target is None
    continuation = max(args.steps * (args.gamma + 1) + 1, args.free_tokens + 2 * args.gamma + 2)
    target, draft, prefilled = prepare(args, contexts, continuation)
    default_pair = PairConfig.default_for(draft.config, target.config)
    if args.pair_config is not None:
        pair = PairConfig.load(args.pair_config)
    elif real_pair:
        pair = PairConfig.load(CONFIG_DIR / "qwen2.5-coder-0.5b_1.5b.json")
    else:
        pair = default_pair
    pair.check(draft.config, target.config)
    variants = variants_for(args, pair, default_pair)
    progress = not args.no_progress
    meta = {
        "target": str(args.target),
        "draft": str(args.draft),
        "device": args.resolved_device,
        "dtype": args.resolved_dtype,
        "gamma": args.gamma,
        "steps_per_window": args.steps,
        "main_budget": args.main_budget,
        "main_block_size": args.main_block_size,
        "free_tokens_per_window": args.free_tokens,
        "windows": {
            c: [{"text": w.window.text, "start": w.window.start} for w in ws]
            for c, ws in prefilled.items()
        },
        "pair_config": dataclasses.asdict(pair),
        "default_pair_config": dataclasses.asdict(default_pair),
        "policies": {
            v.label: {
                "policy": v.policy.name
                if not v.label.startswith("dustin-default")
                else "dustin-default",
                "budget": v.policy.budget_tokens,
                "page_size": v.page_size,
            }
            for v in variants
        },
    }
    tag = args.tag or f"{args.resolved_device}-{'-'.join(str(c) for c in contexts)}"
    # Written again after each context, so a long run cut short keeps the contexts it finished.
    results = {}
    for context, windows in prefilled.items():
        tf = teacher_forced(
            target, draft, windows, variants, gamma=args.gamma, steps=args.steps, progress=progress
        )
        entry = {"teacher_forced": tf.summaries, "dense": tf.dense}
        if args.free_tokens:
            main = [
                v
                for v in variants
                if v.label.endswith(f"/b{args.main_budget}/p{args.main_block_size}")
            ]
            options = DecodeOptions(max_new_tokens=args.free_tokens, gamma=args.gamma)
            entry["free_running"] = free_running(target, draft, windows, main, options, progress)
        results[context] = entry
        paths = write_results(args.out_dir, tag, meta, results)
        tqdm.write(f"context {context} done: wrote " + ", ".join(str(p) for p in paths))
    return 0
