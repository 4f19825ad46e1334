# SPDX-License-Identifier: Apache-2.0
"""Shared benchmark plumbing: timing (eager and CUDA-graph replay), bandwidth, result files.

Every benchmark in bench/ times its cases with `time_cuda`, reports bandwidth against the
measured H200 read ceiling, prints a Markdown table and writes JSON + Markdown into
bench/results/ with the GPU, commit and date, so a run can be reproduced and compared.
"""

from __future__ import annotations

import datetime as _dt
import functools
import itertools
import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from dustin.provenance import source_commit

# Streaming read ceiling measured on one H200 (design.md section 4), decimal TB/s.
H200_READ_CEILING_TBPS = 4.48
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Inputs rotated through by back-to-back timed calls span at least this many bytes (over four
# times the H100's and H200's 50 MB L2), so no call finds its KV in L2 where the previous
# calls left it: a real step reads every other layer's KV between two calls of one layer's.
L2_ROTATE_BYTES = 256 << 20


@functools.cache
def _read_ceiling() -> tuple[float, str]:
    """(TB/s, where it comes from): on an H200 the design's measured 4.48 TB/s, so results stay
    comparable across runs; on any other GPU (an H100 answers the same calls) measured here as
    the best of five float32 sums over 4 GiB of bf16, a streaming read with nothing written."""
    if "H200" in torch.cuda.get_device_name():
        return H200_READ_CEILING_TBPS, "design.md's H200 measurement"
    x = torch.empty(2**31, dtype=torch.bfloat16, device="cuda").normal_()
    x.sum(dtype=torch.float32)
    best_s = float("inf")
    for _ in range(5):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        best_s = min(best_s, start.elapsed_time(end) * 1e-3)
    num_bytes = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    return num_bytes / best_s / 1e12, "measured in this run: float32 sum over 4 GiB of bf16"


def read_ceiling_tbps() -> float:
    """The HBM read ceiling the percentages are taken against, decimal TB/s."""
    return _read_ceiling()[0]


def ceiling_note() -> str:
    """Where the ceiling of this run's percentages comes from (for the results' notes)."""
    tbps_, source = _read_ceiling()
    return f"read ceiling {tbps_:.2f} TB/s ({source})"


@dataclass
class Timing:
    """Median times in microseconds; graph is None where capture was not possible."""

    eager_us: float
    graph_us: float | None

    @property
    def best_us(self) -> float:
        return self.graph_us if self.graph_us is not None else self.eager_us


def rotating(fns: list[Callable[[], None]]) -> Callable[[], None]:
    """One callable that calls `fns` in turn (timed back to back, or captured `iters` times
    into one graph, each call then reads the inputs of the next set)."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def _median_event_time_us(fn: Callable[[], None], iters: int, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples)


def time_cuda(
    fn: Callable[[], None],
    *,
    warmup: int = 5,
    reps: int = 15,
    min_batch_us: float = 2000.0,
    graph: bool = True,
) -> Timing:
    """Median time of one call of `fn`, eager and as CUDA-graph replay.

    Short kernels are timed over enough back-to-back calls (a batch of at least `min_batch_us`)
    that event resolution and launch gaps do not dominate; the graph variant captures that many
    calls in one graph so launch overhead is removed, as a real engine would run them.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    one = _median_event_time_us(fn, 1, 3)
    iters = max(1, min(1000, int(min_batch_us / max(one, 1e-3))))
    eager = _median_event_time_us(fn, iters, reps)
    graph_us = None
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                fn()  # warm caches of lazily initialised state outside capture
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(iters):
                    fn()
            g.replay()
            torch.cuda.synchronize()
            graph_us = _median_event_time_us(g.replay, 1, reps) / iters
        except RuntimeError as exc:  # a peer that cannot be captured keeps its eager time
            print(f"  (graph capture failed: {str(exc).splitlines()[0][:120]})")
            torch.cuda.synchronize()
    return Timing(eager_us=eager, graph_us=graph_us)


def tbps(num_bytes: float, time_us: float) -> float:
    """Decimal TB/s for `num_bytes` moved in `time_us`."""
    return num_bytes / (time_us * 1e-6) / 1e12


def pct_of_ceiling(num_bytes: float, time_us: float) -> float:
    return 100.0 * tbps(num_bytes, time_us) / read_ceiling_tbps()


def machine_info() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            sms=props.multi_processor_count,
            memory_gb=round(props.total_memory / 1e9, 1),
            cuda=torch.version.cuda,
        )
    else:
        info["gpu"] = None
    return info


@dataclass
class Report:
    """Rows of one benchmark run, printed as a table and saved as JSON + Markdown."""

    name: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        def fmt(v):
            if isinstance(v, float):
                return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
            return "" if v is None else str(v)

        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        for r in self.rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in self.columns) + " |")
        return "\n".join(lines)

    def save(self, out_dir: Path | None = None, tag: str = "") -> tuple[Path, Path]:
        """Writes <name>[-tag]-<date>.json/.md under bench/results (or out_dir)."""
        out_dir = Path(out_dir) if out_dir else RESULTS_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.timezone.utc)
        meta = {
            "benchmark": self.name,
            "date": now.isoformat(timespec="seconds"),
            "commit": source_commit(),
            **machine_info(),
        }
        # $DUSTIN_BENCH_TAG names a variant (e.g. the baseline build of an A/B run).
        tag = "-".join(t for t in (tag, os.environ.get("DUSTIN_BENCH_TAG", "")) if t)
        stem = f"{self.name}{'-' + tag if tag else ''}-{now:%Y%m%d-%H%M%S}"
        json_path = out_dir / f"{stem}.json"
        md_path = out_dir / f"{stem}.md"
        json_path.write_text(
            json.dumps({"meta": meta, "notes": self.notes, "rows": self.rows}, indent=1)
        )
        header = [f"# {self.name}", ""]
        header += [f"- {k}: {v}" for k, v in meta.items()]
        header += [f"- note: {n}" for n in self.notes]
        md_path.write_text("\n".join(header) + "\n\n" + self.markdown() + "\n")
        return json_path, md_path
