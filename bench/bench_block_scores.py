# SPDX-License-Identifier: Apache-2.0
"""block_scores against the plain-PyTorch pipeline (matmul + softmax + reshape-sum), same run.

Scoring of one step: Hs retrieval heads on each of 1 or 2 layers, n = 5 queries, D = 128, bf16,
score blocks of 16 over an HND cache of 16-token pages in shuffled order, every sequence at the
full context. Heads either sit on distinct KV heads or all share one (then their keys are read
once). Bytes are the keys that must be read once: layers * B * context * distinct KV heads * D *
2. The peer reads the same keys from a dense per-head tensor [B, Hkv, L, D] (its best case: no
gather). Small cases rotate through enough caches that the inputs do not sit in the 60 MB L2.

    python3 bench/bench_block_scores.py [--quick] [--max-seconds S]
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

from bench.common import L2_ROTATE_BYTES, Report, ceiling_note, pct_of_ceiling, tbps, time_cuda

D = 128
QUERIES = 5
PAGE = 16
BLOCK = 16
KV_HEADS = 8
DTYPE = torch.bfloat16


def make_inputs(batch: int, context: int, layers: int, gen: torch.Generator):
    """Caches (paged HND for dustin, dense [B, Hkv, L, D] for the peer), enough for rotation."""
    layer_bytes = batch * context * KV_HEADS * D * 2
    sets = max(1, -(-L2_ROTATE_BYTES // (layer_bytes * layers)))
    pages_per_seq = context // PAGE
    num_pages = batch * pages_per_seq
    paged, dense, tables = [], [], []
    for _ in range(sets * layers):
        k = torch.empty(num_pages, KV_HEADS, PAGE, D, dtype=DTYPE, device="cuda").normal_(generator=gen)
        perm = torch.randperm(num_pages, device="cuda", generator=gen)
        table = perm.view(batch, pages_per_seq).to(torch.int32)
        paged.append(k)
        tables.append(table)
        # The peer's copy holds the same keys in sequence order, one contiguous [L, D] per head
        # (gathered a head at a time to keep the peak memory low).
        k_dense = torch.empty(batch, KV_HEADS, context, D, dtype=DTYPE, device="cuda")
        for h in range(KV_HEADS):
            k_dense[:, h] = k[:, h][table.long()].reshape(batch, context, D)
        dense.append(k_dense)
    return paged, tables, dense, sets


def peer_layer(q, k_dense, groups, scores):
    """matmul + causal softmax + block sums in PyTorch, one matmul per KV head read."""
    batch, n, _, d = q.shape
    context = k_dense.shape[2]
    tail_mask = torch.full((n, n), float("-inf"), device=q.device).triu(1)  # query i sees <= i
    for kv_head, heads in groups:
        qg = q.index_select(2, heads).permute(0, 2, 1, 3).reshape(batch, len(heads) * n, d)
        logits = torch.matmul(qg, k_dense[:, kv_head].transpose(1, 2)).float() * d**-0.5
        logits[:, :, context - n :] += tail_mask.repeat(len(heads), 1)
        probs = torch.softmax(logits, dim=-1)
        scores += probs.view(batch, len(heads) * n, context // BLOCK, BLOCK).sum((1, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 32k, B=16 cases only")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="skip the remaining cases after this long (noted in the results)")
    args = parser.parse_args()
    contexts = [32768] if args.quick else [32768, 8192, 131072]  # the 32k first
    batches = [16] if args.quick else [16, 1, 8, 64]

    report = Report(
        "block_scores",
        ["context", "B", "Hs", "layers", "heads", "key_MB", "dustin_us", "dustin_eager_us",
         "dustin_TBps", "pct_ceiling", "peer_us", "peer_TBps", "speedup"],
    )
    report.notes.append(f"n={QUERIES}, D={D}, bf16, HND pages of {PAGE} (shuffled), blocks of {BLOCK}")
    report.notes.append("bytes = keys read once; peer = torch matmul+softmax+reshape-sum on dense keys")
    report.notes.append(ceiling_note())
    gen = torch.Generator(device="cuda").manual_seed(0)
    start = time.monotonic()
    skipped = 0
    for context, batch in itertools.product(contexts, batches):
        if time.monotonic() - start > args.max_seconds:
            skipped += 1
            continue
        paged, tables, dense, sets = make_inputs(batch, context, 2, gen)
        kv_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        nb = context // BLOCK
        scores = torch.zeros(batch, nb, device="cuda")
        peer_scores = torch.zeros(batch, nb, device="cuda")
        for hs, layers, shared in itertools.product([4, 8], [1, 2], [False, True]):
            q = torch.randn(batch, QUERIES, hs, D, dtype=DTYPE, device="cuda", generator=gen)
            head_map_list = [0] * hs if shared else list(range(hs))
            head_map = torch.tensor(head_map_list, dtype=torch.int32, device="cuda")
            groups = [
                (kv, torch.tensor([h for h in range(hs) if head_map_list[h] == kv], device="cuda"))
                for kv in sorted(set(head_map_list))
            ]
            workspace_bytes = batch * hs * QUERIES * 8 * (nb + 1024)
            workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device="cuda")
            step = itertools.count()

            def dustin_step():
                base = (next(step) % sets) * 2
                for layer in range(layers):
                    torch.ops.dustin.block_scores(
                        q, paged[base + layer], tables[base + layer], kv_lens, head_map,
                        D**-0.5, BLOCK, "HND", scores, workspace)

            def peer_step():
                base = (next(step) % sets) * 2
                for layer in range(layers):
                    peer_layer(q, dense[base + layer], groups, peer_scores)

            # Same numbers from both before timing.
            scores.zero_()
            peer_scores.zero_()
            dustin_step()
            step = itertools.count()
            peer_step()
            err = ((scores - peer_scores).norm() / peer_scores.norm()).item()
            assert err < 5e-2, f"dustin and the peer disagree: relative error {err:.2e}"

            key_bytes = layers * batch * context * len(groups) * D * 2
            ours = time_cuda(dustin_step, reps=9)
            peer = time_cuda(peer_step, reps=9)
            report.add(
                context=context, B=batch, Hs=hs, layers=layers,
                heads="shared" if shared else "distinct", key_MB=key_bytes / 1e6,
                dustin_us=ours.best_us, dustin_eager_us=ours.eager_us,
                dustin_TBps=tbps(key_bytes, ours.best_us),
                pct_ceiling=pct_of_ceiling(key_bytes, ours.best_us),
                peer_us=peer.best_us, peer_TBps=tbps(key_bytes, peer.best_us),
                speedup=peer.best_us / ours.best_us,
            )
            print(report.markdown().splitlines()[-1], flush=True)
        del paged, tables, dense
        torch.cuda.empty_cache()
    if skipped:
        report.notes.append(f"{skipped} (context, B) groups skipped by --max-seconds")
    print(report.markdown())
    for path in report.save(tag="quick" if args.quick else ""):
        print("wrote", path)


if __name__ == "__main__":
    main()
