# SPDX-License-Identifier: Apache-2.0
"""The ``dustin`` command: ``generate`` compares plain, dense speculative and Dustin decoding.

``dustin generate`` loads a draft/target pair (by default the real Qwen2.5-Coder 0.5B/1.5B GGUF
pair, fetched into the cache on first use), prefills one long prompt once, decodes it with each
method from copies of that prefill, and prints tokens per second, tokens per verification,
agreement with the dense-verified output and the share of the KV cache each verification read.
``dustin fetch`` is the fetch module's command. ``--tp N`` splits the target over N ranks
started by ``torchrun --nproc-per-node N -m dustin generate --tp N ...`` (``dustin.parallel``);
rank 0 prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = ["main"]

METHODS = ("plain", "dense", "dustin", "draft-only", "history-only", "streaming")
DEFAULT_METHODS = "plain,dense,dustin"
REAL_PAIR_CONFIG = "qwen2.5-coder-0.5b_1.5b.json"

# Defaults per device: a CPU run must finish in a few minutes on two cores (the 1.5B target
# prefills about 30 tokens/s there in float32); a GPU run shows the long-context regime.
DEVICE_DEFAULTS = {
    "cpu": {"context": 1024, "batch_size": 1, "max_new_tokens": 32},
    "cuda": {"context": 16384, "batch_size": 4, "max_new_tokens": 128},
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(METHODS)}; unknown: {', '.join(unknown) or '(empty)'}"
        )
    return list(dict.fromkeys(names))


def _existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    return path


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, shared by every command that loads models."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: cuda when available)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="model and cache dtype (default: bfloat16 on GPU, float32 on CPU)",
    )


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """``(device, dtype)`` with ``auto`` resolved: cuda when available; bfloat16 on the GPU,
    float32 on the CPU.

    Raises:
        ValueError: cuda without a GPU, or float32 on cuda (the kernels take 16-bit inputs).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available to PyTorch")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    if device == "cuda" and dtype == "float32":
        raise ValueError("--dtype float32: the CUDA kernels take bfloat16 or float16")
    return device, dtype


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dustin", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        help="decode a long prompt with plain, dense speculative and Dustin decoding; print a table",
        description="Prefill one long prompt once, decode it with each method and compare speed, "
        "acceptance, agreement with dense verification and KV read. Defaults: the real "
        "Qwen2.5-Coder 0.5B/1.5B pair, the bundled Pride and Prejudice, GPU when present "
        f"(context {DEVICE_DEFAULTS['cuda']['context']}, batch {DEVICE_DEFAULTS['cuda']['batch_size']}) "
        f"else CPU (context {DEVICE_DEFAULTS['cpu']['context']}, batch 1).",
    )
    gen.add_argument(
        "--target",
        type=_existing_path,
        help="target checkpoint: Hugging Face directory or .gguf file (default: the real 1.5B, fetched on first use)",
    )
    gen.add_argument(
        "--draft",
        type=_existing_path,
        help="draft checkpoint: Hugging Face directory or .gguf file (default: the real 0.5B); give both or neither",
    )
    gen.add_argument(
        "--prompt-file",
        type=_existing_path,
        help="UTF-8 text whose beginning is the prompt (default: the bundled Pride and Prejudice)",
    )
    gen.add_argument(
        "--context",
        type=_positive,
        help="prompt tokens per sequence (default: 16384 on GPU, 1024 on CPU)",
    )
    gen.add_argument(
        "--batch-size",
        type=_positive,
        help="sequences decoded together, each a different window of the text (default: 4 on GPU, 1 on CPU)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=_positive,
        help="tokens generated per sequence (default: 128 on GPU, 32 on CPU)",
    )
    gen.add_argument(
        "--gamma",
        type=_positive,
        default=4,
        help="drafted tokens per speculative step, 1..15 (default: 4)",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 for greedy decoding (default), > 0 to sample with rejection-sampling acceptance",
    )
    gen.add_argument(
        "--budget",
        type=_positive,
        help="tokens each sparse verification reads besides the window (default: the pair config's, 512)",
    )
    gen.add_argument(
        "--page-size",
        type=_positive,
        default=16,
        help="KV page size = selection block size, 1..128 (default: 16)",
    )
    gen.add_argument(
        "--pair-config",
        type=_existing_path,
        help="JSON with retrieval heads and selection settings of the pair (default: the bundled one for the real pair, uncalibrated defaults otherwise)",
    )
    gen.add_argument(
        "--methods",
        type=_methods,
        default=_methods(DEFAULT_METHODS),
        help=f"comma-separated methods among {', '.join(METHODS)} (default: {DEFAULT_METHODS})",
    )
    add_device_arguments(gen)
    gen.add_argument(
        "--kv-layout",
        choices=("HND", "NHD"),
        default="HND",
        help="KV cache page layout (default: HND)",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument(
        "--tp",
        type=_positive,
        default=1,
        help="tensor-parallel ranks the target is split over; launch with "
        "`torchrun --nproc-per-node N -m dustin generate --tp N ...` (default: 1)",
    )
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    gen.set_defaults(subparser=gen)

    from dustin import calibrate, quality_cli

    cal = commands.add_parser(
        "calibrate",
        help="choose a pair's retrieval heads and draft share on calibration text; write its config",
        description="Choose the retrieval heads of draft and target and the draft share on windows of "
        "calibration text (teacher-forced); write the pair config JSON that --pair-config reads.",
    )
    calibrate.add_arguments(cal)
    cal.set_defaults(subparser=cal, run=calibrate.run)
    ev = commands.add_parser(
        "eval",
        help="measure acceptance, agreement, perplexity and attention recall of each policy on real text",
        description="Measure mean accepted length, acceptance rate, agreement with dense verification, "
        "perplexity and attention recall of each verification policy on windows of the bundled texts, "
        "teacher-forced and free-running; write JSON, Markdown and plots.",
    )
    quality_cli.add_arguments(ev)
    ev.set_defaults(subparser=ev, run=quality_cli.run)

    fetch = commands.add_parser(
        "fetch",
        help="download and verify the real Qwen2.5-Coder pair (see `dustin fetch --help`)",
        add_help=False,
    )
    fetch.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fills device-dependent defaults and checks options that depend on each other."""
    if (args.target is None) != (args.draft is None):
        parser.error("--target and --draft go together: give both or neither")
    try:
        args.device, args.dtype = resolve_device_dtype(args.device, args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    for name, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 1 <= args.gamma <= 15:
        parser.error(
            f"--gamma must be in [1, 15] (the verification window gamma + 1 <= 16), got {args.gamma}"
        )
    if not 1 <= args.page_size <= 128:
        parser.error(f"--page-size must be in [1, 128], got {args.page_size}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")


def _load(
    path: Path,
    role: str,
    dtype: torch.dtype,
    device: str,
    progress: bool,
    tp: tuple[int, int] | None = None,
):
    """``(model, its whole config, tokenizer)``; with ``tp`` (rank, world size) the rank's share."""
    from dustin.checkpoint import load_checkpoint
    from dustin.model import Transformer
    from dustin.parallel import TensorParallel, sharded_model

    if progress:
        tqdm.write(f"loading {role}: {path}")
    config, state_dict, tokenizer = load_checkpoint(path, dtype=dtype, progress=progress)
    if tp is None:
        model = Transformer.from_state_dict(config, state_dict, dtype=dtype, device=device)
    else:
        model = sharded_model(TensorParallel(config, *tp), state_dict, dtype=dtype, device=device)
    return model, config, tokenizer


def _prompts(tokenizer, args: argparse.Namespace) -> list[list[int]]:
    """``batch_size`` windows of ``context`` tokens from the text, each starting further in."""
    from dustin.texts import load_prompt_text

    text = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else load_prompt_text()
    ids = tokenizer.encode(text).ids
    stride = args.context // 2
    needed = args.context + stride * (args.batch_size - 1)
    if len(ids) < needed:
        raise ValueError(
            f"the prompt text has {len(ids)} tokens; --context {args.context} with --batch-size "
            f"{args.batch_size} needs {needed} (windows start {stride} tokens apart)"
        )
    return [ids[b * stride : b * stride + args.context] for b in range(args.batch_size)]


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where a method produced the reference's token."""
    same = sum(a == b for seq, ref in zip(tokens, reference) for a, b in zip(seq, ref))
    return same / max(sum(map(len, reference)), 1)


def generate(args: argparse.Namespace) -> int:
    from dustin.checkpoint import check_compatible
    from dustin.fetch import fetch_real_pair
    from dustin.policies import CONFIG_DIR, PairConfig, make_policy
    from dustin.spec import DecodeOptions, autoregressive_decode, prefill, speculative_decode

    tp = None
    if args.tp > 1:
        from dustin.parallel import init_from_env

        tp = init_from_env(args.tp, args.device)
    leader = tp is None or tp[0] == 0  # the rank that prints
    progress = leader and not args.no_progress
    dtype = getattr(torch, args.dtype)
    real_pair = args.target is None
    if real_pair:
        if not leader:  # rank 0 downloads; the others then find the files cached
            torch.distributed.barrier()
        args.draft, args.target = fetch_real_pair(progress=progress)
        if leader and tp is not None:
            torch.distributed.barrier()
    # The target is split over the ranks; the (small) draft runs whole on every rank.
    target, target_config, target_tok = _load(
        args.target, "target", dtype, args.device, progress, tp
    )
    draft, _, draft_tok = _load(args.draft, "draft", dtype, args.device, progress)
    check_compatible(draft.config, draft_tok, target_config, target_tok)
    if args.pair_config is not None:
        pair = PairConfig.load(args.pair_config)
    elif real_pair:
        pair = PairConfig.load(CONFIG_DIR / REAL_PAIR_CONFIG)
    else:
        pair = PairConfig.default_for(draft.config, target_config)
        if leader:
            tqdm.write(
                "note: no --pair-config: using uncalibrated retrieval heads (PairConfig.default_for)"
            )
    pair.check(draft.config, target_config)

    options = DecodeOptions(
        max_new_tokens=args.max_new_tokens,
        gamma=args.gamma,
        temperature=args.temperature,
        seed=args.seed,
        eos_token_id=None,  # equal lengths keep the methods comparable token for token
    )
    prompts = _prompts(target_tok, args)
    with tqdm(
        total=2 * sum(map(len, prompts)), unit="tok", desc="prefill", disable=not progress
    ) as bar:
        state = prefill(
            target,
            draft,
            prompts,
            options,
            page_size=args.page_size,
            layout=args.kv_layout,
            progress=bar.update,
        )

    results = {}
    for method in args.methods:
        with tqdm(
            total=options.max_new_tokens * len(prompts),
            unit="tok",
            desc=method,
            disable=not progress,
        ) as bar:
            if method == "plain":
                results[method] = autoregressive_decode(target, state.fork(), options, bar.update)
            else:
                policy = make_policy(method, pair, args.budget)
                results[method] = speculative_decode(
                    target, draft, state.fork(), policy, options, bar.update
                )

    if not leader:
        return 0
    reference = results.get("dense")
    plain = results.get("plain")
    print(
        f"\n{target.config.arch} target {args.target.name} / draft {args.draft.name}; {args.device} {args.dtype}"
        f"{f', tensor-parallel {args.tp}' if tp else ''}; "
        f"batch {len(prompts)} x {args.context} prompt tokens, {options.max_new_tokens} new, gamma {options.gamma}, "
        f"budget {args.budget or pair.budget_tokens}, page {args.page_size}; prefill {state.seconds:.1f} s"
    )
    header = (
        "method",
        "tokens/s",
        "speedup",
        "tokens/verification",
        "same as dense",
        "KV read/verification",
    )
    rows = [header]
    for method, r in results.items():
        rows.append(
            (
                method,
                f"{r.tokens_per_second:.2f}",
                f"{r.tokens_per_second / plain.tokens_per_second:.2f}x" if plain else "-",
                f"{r.emitted_per_verification:.2f}",
                f"{100 * _agreement(r.tokens, reference.tokens):.1f}%" if reference else "-",
                f"{100 * r.kv_read_share:.1f}%",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if index == 0:
            print("  ".join("-" * w for w in widths))
    first = next(iter(results.values()))
    print(f"\n{args.methods[0]}, sequence 0: {target_tok.decode(first.tokens[0])!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch"]:  # the fetch module owns its options
        from dustin.fetch import main as fetch_main

        return fetch_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "generate":
        _resolve(args, args.subparser)
    from dustin.cache import CacheFullError
    from dustin.checkpoint import CheckpointError
    from dustin.fetch import FetchError

    try:
        return generate(args) if args.command == "generate" else args.run(args)
    except (
        ValueError,
        CheckpointError,
        CacheFullError,
        FetchError,
        FileNotFoundError,
        NotImplementedError,
    ) as exc:
        print(f"dustin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
