# SPDX-License-Identifier: Apache-2.0
"""Speculative decoding with sparse verification, batched, plus plain autoregressive decoding.

One speculative step, per batch of sequences (each with its own length):

1. the draft proposes ``gamma`` tokens, keeping its queries on its retrieval heads;
2. lookahead score: those queries' attention over the draft's cache (``block_scores``);
3. the policy selects the blocks the target reads (``select_blocks``, or all of them);
4. the target verifies the window (the last emitted token plus the drafts) with
   ``sparse_verify`` in every layer, keeping its queries on its retrieval heads;
5. history score for the next step: those queries' attention over the target's cache (before
   the first verification: the queries of the prompt's last positions);
6. accept by greedy match or by rejection sampling, emit the bonus token, roll both caches back.

Cache invariant between steps, for a sequence of N committed tokens (prompt + generated): the
target's cache holds the first N - 1 of them (the last one is the next window's first token);
the draft's cache is cut back to N - 2 at the start of each step and re-reads the last two
tokens, so every sequence drafts with a two-token first window however many tokens it accepted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dustin import ops
from dustin.cache import CacheFullError, PagedKVCache
from dustin.model import Transformer
from dustin.policies import Policy, Signals, heads_by_layer

__all__ = [
    "DecodeOptions",
    "DecodeResult",
    "Prefilled",
    "accept_by_sampling",
    "accept_greedy",
    "autoregressive_decode",
    "prefill",
    "score_blocks",
    "speculative_decode",
]


@dataclass(frozen=True)
class DecodeOptions:
    """Settings shared by every decoding method.

    ``max_new_tokens`` per sequence; ``gamma`` drafted tokens per step (1..15: the window of
    gamma + 1 tokens must fit the ops' 16); ``temperature`` 0 is greedy, otherwise sampling with
    rejection-sampling acceptance; ``seed`` of the sampler; ``eos_token_id`` ends a sequence
    early (None: never); ``history_window`` prompt positions whose target queries give the
    history score before the first verification.
    """

    max_new_tokens: int = 64
    gamma: int = 4
    temperature: float = 0.0
    seed: int = 0
    eos_token_id: int | None = None
    history_window: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 1 <= self.gamma <= 15:
            raise ValueError(f"gamma must be in [1, 15] (window gamma + 1 <= 16), got {self.gamma}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.history_window < 1:
            raise ValueError(f"history_window must be >= 1, got {self.history_window}")

    def context_needed(self, prompt_len: int) -> int:
        """Cache length a sequence can reach: finished sequences idle in the batch with a
        verification window appended, so allow two windows past the last new token."""
        return prompt_len + self.max_new_tokens + 2 * self.gamma + 1


@dataclass
class DecodeResult:
    """What one decoding method produced and what it cost.

    ``tokens``: the new tokens of each sequence; ``seconds``: decoding time (prefill excluded);
    ``verifications``: target forward passes; ``emitted_per_verification``: mean tokens
    committed per sequence per verification (accepted drafts + the bonus token);
    ``kv_read_share``: mean share of the target's KV blocks read per verification.
    """

    tokens: list[list[int]]
    seconds: float
    verifications: int
    emitted_per_verification: float
    kv_read_share: float

    @property
    def tokens_per_second(self) -> float:
        return sum(map(len, self.tokens)) / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Prefilled:
    """Caches after the prompts, reusable by several decoding methods through ``fork``.

    ``first_logits`` ``[B, V]``: the target's next-token logits after each prompt;
    ``target_queries``: layer -> ``[B, n, Hq, D]`` the target's queries (all heads) at the last
    n prompt positions, the history signal before the first verification.
    """

    prompts: list[list[int]]
    target_cache: PagedKVCache
    draft_cache: PagedKVCache | None
    first_logits: torch.Tensor
    target_queries: dict[int, torch.Tensor]
    seconds: float = 0.0

    def fork(self) -> Prefilled:
        """A copy whose caches can be decoded into without touching these."""
        draft = None if self.draft_cache is None else self.draft_cache.clone()
        return Prefilled(
            self.prompts,
            self.target_cache.clone(),
            draft,
            self.first_logits,
            self.target_queries,
            self.seconds,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(
    target: Transformer,
    draft: Transformer | None,
    prompts: list[list[int]],
    options: DecodeOptions,
    *,
    page_size: int = 16,
    layout: str = "HND",
    chunk_size: int = 4096,
    token_budget: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Prefilled:
    """Runs the prompts through the target (and the draft) into fresh caches.

    Caches are sized from the prompts and ``options`` (``DecodeOptions.context_needed``), so a
    request that cannot fit fails here, before any work.

    Args:
        target, draft: the models (draft None for plain decoding only).
        prompts: token ids per sequence (lengths may differ).
        options: decoding settings (sizes the caches).
        page_size, layout: of both caches.
        chunk_size: prefill chunk length.
        token_budget: KV tokens each cache may hold over all sequences (memory sized up front);
            None sizes the caches to this request.
        progress: called with the number of tokens done after each chunk (both models).

    Raises:
        ValueError: empty prompts, or a prompt too long for a model's context.
        CacheFullError: the request needs more than ``token_budget``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    max_len = max(options.context_needed(len(p)) for p in prompts)
    for model, role in ((target, "target"), (draft, "draft")):
        if model is not None and max_len > model.config.max_position_embeddings:
            raise ValueError(
                f"the longest prompt ({max(map(len, prompts))} tokens) plus max_new_tokens "
                f"({options.max_new_tokens}) and two windows of gamma + 1 needs {max_len} positions, "
                f"more than the {role}'s context ({model.config.max_position_embeddings})"
            )
    budget = sum(-(-options.context_needed(len(p)) // page_size) * page_size for p in prompts)
    if token_budget is not None:
        if budget > token_budget:
            raise CacheFullError(
                f"the request needs a KV cache of {budget} tokens ({len(prompts)} prompts of up to "
                f"{max(map(len, prompts))} tokens, {options.max_new_tokens} new tokens and two "
                f"windows each, in whole pages of {page_size}), the token_budget is {token_budget}"
            )
        budget = token_budget
    record_last = min(options.history_window, min(map(len, prompts)))
    all_heads = torch.arange(target.config.num_heads, device=target.device)
    every_layer = {layer: all_heads for layer in range(target.config.num_layers)}

    _sync(target.device)
    start = time.perf_counter()
    target_cache = target.new_cache(
        len(prompts), max_len, token_budget=budget, page_size=page_size, layout=layout
    )
    draft_cache = None
    if draft is not None:
        draft_cache = draft.new_cache(
            len(prompts), max_len, token_budget=budget, page_size=page_size, layout=layout
        )
    first_logits, queries = [], {}
    for seq, prompt in enumerate(prompts):
        tokens = torch.tensor(prompt, dtype=torch.long)
        logits, recorded = target.prefill(
            tokens,
            target_cache,
            seq,
            chunk_size=chunk_size,
            record_heads=every_layer,
            record_last=record_last,
            progress=progress,
        )
        first_logits.append(logits)
        for layer, q in recorded.items():
            queries.setdefault(layer, []).append(q)
        if draft is not None:
            draft.prefill(tokens, draft_cache, seq, chunk_size=chunk_size, progress=progress)
    _sync(target.device)
    return Prefilled(
        [list(p) for p in prompts],
        target_cache,
        draft_cache,
        torch.stack(first_logits),
        {layer: torch.stack(q) for layer, q in queries.items()},
        time.perf_counter() - start,
    )


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator):
    """Next tokens ``[...]`` from logits ``[..., V]``, and their distribution (None if greedy)."""
    if temperature == 0.0:
        return logits.argmax(-1), None
    probs = torch.softmax(logits / temperature, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.reshape(probs.shape[:-1]), probs


def accept_greedy(
    target_logits: torch.Tensor, drafted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance: drafts are kept while they equal the target's argmax.

    Args:
        target_logits: ``[B, gamma + 1, V]`` the verifier's logits at the window positions.
        drafted: ``[B, gamma]`` drafted tokens.

    Returns:
        ``(accepted [B], next_token [B])``: drafts kept, and the target's token after them.
    """
    best = target_logits.argmax(-1)
    accepted = (best[:, :-1] == drafted).int().cumprod(1).sum(1)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


def accept_by_sampling(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafted: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling (Leviathan et al.; Chen et al.): emitted tokens follow the verifier.

    Draft i is kept with probability ``min(1, p_i(d) / q_i(d))``; at the first rejection the next
    token is drawn from ``max(0, p_i - q_i)`` renormalised; when all are kept, from ``p_gamma``.

    Args:
        target_probs: ``[B, gamma + 1, V]`` the verifier's distributions at the window positions.
        draft_probs: ``[B, gamma, V]`` the distributions the drafts were drawn from.
        drafted: ``[B, gamma]`` drafted tokens.
        generator: random source (on the tensors' device).

    Returns:
        ``(accepted [B], next_token [B])``.
    """
    batch, gamma = drafted.shape
    p = target_probs[:, :gamma].gather(2, drafted[..., None])[..., 0]
    q = draft_probs.gather(2, drafted[..., None])[..., 0]
    u = torch.rand(batch, gamma, generator=generator, device=drafted.device)
    accepted = (u * q < p).int().cumprod(1).sum(1)
    # Past the last draft q is zero, so the "residual" there is the bonus distribution p_gamma.
    q_padded = torch.cat((draft_probs, torch.zeros_like(draft_probs[:, :1])), dim=1)
    rows = torch.arange(batch, device=drafted.device)
    residual = (target_probs[rows, accepted] - q_padded[rows, accepted]).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # p == q exactly leaves no residual mass; a rejection then has probability 0, keep p.
    residual = torch.where(
        total > 0, residual / total.clamp_min(1e-30), target_probs[rows, accepted]
    )
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


class _Progress:
    """Per-sequence bookkeeping of generated tokens and when each sequence is done."""

    def __init__(self, prompts: list[list[int]], options: DecodeOptions) -> None:
        self.seqs = [list(p) for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.options = options
        self.done = [False] * len(prompts)

    def commit(self, seq: int, tokens: list[int]) -> None:
        if self.done[seq]:
            return
        self.seqs[seq] += tokens
        new = self.seqs[seq][self.prompt_lens[seq] :]
        eos = self.options.eos_token_id
        if len(new) >= self.options.max_new_tokens or (eos is not None and eos in new):
            self.done[seq] = True

    def new_tokens(self) -> list[list[int]]:
        out = []
        for seq, prompt_len in zip(self.seqs, self.prompt_lens):
            new = seq[prompt_len:][: self.options.max_new_tokens]
            eos = self.options.eos_token_id
            if eos is not None and eos in new:
                new = new[: new.index(eos) + 1]
            out.append(new)
        return out


def score_blocks(
    model: Transformer,
    cache: PagedKVCache,
    queries: dict[int, torch.Tensor],
    heads: dict[int, torch.Tensor],
    block_size: int,
    scores: torch.Tensor,
    validate: bool = True,
) -> None:
    """Sets ``scores`` ``[B, NB]`` float32 to the retrieval heads' attention over ``cache``
    summed into blocks (``block_scores`` per layer, accumulated), in place so a captured CUDA
    graph can reuse the buffer; value checks on the host only when ``validate``.

    ``heads`` are the model's own (local) query heads; under tensor parallelism every rank must
    call this, with or without heads, as the ranks' scores are summed.
    """
    scores.zero_()
    group = model.config.num_heads // model.config.num_kv_heads
    for layer, head_ids in heads.items():
        ops.block_scores(
            queries[layer].contiguous(),
            cache.k(layer),
            cache.block_table,
            cache.kv_lens,
            (head_ids // group).to(torch.int32),
            model.sm_scale,
            block_size,
            cache.layout,
            scores,
            validate=validate,
        )
    if model.parallel is not None:  # each rank scored the heads it holds (possibly none)
        model.parallel.all_reduce(scores)


def _block_scores(
    model: Transformer,
    cache: PagedKVCache,
    queries: dict[int, torch.Tensor],
    heads,
    block_size: int,
    num_blocks: int,
) -> torch.Tensor:
    """``score_blocks`` into a new ``[B, NB]`` float32 tensor."""
    scores = torch.empty(cache.batch_size, num_blocks, dtype=torch.float32, device=model.device)
    score_blocks(model, cache, queries, heads, block_size, scores)
    return scores


def _kv_read_share(selection, kv_lens: torch.Tensor, q_len: int, page_size: int) -> float:
    """Share of the KV blocks one verification reads (listed blocks plus the window's)."""
    if selection is None:
        return 1.0
    num_blocks = (kv_lens + page_size - 1) // page_size
    first_window = (kv_lens - q_len) // page_size
    ids, counts = selection.block_ids, selection.block_counts
    if ids.dim() == 2:
        ids, counts = ids[:, None], counts[:, None]
    slot = torch.arange(ids.shape[-1], device=ids.device)
    listed = ((slot < counts[..., None]) & (ids < first_window[:, None, None])).sum(-1)
    read = listed.float().mean(1) + (num_blocks - first_window)
    return float(read.sum() / num_blocks.sum())


def speculative_decode(
    target: Transformer,
    draft: Transformer,
    state: Prefilled,
    policy: Policy,
    options: DecodeOptions,
    progress: Callable[[int], None] | None = None,
) -> DecodeResult:
    """Decodes every prompt of ``state`` speculatively, verifying with ``policy``'s blocks.

    The caches of ``state`` are used in place: pass ``state.fork()`` to keep them.

    Args:
        target, draft: the models ``state`` was prefilled with.
        state: the prefilled prompts.
        policy: chooses the blocks each verification reads.
        options: decoding settings; ``options.gamma`` drafts per step.
        progress: called with the number of new tokens committed after each step.

    Returns:
        The new tokens and the costs (``DecodeResult``).
    """
    if state.draft_cache is None:
        raise ValueError("speculative_decode: state was prefilled without a draft model")
    tcache, dcache = state.target_cache, state.draft_cache
    budget = getattr(policy, "budget_tokens", 0)
    if budget > tcache.max_seq_len:
        raise ValueError(
            f"the {policy.name} policy's budget ({budget} tokens) is larger than the context "
            f"({tcache.max_seq_len} tokens); at most the context can be read"
        )
    gamma, page_size, device = options.gamma, tcache.page_size, target.device
    num_blocks = tcache.max_pages_per_seq
    # Pairs may differ in embedding rows past the shared tokenizer (Qwen2.5-0.5B has 151,936,
    # -7B 152,064; dustin.checkpoint.check_compatible checks the tokens): draw from shared ids.
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    generator = torch.Generator(device).manual_seed(options.seed)
    draft_heads = heads_by_layer(policy.draft_heads, device)
    target_heads = heads_by_layer(policy.target_heads, device)
    if target.parallel is not None:  # each rank records and scores the heads it holds
        target_heads = target.parallel.local_heads(target_heads)
    tracker = _Progress(state.prompts, options)

    _sync(device)
    start = time.perf_counter()
    first, _ = _sample(state.first_logits[:, :vocab], options.temperature, generator)
    for seq, token in enumerate(first.tolist()):
        tracker.commit(seq, [token])
    if progress is not None:
        progress(len(state.prompts))
    history = None
    if policy.target_heads:
        prompt_queries = {l: state.target_queries[l][:, :, h] for l, h in target_heads.items()}
        history = _block_scores(target, tcache, prompt_queries, target_heads, page_size, num_blocks)

    verifications, emitted, read_share = 0, [], []
    while not all(tracker.done):
        lens = [len(s) for s in tracker.seqs]
        # 1. Draft gamma tokens; the first window re-reads the last two committed tokens.
        dcache.truncate([n - 2 for n in lens])
        window = torch.tensor([s[-2:] for s in tracker.seqs], device=device)
        drafted, draft_probs, looked = [], [], {}
        for _ in range(gamma):
            logits, queries = draft.forward(
                window, dcache, record_heads=draft_heads, last_logits_only=True
            )
            token, probs = _sample(logits[:, -1, :vocab], options.temperature, generator)
            drafted.append(token)
            draft_probs.append(probs)
            for layer, q in queries.items():
                looked.setdefault(layer, []).append(q[:, -1:])
            window = token[:, None]
        drafted = torch.stack(drafted, dim=1)  # [B, gamma]

        # 2-3. Score and select the blocks the target reads.
        lookahead = None
        if draft_heads:
            looked = {layer: torch.cat(q, dim=1) for layer, q in looked.items()}
            lookahead = _block_scores(draft, dcache, looked, draft_heads, page_size, num_blocks)
        kv_after = tcache.kv_lens + (gamma + 1)
        selection = policy.select(Signals(lookahead, history), kv_after, gamma + 1, page_size)
        read_share.append(_kv_read_share(selection, kv_after, gamma + 1, page_size))

        # 4-5. Verify the window; its queries on the retrieval heads give the next history.
        window = torch.cat(
            (torch.tensor([s[-1] for s in tracker.seqs], device=device)[:, None], drafted), 1
        )
        logits, queries = target.forward(window, tcache, selection, record_heads=target_heads)
        logits = logits[..., :vocab]
        verifications += 1
        if policy.target_heads:
            history = _block_scores(target, tcache, queries, target_heads, page_size, num_blocks)

        # 6. Accept, emit the bonus token, roll both caches back to the committed tokens.
        if options.temperature == 0.0:
            accepted, bonus = accept_greedy(logits, drafted)
        else:
            target_probs = torch.softmax(logits / options.temperature, dim=-1)
            accepted, bonus = accept_by_sampling(
                target_probs, torch.stack(draft_probs, 1), drafted, generator
            )
        before = sum(map(len, tracker.new_tokens()))
        for seq, (a, extra, row) in enumerate(
            zip(accepted.tolist(), bonus.tolist(), drafted.tolist())
        ):
            if not tracker.done[seq]:
                emitted.append(a + 1)
            tracker.commit(seq, row[:a] + [extra])
        tcache.truncate([len(s) - 1 for s in tracker.seqs])
        dcache.truncate([min(n, len(s) - 2) for n, s in zip(dcache.lens, tracker.seqs)])
        if progress is not None:
            progress(sum(map(len, tracker.new_tokens())) - before)
    _sync(device)
    return DecodeResult(
        tracker.new_tokens(),
        time.perf_counter() - start,
        verifications,
        sum(emitted) / max(len(emitted), 1),
        sum(read_share) / max(len(read_share), 1),
    )


def autoregressive_decode(
    target: Transformer,
    state: Prefilled,
    options: DecodeOptions,
    progress: Callable[[int], None] | None = None,
) -> DecodeResult:
    """Plain decoding of the target, one token per step (dense ``sparse_verify``, q = 1).

    The target cache of ``state`` is used in place: pass ``state.fork()`` to keep it.
    """
    tcache, device = state.target_cache, target.device
    generator = torch.Generator(device).manual_seed(options.seed)
    tracker = _Progress(state.prompts, options)

    _sync(device)
    start = time.perf_counter()
    token, _ = _sample(state.first_logits, options.temperature, generator)
    steps = 0
    while True:
        before = sum(map(len, tracker.new_tokens()))
        for seq, t in enumerate(token.tolist()):
            tracker.commit(seq, [t])
        if progress is not None:
            progress(sum(map(len, tracker.new_tokens())) - before)
        if all(tracker.done):
            break
        logits, _ = target.forward(token[:, None], tcache)
        token, _ = _sample(logits[:, -1], options.temperature, generator)
        steps += 1
    _sync(device)
    return DecodeResult(tracker.new_tokens(), time.perf_counter() - start, steps, 1.0, 1.0)
