# SPDX-License-Identifier: Apache-2.0
"""One block_scores case, called a few times, for Nsight Compute (`gpu_check.sh profile` with
PROFILE_SCRIPT=scripts/profile_block_scores.py PROFILE_KERNEL=block_scores_fragment).

    ncu --clock-control none -k regex:block_scores_fragment -s 3 -c 1 \
        python3 scripts/profile_block_scores.py --heads 4 --distinct
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_block_scores import BLOCK, DTYPE, QUERIES, D, make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=4, help="retrieval heads (Hs)")
    parser.add_argument("--distinct", action="store_true", help="one KV head each (else shared)")
    parser.add_argument("--block", type=int, default=BLOCK, help="score block size")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    paged, tables, _, _ = make_inputs(args.batch, args.context, 1, gen)
    kv_lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    q = torch.randn(args.batch, QUERIES, args.heads, D, dtype=DTYPE, device="cuda", generator=gen)
    head_map = torch.tensor(
        list(range(args.heads)) if args.distinct else [0] * args.heads,
        dtype=torch.int32, device="cuda",
    )
    scores = torch.zeros(args.batch, -(-args.context // args.block), device="cuda")
    for _ in range(args.calls):
        torch.ops.dustin.block_scores(
            q, paged[0], tables[0], kv_lens, head_map, D**-0.5, args.block, "HND", scores
        )
    torch.cuda.synchronize()
    print(f"profiled {args}")


if __name__ == "__main__":
    main()
