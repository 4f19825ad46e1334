# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: random paged caches and block lists on any device, and the cuda marker."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import dustin
import pytest
import torch
from hypothesis import settings

# Hypothesis: no per-example deadline (first calls pay for lazy initialisation), few examples by
# default so the CPU suite stays within minutes on two cores; tests raise it where it pays.
settings.register_profile("dustin", deadline=None, max_examples=25)
settings.load_profile("dustin")


def cuda_unavailable_reason() -> str | None:
    """Why CUDA tests cannot run here, or None when they can."""
    if not dustin.built_with_cuda():
        return "libdustin was built without CUDA (nvcc missing or DUSTIN_CUDA=OFF)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def fresh_generator() -> tuple[torch.Generator, int]:
    """A generator on a new random seed, and the seed (for failure messages): fresh inputs every
    run."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return torch.Generator().manual_seed(seed), seed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = cuda_unavailable_reason()
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"no CUDA GPU: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Runs a test once on the CPU and once on the GPU (skipped without one)."""
    return request.param


@dataclass
class PagedCache:
    """One layer's paged K/V cache and the block tables of a batch."""

    k_cache: torch.Tensor  # [num_pages, P, Hkv, D] (NHD) or [num_pages, Hkv, P, D] (HND)
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_pages] int32, -1 past each sequence's pages
    kv_lens: torch.Tensor  # [B] int32
    kv_layout: str
    page_size: int

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2] if self.kv_layout == "NHD" else self.k_cache.shape[1]


def make_paged_cache(
    kv_lens: Sequence[int],
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_layout: str,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    spare_pages: int = 2,
    spare_columns: int = 1,
    pooled: bool = False,
) -> PagedCache:
    """Random K and V with every sequence's pages shuffled through one pool.

    Slots past a sequence's length and the spare pages hold NaN, so an op that reads them
    produces NaN. With ``pooled`` k and v are views into one ``[num_pages, 2, ...]`` tensor (page
    stride twice the page size), as a cache carved out of a larger pool would be.
    """
    pages_per_seq = [math.ceil(n / page_size) for n in kv_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    max_pages = max(pages_per_seq, default=0) + spare_columns
    page_shape = (page_size, num_kv_heads) if kv_layout == "NHD" else (num_kv_heads, page_size)
    pool = torch.full((num_pages, 2, *page_shape, head_dim), math.nan)
    order = torch.randperm(num_pages, generator=generator)
    block_table = torch.full((len(kv_lens), max_pages), -1, dtype=torch.int32)
    used = 0
    for b, (kv_len, pages) in enumerate(zip(kv_lens, pages_per_seq)):
        block_table[b, :pages] = order[used : used + pages].to(torch.int32)
        used += pages
        for i in range(pages):
            tokens = min(page_size, kv_len - i * page_size)
            page = int(block_table[b, i])
            values = torch.randn(2, num_kv_heads, tokens, head_dim, generator=generator)
            if kv_layout == "NHD":
                pool[page, :, :tokens] = values.transpose(1, 2)
            else:
                pool[page, :, :, :tokens] = values
    pool = pool.to(dtype=dtype, device=device)
    k_cache, v_cache = pool[:, 0], pool[:, 1]
    if not pooled:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    return PagedCache(
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table.to(device),
        kv_lens=torch.tensor(list(kv_lens), dtype=torch.int32, device=device),
        kv_layout=kv_layout,
        page_size=page_size,
    )


def make_block_lists(
    kv_lens: Sequence[int],
    page_size: int,
    num_lists: int | None,
    generator: torch.Generator,
    extra_capacity: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ascending, unique lists: ``[B, K]``/``[B]`` (num_lists None) or ``[B, S, K]``/``[B, S]``.

    Each list holds a random subset of the sequence's blocks (window blocks included). Slots past
    a count hold a huge id, so an op that reads them fails its checks or its results.
    """
    lists = [
        [
            torch.nonzero(torch.rand(math.ceil(n / page_size), generator=generator) < p).flatten()
            for p in torch.rand(num_lists or 1, generator=generator).tolist()
        ]
        for n in kv_lens
    ]
    capacity = max(len(ids) for seq in lists for ids in seq) + extra_capacity
    block_ids = torch.full((len(kv_lens), num_lists or 1, capacity), 2**30, dtype=torch.int32)
    block_counts = torch.zeros(len(kv_lens), num_lists or 1, dtype=torch.int32)
    for b, seq in enumerate(lists):
        for s, ids in enumerate(seq):
            block_ids[b, s, : len(ids)] = ids.to(torch.int32)
            block_counts[b, s] = len(ids)
    if num_lists is None:
        return block_ids[:, 0].contiguous(), block_counts[:, 0].contiguous()
    return block_ids, block_counts
