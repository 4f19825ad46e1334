# SPDX-License-Identifier: Apache-2.0
"""The source lines where a profiled kernel's warps spend their samples, most first.

Reads the CSV of `ncu -i REPORT --page source --csv --print-source cuda` (gpu_check.sh
profile-source) and prints each line's share of the warp-state samples with the samples'
columns that ncu gives per line, so a kernel's stalls can be read without the Nsight UI.

    python3 scripts/ncu_source_top.py source.csv [--top 40]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def to_number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    text = args.csv.read_text(errors="replace").splitlines()
    # ncu may print a few lines (the kernel's name, notes) before the table's header.
    start = next((i for i, line in enumerate(text) if "Warp Stall Sampling" in line), None)
    if start is None:
        print("no 'Warp Stall Sampling' column; the file begins:", *text[:15], sep="\n")
        sys.exit(1)
    rows = list(csv.DictReader(text[start:]))
    columns = list(rows[0].keys()) if rows else []
    samples = next(c for c in columns if c.startswith("Warp Stall Sampling (All"))
    not_issued = next((c for c in columns if c.startswith("Warp Stall Sampling (Not")), None)
    where = next((c for c in columns if c.strip("# ").lower() in ("line", "address")), columns[0])
    source = next((c for c in columns if c.lower() == "source"), columns[1])
    total = sum(to_number(r[samples]) for r in rows) or 1.0
    print(f"{len(rows)} lines, {total:.0f} samples; columns: {columns}")
    ranked = sorted(rows, key=lambda r: to_number(r[samples]), reverse=True)[: args.top]
    for r in ranked:
        share = 100.0 * to_number(r[samples]) / total
        idle = f" not-issued {to_number(r[not_issued]):.0f}" if not_issued else ""
        print(f"{share:5.1f}% {r[where]:>6} {idle:>18}  {r[source].strip()[:110]}")


if __name__ == "__main__":
    main()
