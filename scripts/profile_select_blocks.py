# SPDX-License-Identifier: Apache-2.0
"""One select_blocks case, called a few times, for Nsight Compute (`gpu_check.sh profile` with
PROFILE_SCRIPT=scripts/profile_select_blocks.py PROFILE_KERNEL=select_blocks_kernel).

    ncu --clock-control none -k regex:select_blocks_kernel -s 3 -c 1 \
        python3 scripts/profile_select_blocks.py --blocks 2048 --budget 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_select_blocks import N_RECENT, N_SINK, Q_LEN, SHARE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=2048, help="NB (blocks of 16 tokens)")
    parser.add_argument("--budget", type=int, default=128, help="budget in blocks")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    block = 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    draft = torch.rand(args.batch, args.blocks, device="cuda", generator=gen)
    target = torch.rand(args.batch, args.blocks, device="cuda", generator=gen)
    kv_lens = torch.full((args.batch,), args.blocks * block, dtype=torch.int32, device="cuda")
    for _ in range(args.calls):
        torch.ops.dustin.select_blocks(
            draft, target, kv_lens, Q_LEN, block, args.budget, N_SINK, N_RECENT, SHARE
        )
    torch.cuda.synchronize()
    print(f"profiled {args}")


if __name__ == "__main__":
    main()
