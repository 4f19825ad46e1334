# SPDX-License-Identifier: Apache-2.0
"""One sparse_verify case, called a few times, for Nsight Compute (`gpu_check.sh profile`).

    ncu --clock-control none -k regex:sparse_verify_kernel -s 3 -c 1 \
        python3 scripts/profile_sparse_verify.py --shape qwen2.5-72b --budget 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_sparse_verify import DTYPE, SHAPES, PagedCase, dustin_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-72b", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--q", type=int, default=5)
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--budget", type=int, default=512, help="tokens; 0: dense (every block)")
    parser.add_argument("--splits", type=int, default=None, help="cap (default: the planner's)")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    # One input set: Nsight Compute flushes the caches before each profiled launch itself.
    case = PagedCase(shape, args.batch, args.context, args.page, gen, rotate_bytes=0)
    q = torch.randn(
        args.batch, args.q, shape.num_qo_heads, shape.head_dim, device="cuda", dtype=DTYPE
    )
    sets, _ = case.lists(args.budget or None, args.q)
    fn = dustin_fn(case, q, sets, args.splits)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    print(f"profiled {args}")


if __name__ == "__main__":
    main()
