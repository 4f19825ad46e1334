# SPDX-License-Identifier: Apache-2.0
"""A small CUDA case of every op, run under compute-sanitizer (memcheck, racecheck) by
scripts/gpu_check.sh: odd lengths, a partly filled last page, both block_scores partial paths,
both block_scores row-tile paths, a store_kv window, select_blocks' tie scan and later radix
passes, unsplit verify and both split merges (in a cluster, and by the merge launch), and
decode_linear plain, gated, with its norm staged in shared memory, and with RoPE."""

import torch
from dustin import ops  # also registers torch.ops.dustin


def main() -> None:
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    batch, q_len, hq, hkv, d, page = 3, 5, 8, 2, 128, 16
    kv_lens = torch.tensor([37, 300, 1000], dtype=torch.int32, device=dev)
    max_pages = (int(kv_lens.max()) + page - 1) // page
    num_pages = batch * max_pages
    k = torch.randn(num_pages, hkv, page, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    table = torch.randperm(num_pages, device=dev, dtype=torch.int32).view(batch, max_pages)
    q = torch.randn(batch, q_len, hq, d, device=dev, dtype=dtype)
    nb = max_pages

    draft = torch.rand(batch, nb, device=dev)
    target = torch.rand(batch, nb, device=dev)
    q_srh = torch.randn(batch, q_len, 3, d, device=dev, dtype=dtype)
    head_map = torch.tensor([0, 1, 1], dtype=torch.int32, device=dev)
    torch.ops.dustin.block_scores(q_srh, k, table, kv_lens, head_map, d**-0.5, page, "HND", draft)
    # A block size that is not a multiple of 8 takes the other partial path (a segmented scan).
    odd_block = 12
    odd_scores = torch.zeros(batch, -(-int(kv_lens.max()) // odd_block), device=dev)
    torch.ops.dustin.block_scores(
        q_srh, k, table, kv_lens, head_map, d**-0.5, odd_block, "HND", odd_scores
    )
    # Four heads on one KV head: 20 query rows, two row tiles (the second kept in shared memory).
    q_shared = torch.randn(batch, q_len, 4, d, device=dev, dtype=dtype)
    shared_map = torch.zeros(4, dtype=torch.int32, device=dev)
    torch.ops.dustin.block_scores(
        q_shared, k, table, kv_lens, shared_map, d**-0.5, page, "HND", draft
    )
    # The window's keys and values written through the block table, as the engine does.
    positions = (kv_lens - q_len).long()[:, None] + torch.arange(q_len, device=dev)
    pages = table.gather(1, (positions // page).int()).long().flatten()
    slots = (positions % page).flatten()
    new_k = torch.randn(batch * q_len, hkv, d, device=dev, dtype=dtype)
    torch.ops.dustin.store_kv(new_k, torch.randn_like(new_k), k, v, pages, slots, "HND")
    for budget in (4, nb):  # sparse and dense lists: the dense one takes the split path
        ids, counts = torch.ops.dustin.select_blocks(
            draft, target, kv_lens, q_len, page, budget, 4, 16, 0.5
        )
        out, lse = torch.ops.dustin.sparse_verify(
            q, k, v, table, kv_lens, ids, counts, d**-0.5, "HND"
        )
    # The dense lists once more, as 4 splits of each list: 64-row CTAs (q = 5) merge by the merge
    # launch, 16-row ones (q = 2, the window's last two tokens) on chip in a Hopper cluster ...
    for rows in (q_len, 2):
        q_rows = q[:, q_len - rows :]
        out_rows = torch.empty(q_rows.shape, device=dev, dtype=dtype)
        lse_rows = torch.empty(q_rows.shape[:-1], device=dev)
        per_split = q_rows.numel() // d * (d + 1) * 4
        workspace = torch.empty(4 * per_split, dtype=torch.uint8, device=dev)
        ops.sparse_verify_out(
            q_rows, k, v, table, kv_lens, ids, counts, d**-0.5, "HND", out_rows, lse_rows, workspace
        )
    # ... and one long sequence cut into more splits than a cluster holds: the merge launch.
    long_len = 6000
    long_pages = -(-long_len // page)
    long_k = torch.randn(long_pages, hkv, page, d, device=dev, dtype=dtype)
    long_table = torch.arange(long_pages, device=dev, dtype=torch.int32)[None]
    long_kv_lens = torch.tensor([long_len], dtype=torch.int32, device=dev)
    long_ids, long_counts = ops.dense_block_lists(long_kv_lens, page)
    long_v = torch.randn_like(long_k)
    long_args = (long_k, long_v, long_table, long_kv_lens, long_ids, long_counts, d**-0.5, "HND")
    long_out, long_lse = torch.ops.dustin.sparse_verify(q[:1], *long_args)
    # select_blocks' other paths: tied scores (the ordered tie scan), and a long row whose
    # boundary bins need further radix passes after the first digit.
    tied = torch.zeros(batch, nb, device=dev)
    torch.ops.dustin.select_blocks(tied, None, kv_lens, q_len, page, 6, 1, 1, 0.5)
    long_nb = 5000
    long_lens = torch.full((2,), long_nb, dtype=torch.int32, device=dev)
    # Eight clusters of 625 (top digit) spread over the lowest bits: a second pass.
    cluster = (torch.arange(long_nb, device=dev) % 8) * 2.0**-10
    long_draft = 1.0 + cluster + torch.rand(2, 2, long_nb, device=dev) * 2.0**-20
    torch.ops.dustin.select_blocks(
        long_draft, torch.rand_like(long_draft), long_lens, q_len, 1, 1500, 4, 16, 0.5
    )
    # decode_linear: 13 rows, K = 200 (not a multiple of 32), 21 columns (not of 8), with bias,
    # and gated over more tiles than one wave holds, so CTAs walk several tiles.
    x = torch.randn(13, 200, device=dev, dtype=dtype)
    linear_out = ops.decode_linear(
        x, torch.randn(21, 200, device=dev, dtype=dtype), torch.randn(21, device=dev, dtype=dtype)
    )
    gated_out = ops.decode_linear(
        x, torch.randn(2 * 8 * 600, 200, device=dev, dtype=dtype), gated=True
    )
    # ... and with x normalised in shared memory first (racecheck: its staging) and a residual.
    glued_out = ops.decode_linear(
        x,
        torch.randn(2 * 8 * 600, 200, device=dev, dtype=dtype),
        gated=True,
        norm_weight=torch.rand(200, device=dev, dtype=dtype),
        residual=torch.randn(13, 8 * 600, device=dev, dtype=dtype),
    )
    # ... and q/k/v of 3 heads of D 64 with RoPE on the first two (its permuted tiles).
    angles = torch.rand(13, 64, device=dev)
    rotated_out = ops.decode_linear(
        x,
        torch.randn(3 * 64, 200, device=dev, dtype=dtype),
        rope=(angles.cos().to(dtype), angles.sin().to(dtype)),
        rope_columns=128,
    )
    torch.cuda.synchronize()
    outputs = (linear_out, gated_out, glued_out, rotated_out)
    assert all(torch.isfinite(y).all() for y in outputs)
    for o, l in ((out, lse), (long_out, long_lse)):
        assert torch.isfinite(o.float()).all() and torch.isfinite(l).all()
    print("sanitize case ran")


if __name__ == "__main__":
    main()
