# SPDX-License-Identifier: Apache-2.0
"""select_blocks against the plain-PyTorch pipeline (masked torch.topk twice + sort), same run.

Budgets of 128/512/2048 tokens with blocks of 1, 16 and 64 tokens at 8k, 32k and 128k context,
one list per sequence ([B, NB]) or one per KV head ([B, 8, NB]); n_sink = 4, n_recent = 16,
q_len = 5, draft_share = 0.5, draft and target scores. Bytes are the two score rows read once.
The peer gets the forced blocks precomputed on the host (every sequence has the same length
here), which only helps it.

    python3 bench/bench_select_blocks.py [--quick] [--max-seconds S]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dustin  # noqa: F401  (registers torch.ops.dustin)
from dustin import ops

from bench.common import Report, time_cuda

Q_LEN, N_SINK, N_RECENT, SHARE = 5, 4, 16, 0.5
KV_HEADS = 8


def forced_blocks(context: int, bs: int) -> list[int]:
    nblk = -(-context // bs)
    sink = min(-(-N_SINK // bs), nblk)
    recent = max(max(context - Q_LEN - N_RECENT, 0) // bs, sink)
    return list(range(sink)) + list(range(recent, nblk))


def peer_select(draft, target, forced_ids, blocked, count):
    """Top-k by draft, then by target among the rest, forced blocks added, ids sorted."""
    rest = count - len(forced_ids)
    by_draft = int(rest * SHARE)
    first = draft.masked_fill(blocked, float("-inf")).topk(by_draft, dim=-1).indices
    second_scores = target.masked_fill(blocked, float("-inf")).scatter(-1, first, float("-inf"))
    second = second_scores.topk(rest - by_draft, dim=-1).indices
    chosen = torch.cat([forced_ids.expand(*draft.shape[:-1], -1), first, second], dim=-1)
    return chosen.sort(dim=-1).values.int()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32k context, B=16 only")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="skip the remaining cases after this long (noted in the results)")
    args = parser.parse_args()
    contexts = [32768] if args.quick else [32768, 8192, 131072]  # the 32k first
    batches = [16] if args.quick else [16, 1, 8, 64]

    report = Report(
        "select_blocks",
        ["context", "B", "lists", "bs", "NB", "budget_tokens", "K", "dustin_us",
         "dustin_eager_us", "peer_us", "peer_eager_us", "speedup"],
    )
    report.notes.append(f"q_len={Q_LEN}, n_sink={N_SINK}, n_recent={N_RECENT}, draft_share={SHARE}")
    report.notes.append("peer = masked torch.topk (draft) + masked topk (target) + cat + sort")
    gen = torch.Generator(device="cuda").manual_seed(0)
    start = time.monotonic()
    skipped = 0
    for context, batch, bs, per_head in itertools.product(contexts, batches, [1, 16, 64], [False, True]):
        if time.monotonic() - start > args.max_seconds:
            skipped += 1
            continue
        nb = context // bs
        shape = (batch, KV_HEADS, nb) if per_head else (batch, nb)
        draft = torch.rand(shape, device="cuda", generator=gen)
        target = torch.rand(shape, device="cuda", generator=gen)
        kv_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        forced = torch.tensor(forced_blocks(context, bs), device="cuda")
        blocked = torch.zeros(nb, dtype=torch.bool, device="cuda")
        blocked[forced] = True
        for budget_tokens in [128, 512, 2048]:
            budget = budget_tokens // bs
            k = ops.select_capacity(nb, budget, N_SINK, N_RECENT, Q_LEN, bs)
            ids = torch.empty(*shape[:-1], k, dtype=torch.int32, device="cuda")
            counts = torch.empty(shape[:-1], dtype=torch.int32, device="cuda")
            count = min(nb, max(budget, len(forced)))

            def dustin_call():
                torch.ops.dustin.select_blocks_out(
                    draft, target, kv_lens, Q_LEN, bs, budget, N_SINK, N_RECENT, SHARE, ids, counts)

            def peer_call():
                peer_select(draft, target, forced, blocked, count)

            # Same selection from both (random scores have no ties) before timing.
            dustin_call()
            expected = peer_select(draft, target, forced, blocked, count)
            assert torch.equal(ids[..., :count], expected), "dustin and the peer disagree"

            ours = time_cuda(dustin_call, reps=9)
            peer = time_cuda(peer_call, reps=9)
            report.add(
                context=context, B=batch, lists=f"per-KV-head x{KV_HEADS}" if per_head else "per-seq",
                bs=bs, NB=nb, budget_tokens=budget_tokens, K=k, dustin_us=ours.best_us,
                dustin_eager_us=ours.eager_us, peer_us=peer.best_us, peer_eager_us=peer.eager_us,
                speedup=peer.best_us / ours.best_us,
            )
            print(report.markdown().splitlines()[-1], flush=True)
    if skipped:
        report.notes.append(f"{skipped} cases skipped by --max-seconds")
    print(report.markdown())
    for path in report.save(tag="quick" if args.quick else ""):
        print("wrote", path)


if __name__ == "__main__":
    main()
