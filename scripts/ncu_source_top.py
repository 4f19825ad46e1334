# SPDX-License-Identifier: Apache-2.0
"""The SASS instructions where a profiled kernel's warps spend their samples, most first.

Reads the CSV of `ncu -i REPORT --page source --csv --print-source sass` (gpu_check.sh
profile-source) and prints each instruction's share of the warp-state samples with its largest
stall reasons, so a kernel's stalls can be read without the Nsight UI. `--regions` sums the
shares over address ranges (offsets from the kernel's first instruction, e.g. the start, the
main loop and the epilogue found in the listing).

    python3 scripts/ncu_source_top.py source.csv [--top 40] [--regions 0x0,0x2310,0x8100]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def to_number(text: str | None) -> float:
    try:
        return float((text or "").replace(",", ""))
    except ValueError:
        return 0.0


def read_rows(path: Path) -> list[dict]:
    """The per-instruction rows (ncu prints the kernel's name and a header line first)."""
    text = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(text) if SAMPLES in line), None)
    if start is None:
        print(f"no '{SAMPLES}' column; the file begins:", *text[:8], sep="\n")
        sys.exit(1)
    return list(csv.DictReader(text[start:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--regions", default="", help="comma-separated first offsets (hex)")
    args = parser.parse_args()
    rows = read_rows(args.csv)
    stalls = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    base = int(rows[0]["Address"], 16)
    total = sum(to_number(r[SAMPLES]) for r in rows) or 1.0

    def reasons(counter: Counter, n: int) -> str:
        top = counter.most_common(n)
        return ", ".join(f"{k[len('stall_'):]} {100 * v / total:.1f}" for k, v in top)

    print(f"{len(rows)} instructions, {total:.0f} samples")
    if args.regions:
        firsts = sorted(int(x, 16) for x in args.regions.split(","))
        sums = {f: Counter() for f in firsts}
        for r in rows:
            offset = int(r["Address"], 16) - base
            first = max((f for f in firsts if f <= offset), default=firsts[0])
            for c in stalls:
                sums[first][c] += to_number(r[c])
        for first, counter in sums.items():
            share = 100 * sum(counter.values()) / total
            print(f"from {first:#07x}: {share:5.1f}%  ({reasons(counter, 4)})")
    for r in sorted(rows, key=lambda r: to_number(r[SAMPLES]), reverse=True)[: args.top]:
        share = 100 * to_number(r[SAMPLES]) / total
        top = Counter({c: to_number(r[c]) for c in stalls})
        offset = int(r["Address"], 16) - base
        print(f"{share:5.1f}% {offset:#07x}  {r['Source'].strip()[:60]:60s}  {reasons(top, 2)}")


if __name__ == "__main__":
    main()
