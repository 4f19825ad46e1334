# SPDX-License-Identifier: Apache-2.0
"""Speculative and plain decoding steps on static buffers, replayed as CUDA graphs.

At long context and large batch a decoding step runs a few hundred kernels of about 10
microseconds each (one ``sparse_verify`` per layer, projections, MLPs); launched one by one from
Python they would spend more time in the interpreter and the driver than on the GPU. Here every
phase of a step reads and writes only preallocated device buffers, so each phase is captured once
as a CUDA graph and replayed:

- ``draft``: the draft proposes ``gamma`` tokens (greedy), keeping its retrieval-head queries;
  it attends its full cache, or a StreamingLLM window of it (sink blocks plus the most recent
  blocks, as MagicDec's draft does) while still writing every token into the full cache;
- ``lookahead``: those queries' attention over the draft's *full* cache (``block_scores``);
- ``select``: the policy's block lists (``select_blocks_out``), unless verification is dense;
- ``verify``: the target's forward pass over the window through ``sparse_verify_out``, greedy
  acceptance included;
- ``history``: the target's retrieval-head queries over its cache, the next step's signal;
- ``accept``: commit the accepted drafts and the bonus token, roll both caches back.

Plain decoding is the same machinery with ``gamma = 0``: a ``verify`` of one token (dense, the
same kernel) and an ``accept`` that commits it.

Nothing in a phase synchronises with the host: the cache's pages are reserved for the whole
generation before capture (``PagedKVCache.reserve``), a window is appended by raising ``kv_lens``
on the device and writing through the block table (``PagedKVCache.store``), rollback lowers
``kv_lens`` again, and the ops run their out-variants with preallocated outputs and workspaces
and without host-side value checks (``validate=False`` once the first, checked run is done).
On a CPU, or with ``use_graphs=False``, the same phases run as direct calls.

Cache invariant between steps (as in ``dustin.spec``), for a sequence of N committed tokens:
the target's cache holds the first N - 1, the draft's cache is cut back to N - 2 at the start of
each step and re-reads the last two tokens. Sequences that reach ``max_new_tokens`` stay in the
batch (shapes are static) but commit nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dustin import ops
from dustin.cache import PagedKVCache
from dustin.model import Transformer
from dustin.policies import Dense, DraftOnly, Dustin, HistoryOnly, Policy, Streaming, heads_by_layer
from dustin.spec import Prefilled, accept_greedy, score_blocks

__all__ = [
    "FastResult",
    "GraphDecoder",
    "Workspaces",
    "capture",
    "dense_lists",
    "forward_window",
    "streaming_lists",
]

BlockLists = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FastResult:
    """Tokens of a ``GraphDecoder.generate`` run and what they cost.

    ``tokens``: the new tokens of each sequence; ``seconds``: decoding time (capture included
    only if it happened inside the run); ``steps``: verifications (plain: decoding steps);
    ``emitted_per_step``: mean tokens committed per unfinished sequence per step.
    """

    tokens: list[list[int]]
    seconds: float
    steps: int
    emitted_per_step: float

    @property
    def tokens_per_second(self) -> float:
        return sum(map(len, self.tokens)) / self.seconds if self.seconds > 0 else float("nan")


class Workspaces:
    """``sparse_verify_out`` workspaces, one per call shape, shared by the layers that use it."""

    def __init__(self) -> None:
        self._by_shape: dict[tuple, torch.Tensor | None] = {}

    def get(self, q, k_cache, block_table, block_ids, layout) -> torch.Tensor | None:
        key = (
            q.device,
            *map(tuple, (q.shape, k_cache.shape, block_table.shape, block_ids.shape)),
            layout,
        )
        if key not in self._by_shape:
            nbytes = ops.sparse_verify_workspace_bytes(q, k_cache, block_table, block_ids, layout)
            self._by_shape[key] = (
                torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
            )
        return self._by_shape[key]


def dense_lists(cache: PagedKVCache) -> BlockLists:
    """Lists naming every block (dense attention): static ids, counts from ``kv_lens``."""
    ids = torch.arange(cache.max_pages_per_seq, dtype=torch.int32, device=cache.device)
    ids = ids.repeat(cache.batch_size, 1)
    page = cache.page_size

    def lists(kv_lens: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ids, torch.div(kv_lens + (page - 1), page, rounding_mode="floor")

    return lists


def _recency(cache: PagedKVCache) -> torch.Tensor:
    """``[B, NB]`` float32 scores rising with the block id: ``select_blocks`` then keeps the most
    recent blocks (the ``Streaming`` policy's trick)."""
    ranks = torch.arange(cache.max_pages_per_seq, dtype=torch.float32, device=cache.device)
    return ranks.repeat(cache.batch_size, 1)


def streaming_lists(
    cache: PagedKVCache, window_tokens: int, n_sink: int, n_recent: int
) -> BlockLists:
    """StreamingLLM lists: the blocks of the first ``n_sink`` tokens and the most recent blocks,
    ``window_tokens`` in all (rounded up to blocks), computed on the device per call."""
    recency = _recency(cache)
    budget = -(-window_tokens // cache.page_size)
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def lists(kv_lens: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if q_len not in buffers:
            k = ops.select_capacity(
                cache.max_pages_per_seq, budget, n_sink, n_recent, q_len, cache.page_size
            )
            buffers[q_len] = (
                torch.empty(cache.batch_size, k, dtype=torch.int32, device=cache.device),
                torch.empty(cache.batch_size, dtype=torch.int32, device=cache.device),
            )
        ids, counts = buffers[q_len]
        ops.select_blocks_out(
            recency,
            None,
            kv_lens,
            q_len,
            cache.page_size,
            budget,
            n_sink,
            n_recent,
            1.0,
            ids,
            counts,
            validate=False,
        )
        return ids, counts

    return lists


def forward_window(
    model: Transformer,
    cache: PagedKVCache,
    tokens: torch.Tensor,
    lists: BlockLists,
    workspaces: Workspaces,
    record_heads: dict[int, torch.Tensor] | None = None,
    last_only: bool = False,
    validate: bool = False,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward pass of a window of tokens appended to every sequence, without host work.

    Unlike ``Transformer.forward`` the window is appended on the device: ``kv_lens`` is raised by
    n and the new keys and values are written through ``block_table``, whose pages must already
    be reserved (``PagedKVCache.reserve``).

    Args:
        model, cache: the model and its cache (``kv_lens`` excludes the window on entry).
        tokens: ``[B, n]`` int64.
        lists: ``(kv_lens, n) -> (block_ids, block_counts)``, the blocks every layer attends to
            besides the window (computed once per pass, after the append).
        workspaces: ``sparse_verify_out`` workspaces.
        record_heads: layer -> ``[Hs]`` query heads whose queries to return.
        last_only: return the logits of the last position only (``[B, V]``).
        validate: let the ops check tensor values on the host (a sync; never during capture).

    Returns:
        ``(logits, queries)``: logits ``[B, n, V]`` (or ``[B, V]``) float32, ``queries[layer]``
        ``[B, n, Hs, D]``.
    """
    batch, n = tokens.shape
    cache.kv_lens += n
    positions = (cache.kv_lens - n).long()[:, None] + torch.arange(n, device=tokens.device)
    pages = cache.block_table.gather(1, positions // cache.page_size).long().flatten()
    slots = (positions % cache.page_size).flatten()
    block_ids, block_counts = lists(cache.kv_lens, n)
    config = model.config
    out = torch.empty(
        batch, n, config.num_heads, config.head_dim, dtype=model.dtype, device=tokens.device
    )
    lse = torch.empty(batch, n, config.num_heads, dtype=torch.float32, device=tokens.device)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache.store(layer, pages, slots, k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]))
        k_cache, v_cache = cache.k(layer), cache.v(layer)
        ops.sparse_verify_out(
            q,
            k_cache,
            v_cache,
            cache.block_table,
            cache.kv_lens,
            block_ids,
            block_counts,
            model.sm_scale,
            cache.layout,
            out,
            lse,
            workspaces.get(q, k_cache, cache.block_table, block_ids, cache.layout),
            validate=validate,
        )
        return out  # consumed by o_proj before the next layer overwrites it

    h, queries = model.run_layers(tokens, positions, attend, record_heads)
    return model.logits(h[:, -1] if last_only else h), queries


def capture(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` captured as a CUDA graph; returns its replay. Run ``fn`` once eagerly first (on a
    side stream) so lazily created state (cuBLAS handles, workspaces) exists before capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class GraphDecoder:
    """Greedy speculative decoding (or plain decoding) as a few CUDA-graph replays per step.

    Args:
        target, target_cache: the target and its cache (prefilled, or filled by the caller).
        draft, draft_cache: the draft and its cache; None for plain decoding (``gamma`` 0).
        policy: which blocks verification reads (``Dense``, ``Dustin``, ``DraftOnly``,
            ``HistoryOnly``, ``Streaming``); None for plain decoding.
        gamma: drafted tokens per step (1..15), 0 for plain decoding.
        max_new_tokens: tokens per sequence, the first one (from the prefill) included.
        draft_window: None: the draft attends its whole cache; else it attends a StreamingLLM
            window of this many tokens (``draft_sinks`` first tokens plus the most recent ones).
            Its lookahead scores read the full cache either way.
        draft_sinks: sink tokens of the draft's window.
        replay_acceptance: take the accepted draft counts from ``set_acceptance`` instead of
            comparing tokens (benchmarks of random-weight models with a replayed distribution).
        use_graphs: capture the phases as CUDA graphs (default: when the target is on CUDA).

    Raises:
        ValueError: inconsistent models, caches or settings.
        NotImplementedError: a policy the graph path does not know.
    """

    def __init__(
        self,
        target: Transformer,
        target_cache: PagedKVCache,
        draft: Transformer | None = None,
        draft_cache: PagedKVCache | None = None,
        policy: Policy | None = None,
        *,
        gamma: int = 4,
        max_new_tokens: int = 64,
        draft_window: int | None = None,
        draft_sinks: int = 4,
        replay_acceptance: bool = False,
        use_graphs: bool | None = None,
    ) -> None:
        plain = draft is None
        if plain != (draft_cache is None) or plain != (policy is None):
            raise ValueError(
                "GraphDecoder: give draft, draft_cache and policy together, or none of them"
            )
        if plain and gamma != 0:
            raise ValueError(f"GraphDecoder: plain decoding (no draft) needs gamma 0, got {gamma}")
        if not plain and not 1 <= gamma <= 15:
            raise ValueError(
                f"GraphDecoder: gamma must be in [1, 15] (window gamma + 1 <= 16), got {gamma}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"GraphDecoder: max_new_tokens must be >= 1, got {max_new_tokens}")
        if draft_window is not None and (plain or draft_window < 1):
            raise ValueError(
                f"GraphDecoder: draft_window needs a draft and must be >= 1, got {draft_window}"
            )
        if draft_cache is not None and (
            draft_cache.batch_size != target_cache.batch_size
            or draft_cache.page_size != target_cache.page_size
            or draft_cache.device != target_cache.device
        ):
            raise ValueError(
                "GraphDecoder: the draft's cache must match the target's batch size, page size and "
                f"device, got {draft_cache.batch_size}/{draft_cache.page_size}/{draft_cache.device} vs "
                f"{target_cache.batch_size}/{target_cache.page_size}/{target_cache.device}"
            )
        if policy is not None and not isinstance(
            policy, (Dense, Dustin, DraftOnly, HistoryOnly, Streaming)
        ):
            raise NotImplementedError(
                f"GraphDecoder: no graph-safe selection for policy {policy.name!r}"
            )

        self.target, self.tcache, self.draft, self.dcache = target, target_cache, draft, draft_cache
        self.policy, self.gamma, self.max_new_tokens = policy, gamma, max_new_tokens
        self.replay_acceptance = replay_acceptance
        device = self.device = target_cache.device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and device.type != "cuda":
            raise ValueError("GraphDecoder: use_graphs needs the models on a CUDA device")
        self.workspaces = Workspaces()
        self._validate = True  # the first run on CUDA checks op arguments on the host

        batch, num_blocks = target_cache.batch_size, target_cache.max_pages_per_seq
        self.page_size, self.num_blocks = target_cache.page_size, num_blocks
        # Per-step device state. out_tokens' last column takes writes of nothing-to-commit slots.
        self.committed = torch.zeros(batch, dtype=torch.int32, device=device)
        self.generated = torch.zeros(batch, dtype=torch.int32, device=device)
        self.last2 = torch.zeros(batch, 2, dtype=torch.long, device=device)
        self.out_tokens = torch.zeros(
            batch, max_new_tokens + gamma + 2, dtype=torch.long, device=device
        )
        self.drafted = torch.zeros(batch, gamma, dtype=torch.long, device=device)
        self.accepted = torch.zeros(batch, dtype=torch.int32, device=device)
        self.replayed = torch.zeros(batch, dtype=torch.int32, device=device)
        self.bonus = torch.zeros(batch, dtype=torch.long, device=device)
        self.emitted_sum = torch.zeros((), dtype=torch.long, device=device)
        self.active_sum = torch.zeros((), dtype=torch.long, device=device)

        self.draft_heads = heads_by_layer(policy.draft_heads, device) if policy else {}
        self.target_heads = heads_by_layer(policy.target_heads, device) if policy else {}
        if target.parallel is not None:  # each rank records and scores the heads it holds
            self.target_heads = target.parallel.local_heads(self.target_heads)
        self.looked = {
            layer: torch.zeros(
                batch, gamma, len(heads), draft.config.head_dim, dtype=draft.dtype, device=device
            )
            for layer, heads in self.draft_heads.items()
        }
        self.verify_queries: dict[int, torch.Tensor] = {}
        self.lookahead = torch.zeros(batch, num_blocks, dtype=torch.float32, device=device)
        self.history = torch.zeros(batch, num_blocks, dtype=torch.float32, device=device)

        if draft_cache is not None:
            self.draft_lists = (
                dense_lists(draft_cache)
                if draft_window is None
                else streaming_lists(draft_cache, draft_window, draft_sinks, 0)
            )
        self._selection = self._selection_inputs(policy)
        if self._selection is None:
            self.verify_lists = dense_lists(target_cache)
        else:
            budget, n_sink, n_recent = self._budget_args()
            capacity = ops.select_capacity(
                num_blocks, budget, n_sink, n_recent, gamma + 1, self.page_size
            )
            self.block_ids = torch.zeros(batch, capacity, dtype=torch.int32, device=device)
            self.block_counts = torch.zeros(batch, dtype=torch.int32, device=device)
            self.verify_lists = lambda kv_lens, q_len: (self.block_ids, self.block_counts)

        names = ("draft", "lookahead", "select", "verify", "history", "accept")
        wanted = {
            "draft": not plain,
            "lookahead": bool(self.draft_heads),
            "select": self._selection is not None,
            "verify": True,
            "history": bool(policy and policy.target_heads),  # on every tensor-parallel rank
            "accept": True,
        }
        self._phase_fns = {name: getattr(self, f"_{name}") for name in names if wanted[name]}
        self.phases: dict[str, Callable[[], None]] = dict(self._phase_fns)
        self.prepared = False

    # Setup -----------------------------------------------------------------------------------

    def _selection_inputs(self, policy):
        """(first scores, second scores or None, draft share) of ``select_blocks``; None: dense."""
        if policy is None or isinstance(policy, Dense):
            return None
        if isinstance(policy, Dustin):
            return self.lookahead, self.history, policy.draft_share
        if isinstance(policy, DraftOnly):
            return self.lookahead, None, 1.0
        if isinstance(policy, HistoryOnly):
            return self.history, None, 0.0
        return _recency(self.tcache), None, 1.0  # Streaming

    def _budget_args(self) -> tuple[int, int, int]:
        p = self.policy
        return -(-p.budget_tokens // self.page_size), p.n_sink, p.n_recent

    def start(
        self,
        prompt_lens: list[int],
        last_prompt_tokens: torch.Tensor,
        first_tokens: torch.Tensor,
        history: torch.Tensor | None = None,
    ) -> None:
        """Sets the state after the prompts: caches hold ``prompt_lens`` tokens, ``first_tokens``
        is each sequence's first new token. Reserves the caches' pages for the whole generation
        and, on first use, captures the phases (after one checked eager run of a step).

        Args:
            prompt_lens: tokens of each prompt (the caches must hold them).
            last_prompt_tokens, first_tokens: ``[B]`` int64.
            history: ``[B, NB]`` float32 history score before the first verification (policies
                with target retrieval heads; zeros when None).

        Raises:
            CacheFullError: a cache cannot hold the prompt plus ``max_new_tokens`` and the windows.
        """
        if len(prompt_lens) != self.tcache.batch_size:
            raise ValueError(
                f"GraphDecoder.start: prompt_lens has {len(prompt_lens)} entries, the batch is "
                f"{self.tcache.batch_size}"
            )
        if min(prompt_lens) < 2:
            raise ValueError(
                f"GraphDecoder.start: prompts need at least 2 tokens, got {min(prompt_lens)}"
            )
        # Longest a sequence gets: verification of a finished sequence appends 2 * gamma + 1 past
        # max_new_tokens (the bound of DecodeOptions.context_needed).
        reach = [n + self.max_new_tokens + 2 * self.gamma + 1 for n in prompt_lens]
        for cache in (self.tcache, self.dcache):
            if cache is not None:
                cache.reserve(reach)
        lens = torch.tensor(prompt_lens, dtype=torch.int32, device=self.device)
        self.committed.copy_(lens + 1)
        self.generated.fill_(1)
        self.out_tokens.zero_()
        self.out_tokens[:, 0] = first_tokens
        self.last2.copy_(
            torch.stack((last_prompt_tokens.to(self.device), first_tokens.to(self.device)), 1)
        )
        self.tcache.kv_lens.copy_(lens)
        if self.dcache is not None:
            self.dcache.kv_lens.copy_(lens)
        self.history.zero_()
        if history is not None:
            self.history.copy_(history)
        self.emitted_sum.zero_()
        self.active_sum.zero_()
        if self.device.type == "cuda" and not self.prepared:
            self._prepare()

    def start_from(self, state: Prefilled) -> None:
        """``start`` from a prefill (``dustin.spec.prefill``): greedy first token, and the history
        score of the prompt's last target queries, as ``speculative_decode`` does."""
        history = None
        if "history" in self._phase_fns:
            queries = {l: state.target_queries[l][:, :, h] for l, h in self.target_heads.items()}
            history = torch.empty_like(self.history)
            score_blocks(
                self.target, self.tcache, queries, self.target_heads, self.page_size, history, True
            )
        last = torch.tensor([p[-1] for p in state.prompts], dtype=torch.long, device=self.device)
        self.start([len(p) for p in state.prompts], last, state.first_logits.argmax(-1), history)

    def _state(self) -> list[torch.Tensor]:
        tensors = [self.committed, self.generated, self.last2, self.out_tokens, self.history]
        tensors += [self.emitted_sum, self.active_sum, self.tcache.kv_lens]
        return tensors + ([self.dcache.kv_lens] if self.dcache is not None else [])

    def _prepare(self) -> None:
        """One eager step with the ops' host-side value checks, on a side stream (the warm-up a
        capture needs), the state restored; then the phases are captured (with ``use_graphs``).
        Later runs, graphs or direct calls, skip the checks: they would sync every op."""
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for fn in self._phase_fns.values():
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for tensor, value in zip(self._state(), saved):
            tensor.copy_(value)
        self._validate = False
        if self.use_graphs:
            self.phases = {name: capture(fn) for name, fn in self._phase_fns.items()}
        self.prepared = True

    # Running ---------------------------------------------------------------------------------

    def set_acceptance(self, accepted: torch.Tensor) -> None:
        """Accepted draft counts ``[B]`` (0..gamma) for the next step (``replay_acceptance``)."""
        self.replayed.copy_(accepted)

    def step(self) -> None:
        """One step: every phase in order (graph replays, or direct calls)."""
        for run in self.phases.values():
            run()

    def generate(self) -> FastResult:
        """Steps until every sequence has ``max_new_tokens`` (one host read per step), then
        hands the caches' lengths back to the host bookkeeping."""
        if self.replay_acceptance:
            raise ValueError(
                "GraphDecoder.generate: replayed acceptance gives no real tokens; use step()"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start, steps = time.perf_counter(), 0
        while int(self.generated.min()) < self.max_new_tokens:
            self.step()
            steps += 1
        seconds = time.perf_counter() - start
        self.tcache.pull_lens()
        if self.dcache is not None:
            self.dcache.kv_lens.copy_(self.committed - 2)
            self.dcache.pull_lens()
        emitted = float(self.emitted_sum) / max(int(self.active_sum), 1)
        return FastResult(
            self.out_tokens[:, : self.max_new_tokens].tolist(), seconds, steps, emitted
        )

    # Phases (each touches only static buffers) -------------------------------------------------

    def _draft(self) -> None:
        cache = self.dcache
        cache.kv_lens.copy_(self.committed - 2)
        window = self.last2
        for i in range(self.gamma):
            logits, queries = forward_window(
                self.draft,
                cache,
                window,
                self.draft_lists,
                self.workspaces,
                self.draft_heads,
                last_only=True,
                validate=self._validate,
            )
            token = logits.argmax(-1)
            self.drafted[:, i] = token
            for layer, q in queries.items():
                self.looked[layer][:, i] = q[:, -1]
            window = token[:, None]

    def _lookahead(self) -> None:
        score_blocks(
            self.draft,
            self.dcache,
            self.looked,
            self.draft_heads,
            self.page_size,
            self.lookahead,
            self._validate,
        )

    def _select(self) -> None:
        first, second, share = self._selection
        budget, n_sink, n_recent = self._budget_args()
        ops.select_blocks_out(
            first,
            second,
            self.tcache.kv_lens + (self.gamma + 1),
            self.gamma + 1,
            self.page_size,
            budget,
            n_sink,
            n_recent,
            share,
            self.block_ids,
            self.block_counts,
            validate=self._validate,
        )

    def _verify(self) -> None:
        window = torch.cat((self.last2[:, 1:], self.drafted), 1)
        logits, queries = forward_window(
            self.target,
            self.tcache,
            window,
            self.verify_lists,
            self.workspaces,
            self.target_heads,
            validate=self._validate,
        )
        accepted, bonus = accept_greedy(logits, self.drafted)
        self.accepted.copy_(accepted)
        self.bonus.copy_(bonus)
        for layer, q in queries.items():
            if layer not in self.verify_queries:
                self.verify_queries[layer] = torch.empty_like(q)
            self.verify_queries[layer].copy_(q)

    def _history(self) -> None:
        score_blocks(
            self.target,
            self.tcache,
            self.verify_queries,
            self.target_heads,
            self.page_size,
            self.history,
            self._validate,
        )

    def _accept(self) -> None:
        accepted = self.replayed if self.replay_acceptance else self.accepted
        active = self.generated < self.max_new_tokens
        count = torch.where(active, accepted + 1, 0)  # tokens committed: accepted drafts + bonus
        cols = torch.arange(self.gamma + 1, device=self.device)
        drafted = torch.cat((self.drafted, self.bonus[:, None]), 1)
        emitted = torch.where(cols < accepted[:, None], drafted, self.bonus[:, None])
        trash = self.out_tokens.shape[1] - 1
        dest = torch.where(cols < count[:, None], self.generated[:, None] + cols, trash)
        self.out_tokens.scatter_(1, dest.long(), emitted)
        # Last two committed tokens: [old two, emitted...] at positions count and count + 1.
        recent = torch.cat((self.last2, emitted), 1)
        self.last2.copy_(recent.gather(1, torch.stack((count, count + 1), 1).long()))
        self.committed += count
        self.generated += count
        self.emitted_sum += count.sum()
        self.active_sum += active.sum()
        self.tcache.kv_lens.copy_(self.committed - 1)
