# SPDX-License-Identifier: Apache-2.0
"""Where one decode step's time goes, kernel by kernel (issue 7's largest gap is the draft).

For one method of ``bench/bench_e2e.py`` (random weights, replayed acceptance), each phase of a
``GraphDecoder`` step is timed twice: as the CUDA-graph replay the benchmark times, and as the
sum of its kernels' GPU time, taken by ``torch.profiler`` from the same phases run as direct
calls (the kernels are the same; only the launches differ). A phase whose graph time is well
above its kernels' sum loses the difference between kernels (many small ones: fuse them); one
whose kernels' sum is well above its floor has slow kernels (the table names them).

    python scripts/profile_e2e_step.py --pair qwen2.5-7b/0.5b --method dustin-stream

Prints the tables and writes them (JSON + Markdown, with GPU, commit and date) to
``bench/results/e2e/profile-*``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dustin.policies import PairConfig

from bench.bench_e2e import (
    METHODS,
    ONE_GPU_PAIRS,
    OUT_DIR,
    PAIRS,
    Setup,
    acceptance_table,
    measure,
    random_model,
)
from bench.common import Report


def kernel_times(phases: dict, steps: int, before_step) -> dict[str, dict[str, list[float]]]:
    """Per phase, per kernel name: ``[calls, microseconds]`` summed over ``steps`` steps whose
    phases run in order, each phase alone under the profiler (so every kernel it records is
    that phase's); ``before_step(i)`` runs unprofiled before step i. Device-side events only:
    kernels, memsets and copies."""
    found: dict[str, dict[str, list[float]]] = {
        name: defaultdict(lambda: [0, 0.0]) for name in phases
    }
    for i in range(steps):
        before_step(i)
        for name, run in phases.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            for event in prof.key_averages():
                if event.device_type != DeviceType.CUDA or event.self_device_time_total <= 0:
                    continue
                entry = found[name][event.key]
                entry[0] += event.count
                entry[1] += event.self_device_time_total
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=ONE_GPU_PAIRS, default=ONE_GPU_PAIRS[0])
    parser.add_argument("--method", choices=list(METHODS), default="dustin-stream")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--draft-window", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="profiled (and timed) steps")
    parser.add_argument("--top", type=int, default=10, help="kernels listed per phase")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="eager layer glue"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if not 1 <= args.gamma <= 15 or args.steps < 1:
        parser.error("--gamma must be in [1, 15] and --steps >= 1")

    method = METHODS[args.method]
    target_cfg, draft_cfg = PAIRS[args.pair]
    target, draft = random_model(target_cfg, 0), random_model(draft_cfg, 1)
    if args.compile:
        target.compile_layers()
        draft.compile_layers()
    pair_cfg = PairConfig.default_for(draft_cfg, target_cfg)
    gamma = args.gamma if method.speculative else 0
    warmup = 3
    steps_total = 2 * (warmup + args.steps) + 1  # the graph run, then the direct calls
    reach_new = steps_total * (args.gamma + 1) + 1
    setup = Setup(
        args.pair,
        target,
        draft,
        args.context,
        args.batch,
        reach_new + 2 * args.gamma + 1,
        args.page_size,
    )
    table = acceptance_table(args.gamma, steps_total, args.batch, seed=0)
    options = SimpleNamespace(budget=args.budget, draft_window=args.draft_window)

    graphed, _ = setup.decoder(method, args.gamma, pair_cfg, options, reach_new, graphs=True)
    timed = measure(
        graphed, table if method.speculative else None, warmup, args.steps, probe_steps=1
    )
    del graphed
    gc.collect()
    torch.cuda.empty_cache()

    direct, _ = setup.decoder(method, args.gamma, pair_cfg, options, reach_new, graphs=False)
    replayed = iter(table[warmup + args.steps + 1 :])  # rows the graph run did not use

    def before_step(_: int) -> None:
        if method.speculative:
            direct.set_acceptance(next(replayed))

    for i in range(warmup):
        before_step(i)
        direct.step()
    found = kernel_times(direct.phases, args.steps, before_step)

    summary = Report(
        f"profile-{args.pair.replace('/', '_')}-{args.method}",
        ["phase", "graph_ms", "kernels_ms", "between_ms", "kernels_per_step", "top_kernel"],
    )
    kernels = Report(
        "kernels", ["phase", "kernel", "calls_per_step", "us_per_step", "us_per_call", "share"]
    )
    for name, per_kernel in found.items():
        kernel_us = sum(us for _, us in per_kernel.values()) / args.steps
        graph_ms = timed["phase_ms"][name]
        ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
        summary.add(
            phase=name,
            graph_ms=graph_ms,
            kernels_ms=kernel_us / 1e3,
            between_ms=graph_ms - kernel_us / 1e3,
            kernels_per_step=sum(c for c, _ in per_kernel.values()) / args.steps,
            top_kernel=ranked[0][0][:60] if ranked else "",
        )
        for kernel, (calls, us) in ranked[: args.top]:
            kernels.add(
                phase=name,
                kernel=kernel[:90],
                calls_per_step=calls / args.steps,
                us_per_step=us / args.steps,
                us_per_call=us / calls,
                share=us / args.steps / max(kernel_us, 1e-9),
            )
    summary.notes += [
        (
            f"{args.pair} shapes, random weights, acceptance replayed (E[L] 2.2); context "
            f"{args.context}, batch {args.batch}, gamma {gamma}, budget {args.budget}, page "
            f"{args.page_size}, draft window {args.draft_window if method.streaming_draft else 'full'}; "
            f"layer glue {'compiled' if args.compile else 'eager'}"
        ),
        (
            f"graph_ms: the phase's CUDA-graph replay (CUDA events, mean of {args.steps} steps); "
            "kernels_ms: the GPU time of its kernels, memsets and copies (torch.profiler on the same "
            "phase as direct calls); between_ms: the difference, i.e. time between kernels"
        ),
        (
            f"step: {timed['step_ms']:.3f} ms as graphs, of which the target's sparse_verify "
            f"calls {timed['verify_attention_ms']:.3f} ms (replayed alone); the kernels table lists each phase's "
            f"{args.top} largest kernels (share = of the phase's kernel time)"
        ),
    ]
    print(summary.markdown() + "\n\n" + kernels.markdown())
    for note in summary.notes:
        print(f"- {note}")
    json_path, md_path = summary.save(OUT_DIR)
    data = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**data, "kernels": kernels.rows}, indent=1))
    md_path.write_text(md_path.read_text() + "\n" + kernels.markdown() + "\n")
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
