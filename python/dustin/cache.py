# SPDX-License-Identifier: Apache-2.0
"""Paged KV cache: a page pool per layer, block tables shared by the layers, append and rollback.

Every layer of a model stores its keys and values in the same pages (one pool tensor per layer,
one block table for all layers), so appending a window or rolling back rejected tokens is one
piece of bookkeeping per step, not one per layer. The pool is sized once, from a token budget;
pages are handed to sequences as they grow and returned when they shrink.

Layouts follow ``docs/ops.md``: ``"HND"`` pages are ``[num_pages, Hkv, P, D]`` (one (page, head)
tile is contiguous: the fast layout for block gathers), ``"NHD"`` pages ``[num_pages, P, Hkv, D]``.
"""

from __future__ import annotations

import copy

import torch

from dustin import _C, ops

__all__ = ["CacheFullError", "PagedKVCache", "pages_needed"]

LAYOUTS = ("HND", "NHD")
#: Page dtypes ``dustin.ops.store_kv`` writes (on the CPU, and on CUDA when built with it).
STORE_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CacheFullError(RuntimeError):
    """A request needs more tokens than the cache was sized for."""


def pages_needed(seq_lens: list[int], page_size: int) -> int:
    """Pages a cache must hold so that sequences of these lengths fit at once."""
    return sum(-(-n // page_size) for n in seq_lens)


class PagedKVCache:
    """Keys and values of ``batch_size`` sequences for every layer of one model.

    Host-side bookkeeping (``lens``, the pages of each sequence) is the source of truth; the
    device tensors ``block_table`` and ``kv_lens`` mirror it after every change, so the
    per-step ops never need a host sync to read them.

    Args:
        num_layers, num_kv_heads, head_dim: shape of the model's attention.
        batch_size: sequences held (B).
        max_seq_len: longest sequence (tokens); sets the block table width.
        token_budget: tokens the pool holds over all sequences; defaults to
            ``batch_size * max_seq_len``. Rounded up to whole pages.
        page_size: tokens per page (P, 1..128); also the selection block size.
        layout: ``"HND"`` (default) or ``"NHD"``.
        dtype, device: of the pages.

    Raises:
        ValueError: a size or the layout is invalid.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        batch_size: int,
        max_seq_len: int,
        *,
        token_budget: int | None = None,
        page_size: int = 16,
        layout: str = "HND",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("batch_size", batch_size),
            ("max_seq_len", max_seq_len),
        ):
            if value < 1:
                raise ValueError(f"PagedKVCache: {name} must be >= 1, got {value}")
        if not 1 <= page_size <= 128:
            raise ValueError(f"PagedKVCache: page_size must be in [1, 128], got {page_size}")
        if layout not in LAYOUTS:
            raise ValueError(f"PagedKVCache: layout must be one of {LAYOUTS}, got {layout!r}")
        if token_budget is None:
            token_budget = batch_size * max_seq_len
        if token_budget < 1:
            raise ValueError(f"PagedKVCache: token_budget must be >= 1, got {token_budget}")

        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.page_size = page_size
        self.layout = layout
        self.max_pages_per_seq = -(-max_seq_len // page_size)
        self.num_pages = -(-token_budget // page_size)
        self.device = torch.device(device)

        tile = (num_kv_heads, page_size) if layout == "HND" else (page_size, num_kv_heads)
        # One allocation for all layers; [layer, k|v] views keep every page tile contiguous.
        self._pool = torch.zeros(
            (num_layers, 2, self.num_pages, *tile, head_dim), dtype=dtype, device=self.device
        )
        self.block_table = torch.zeros(
            (batch_size, self.max_pages_per_seq), dtype=torch.int32, device=self.device
        )
        self.kv_lens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self.lens = [0] * batch_size
        self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._write_pages = self._write_slots = None  # where the last appended window goes
        # store() writes k and v in one dustin launch where the op runs; elsewhere it falls back
        # to PyTorch's indexed assignment (two kernels).
        self._store_with_op = dtype in STORE_KV_DTYPES and (
            self.device.type == "cpu" or (self.device.type == "cuda" and _C.built_with_cuda())
        )

    # Shapes and views ------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        return self._pool.shape[3] if self.layout == "HND" else self._pool.shape[4]

    @property
    def head_dim(self) -> int:
        return self._pool.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self._pool.dtype

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def k(self, layer: int) -> torch.Tensor:
        """Key pages of one layer: ``[num_pages, Hkv, P, D]`` (HND) or ``[num_pages, P, Hkv, D]``."""
        return self._pool[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        """Value pages of one layer, shaped as ``k(layer)``."""
        return self._pool[layer, 1]

    # Growth and rollback ---------------------------------------------------------------------

    def append(self, num_tokens: int, seqs: list[int] | None = None) -> list[int]:
        """Makes room for a window of ``num_tokens`` new tokens at the end of each sequence.

        Pages are taken from the pool as needed; ``kv_lens`` then counts the window, as the ops
        expect. The next ``write`` calls (one per layer) fill the window.

        Args:
            num_tokens: window length (the same for every sequence in ``seqs``).
            seqs: sequences that grow (default: all).

        Returns:
            The window's first position in each of ``seqs``.

        Raises:
            CacheFullError: a sequence would pass ``max_seq_len`` or the pool is out of pages;
                nothing is changed then.
        """
        seqs = list(range(self.batch_size)) if seqs is None else seqs
        if num_tokens < 1:
            raise ValueError(f"PagedKVCache.append: num_tokens must be >= 1, got {num_tokens}")
        new_lens = [self.lens[b] + num_tokens for b in seqs]
        for b, n in zip(seqs, new_lens):
            if n > self.max_seq_len:
                raise CacheFullError(
                    f"sequence {b} would hold {n} tokens, past the cache's max_seq_len "
                    f"{self.max_seq_len}; size the cache for prompt + new tokens + window"
                )
        # Reserved pages (see reserve) count: a sequence may already hold more than it needs.
        wanted = sum(
            max(0, -(-n // self.page_size) - len(self._pages[b])) for b, n in zip(seqs, new_lens)
        )
        if wanted > len(self._free):
            raise CacheFullError(
                f"the KV cache is out of pages: {wanted} more needed, {len(self._free)} free of "
                f"{self.num_pages} ({self.num_pages * self.page_size} tokens); raise its token_budget"
            )

        starts, pages, slots = [], [], []
        for b, n in zip(seqs, new_lens):
            while len(self._pages[b]) * self.page_size < n:
                self._pages[b].append(self._free.pop())
            positions = range(self.lens[b], n)
            pages += [self._pages[b][p // self.page_size] for p in positions]
            slots += [p % self.page_size for p in positions]
            starts.append(self.lens[b])
            self.lens[b] = n
        self._sync(seqs)
        self._write_pages = torch.tensor(pages, dtype=torch.long, device=self.device)
        self._write_slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        return starts

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores one layer's keys and values of the window made by the last ``append``.

        Args:
            layer: layer index.
            k, v: ``[b, n, Hkv, D]`` for the ``b`` sequences and ``n`` tokens of that window.
        """
        if self._write_pages is None:
            raise RuntimeError("PagedKVCache.write: call append() first to make room")
        k = k.reshape(-1, *k.shape[-2:]).to(self.dtype)
        v = v.reshape(-1, *v.shape[-2:]).to(self.dtype)
        if k.shape[0] != self._write_pages.numel():
            raise ValueError(
                f"PagedKVCache.write: k holds {k.shape[0]} tokens, the window {self._write_pages.numel()}"
            )
        self.store(layer, self._write_pages, self._write_slots, k, v)

    def store(
        self, layer: int, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Writes tokens' keys and values at given (physical page, slot) places of one layer.

        Nothing here reads back to the host, so a CUDA graph can capture it with ``pages`` and
        ``slots`` computed on the device (from ``block_table`` and ``kv_lens``).

        Args:
            layer: layer index.
            pages, slots: ``[N]`` int64 physical page and slot in the page of each token, on the
                cache's device.
            k, v: ``[N, Hkv, D]``, converted to the cache's dtype if needed.
        """
        if self._store_with_op:
            # One launch for k and v (dustin.ops.store_kv); no host check, so it can be captured.
            ops.store_kv(
                self._rows(k),
                self._rows(v),
                self.k(layer),
                self.v(layer),
                pages,
                slots,
                self.layout,
                validate=False,
            )
            return
        if self.layout == "HND":
            self.k(layer)[pages, :, slots] = k
            self.v(layer)[pages, :, slots] = v
        else:
            self.k(layer)[pages, slots] = k
            self.v(layer)[pages, slots] = v

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """t in the cache's dtype with a contiguous last dim, as store_kv takes it (a no-op for
        the model's keys and values, strided slices of a fused projection included)."""
        t = t.to(self.dtype)
        return t if t.stride(-1) == 1 else t.contiguous()

    def reserve(self, lens: list[int]) -> None:
        """Hands every sequence the pages for ``lens[b]`` tokens now, without changing its length.

        Growth up to there then needs no host work: a CUDA-graph decoding step (``dustin.fast``)
        appends by raising ``kv_lens`` on the device and writing through ``block_table``. The
        pages stay with the sequence until ``truncate`` cuts below them.

        Raises:
            CacheFullError: a length passes ``max_seq_len`` or the pool is out of pages; nothing
                is changed then.
        """
        if len(lens) != self.batch_size:
            raise ValueError(
                f"PagedKVCache.reserve: lens must have {self.batch_size} entries, got {len(lens)}"
            )
        for b, n in enumerate(lens):
            if n > self.max_seq_len:
                raise CacheFullError(
                    f"sequence {b} would reserve {n} tokens, past the cache's max_seq_len "
                    f"{self.max_seq_len}"
                )
        wanted = [max(0, -(-n // self.page_size) - len(self._pages[b])) for b, n in enumerate(lens)]
        if sum(wanted) > len(self._free):
            raise CacheFullError(
                f"the KV cache is out of pages: {sum(wanted)} more needed to reserve, "
                f"{len(self._free)} free of {self.num_pages}; raise its token_budget"
            )
        for b, count in enumerate(wanted):
            self._pages[b] += [self._free.pop() for _ in range(count)]
        self._sync(list(range(self.batch_size)))

    def pull_lens(self) -> None:
        """Takes the lengths back from ``kv_lens`` after steps that changed them on the device
        (one host sync), so the host bookkeeping is the source of truth again."""
        self.lens = [int(n) for n in self.kv_lens.tolist()]
        for b, n in enumerate(self.lens):
            if n > len(self._pages[b]) * self.page_size:
                raise RuntimeError(
                    f"PagedKVCache.pull_lens: sequence {b} has {n} tokens on the device but only "
                    f"{len(self._pages[b])} pages; it grew past its reserved pages"
                )

    def truncate(self, lens: list[int]) -> None:
        """Rolls sequences back to the given lengths, returning pages no longer needed.

        Args:
            lens: new length of every sequence, each in ``[0, current length]``.

        Raises:
            ValueError: a length is negative or longer than the sequence.
        """
        if len(lens) != self.batch_size:
            raise ValueError(
                f"PagedKVCache.truncate: lens must have {self.batch_size} entries, got {len(lens)}"
            )
        for b, n in enumerate(lens):
            if not 0 <= n <= self.lens[b]:
                raise ValueError(
                    f"PagedKVCache.truncate: lens[{b}] must be in [0, {self.lens[b]}], got {n}"
                )
        changed = [b for b, n in enumerate(lens) if n != self.lens[b]]
        for b in changed:
            keep = -(-lens[b] // self.page_size)
            self._free += reversed(self._pages[b][keep:])
            del self._pages[b][keep:]
            self.lens[b] = lens[b]
        if changed:
            self._sync(changed)
        self._write_pages = self._write_slots = None

    def clone(self) -> PagedKVCache:
        """An independent copy (e.g. to reuse one prefill for several decoding methods)."""
        other = copy.copy(self)
        other._pool = self._pool.clone()
        other.block_table = self.block_table.clone()
        other.kv_lens = self.kv_lens.clone()
        other.lens = list(self.lens)
        other._pages = [list(p) for p in self._pages]
        other._free = list(self._free)
        other._write_pages = other._write_slots = None
        return other

    # Reading back ----------------------------------------------------------------------------

    def gather(
        self, layer: int, seq: int, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one sequence's first ``length`` tokens (default: all).

        Returns:
            ``(k, v)``, each ``[Hkv, length, D]`` (a copy), in position order.
        """
        length = self.lens[seq] if length is None else length
        pages = torch.tensor(
            self._pages[seq][: -(-length // self.page_size)], dtype=torch.long, device=self.device
        )
        out = []
        for pool in (self.k(layer), self.v(layer)):
            tiles = pool[pages]  # [n_pages, Hkv, P, D] or [n_pages, P, Hkv, D]
            if self.layout == "NHD":
                tiles = tiles.transpose(1, 2)
            out.append(tiles.transpose(0, 1).reshape(tiles.shape[1], -1, self.head_dim)[:, :length])
        return out[0], out[1]

    def _sync(self, seqs: list[int]) -> None:
        """Mirrors the host bookkeeping of ``seqs`` into ``block_table`` and ``kv_lens``."""
        width = self.max_pages_per_seq
        rows = torch.tensor(
            [self._pages[b] + [0] * (width - len(self._pages[b])) for b in seqs], dtype=torch.int32
        )
        index = torch.tensor(seqs, dtype=torch.long)
        self.block_table[index.to(self.device)] = rows.to(self.device)
        self.kv_lens.copy_(torch.tensor(self.lens, dtype=torch.int32))
