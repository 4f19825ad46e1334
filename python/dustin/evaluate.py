# SPDX-License-Identifier: Apache-2.0
"""Quality of sparse verification on real text: acceptance, agreement, perplexity and recall.

Windows are cut from inside the bundled long texts; each is prefilled once (and stored on disk,
so later runs and other block sizes reuse it) and then measured two ways:

- teacher-forced (``teacher_forced``): the context advances along the real text, densely, so
  every policy sees the same contexts and the same drafts; each step the draft proposes
  ``gamma`` tokens greedily, every policy verifies them (one row) and the real continuation
  (a second row, for perplexity) with its own selection, and a dense pass gives the reference
  acceptance, the reference greedy tokens and the target's true attention mass;
- free-running (``free_running``): the engine's own loop (``dustin.spec.speculative_decode``)
  from copies of the prefill, greedy, compared token for token with dense verification.

Metrics (per policy, budget and block size): mean accepted length (tokens per verification,
accepted drafts plus the bonus token, as in the paper), acceptance rate (accepted / gamma),
retention (accepted length / dense's), top-1 agreement with dense, perplexity of the real text,
recall of the target's true attention mass (all layers, heads and window queries) by the
attended set, and the share of KV blocks read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dustin import ops
from dustin.cache import PagedKVCache
from dustin.model import BlockSelection, Transformer
from dustin.policies import Dense, Policy, Quest, Signals, heads_by_layer
from dustin.quality_metrics import (
    Tally,
    attended_mask,
    attention_recall,
    per_head_block_scores,
    token_nll,
    true_attention_mass,
)
from dustin.spec import (
    DecodeOptions,
    Prefilled,
    _block_scores,
    _kv_read_share,
    accept_greedy,
    speculative_decode,
)
from dustin.texts import load_text

__all__ = [
    "PrefilledWindow",
    "Variant",
    "Window",
    "build_cache",
    "cut_windows",
    "forward_per_layer",
    "free_running",
    "load_pair",
    "prefill_window",
    "teacher_forced",
]

HISTORY_WINDOW = 16  # prompt positions whose target queries score history before the first step


@dataclass(frozen=True)
class Window:
    """``context`` prompt tokens followed by the real continuation, cut from ``text``."""

    text: str
    start: int  # token offset in the text
    context: int
    tokens: tuple[int, ...]

    @property
    def prompt(self) -> list[int]:
        return list(self.tokens[: self.context])


def cut_windows(
    tokenizer, texts: Sequence[str], context: int, continuation: int, per_text: int = 1
) -> list[Window]:
    """Windows of ``context + continuation`` tokens from inside each named bundled text.

    Window i of n starts at the fraction (i + 1) / (n + 2) of the text, past the front matter
    and independent of the lengths asked for, so stored prefills of a prompt are found again.

    Raises:
        ValueError: a text is too short for the windows asked for.
    """
    if per_text < 1:
        raise ValueError(f"cut_windows: per_text must be >= 1, got {per_text}")
    windows = []
    length = context + continuation
    for name in texts:
        ids = tokenizer.encode(load_text(name)).ids
        for i in range(per_text):
            start = len(ids) * (i + 1) // (per_text + 2)
            if start + length > len(ids):
                raise ValueError(
                    f"text {name!r} has {len(ids)} tokens; window {i} of {per_text} starts at {start} "
                    f"and needs {length} (context {context} + continuation {continuation})"
                )
            windows.append(Window(name, start, context, tuple(ids[start : start + length])))
    return windows


@dataclass
class PrefilledWindow:
    """One window's prompt run through both models: per-layer keys/values ``[Hkv, N, D]``, the
    target's last logits ``[V]`` and its queries (all heads) at the last prompt positions
    (layer -> ``[n, Hq, D]``)."""

    window: Window
    target_kv: list[tuple[torch.Tensor, torch.Tensor]]
    draft_kv: list[tuple[torch.Tensor, torch.Tensor]]
    first_logits: torch.Tensor
    target_queries: dict[int, torch.Tensor]


def load_pair(
    target_path: Path, draft_path: Path, dtype: torch.dtype, device: str, progress: bool = False
):
    """``(target, draft, tokenizer, model_key)`` of two checkpoints with one tokenizer.

    Raises:
        CheckpointError: a checkpoint is unreadable or the two do not share a tokenizer.
    """
    from dustin.checkpoint import check_compatible, load_checkpoint

    models = []
    for path in (Path(target_path), Path(draft_path)):
        config, state_dict, tokenizer = load_checkpoint(path, dtype=dtype, progress=progress)
        models.append(
            (Transformer.from_state_dict(config, state_dict, dtype=dtype, device=device), tokenizer)
        )
        del state_dict
    (target, target_tok), (draft, draft_tok) = models
    check_compatible(draft.config, draft_tok, target.config, target_tok)
    key = ";".join(f"{p.name}:{p.stat().st_size}" for p in (Path(target_path), Path(draft_path)))
    return target, draft, target_tok, key


def _prefill_one(model: Transformer, prompt: torch.Tensor, record: bool, progress) -> tuple:
    cache = model.new_cache(1, prompt.numel(), page_size=16)
    heads = torch.arange(model.config.num_heads, device=model.device)
    every_layer = {layer: heads for layer in range(model.config.num_layers)} if record else None
    logits, queries = model.prefill(
        prompt,
        cache,
        0,
        chunk_size=2048,  # bounds the attention matrix of an 8k prefill on a small machine
        record_heads=every_layer,
        record_last=HISTORY_WINDOW if record else 0,
        progress=progress,
    )
    kv = [cache.gather(layer, 0) for layer in range(model.config.num_layers)]
    return kv, logits, queries


def prefill_window(
    target: Transformer,
    draft: Transformer,
    window: Window,
    store: Path | None = None,
    model_key: str = "",
    progress: bool = False,
) -> PrefilledWindow:
    """Prefills the window's prompt through both models, or loads the stored result.

    Args:
        store: directory of stored prefills (None: do not store); entries are keyed by
            ``model_key`` (which checkpoints and dtype), the text, offset and tokens.
    """
    key = (model_key, str(target.dtype), window.text, window.start, window.prompt)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
    path = (
        None
        if store is None
        else Path(store) / f"{window.text}-{window.start}-{window.context}-{digest}.pt"
    )
    if path is not None and path.is_file():
        saved = torch.load(path, map_location=target.device, weights_only=True)
        return PrefilledWindow(
            window,
            saved["target_kv"],
            saved["draft_kv"],
            saved["first_logits"],
            saved["target_queries"],
        )
    prompt = torch.tensor(window.prompt, dtype=torch.long)
    with tqdm(
        total=2 * prompt.numel(),
        unit="tok",
        desc=f"prefill {window.text}@{window.start}",
        disable=not progress,
    ) as bar:
        target_kv, logits, queries = _prefill_one(target, prompt, True, bar.update)
        draft_kv, _, _ = _prefill_one(draft, prompt, False, bar.update)
    done = PrefilledWindow(window, target_kv, draft_kv, logits, queries)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        torch.save(
            {
                "target_kv": target_kv,
                "draft_kv": draft_kv,
                "first_logits": logits,
                "target_queries": queries,
            },
            partial,
        )
        partial.replace(path)  # a stored prefill is whole or absent
    return done


def build_cache(
    model: Transformer,
    rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]],
    page_size: int,
    max_seq_len: int,
) -> PagedKVCache:
    """A cache of ``len(rows)`` sequences holding the given per-layer keys/values, any page size."""
    pages_per_seq = -(-max_seq_len // page_size)
    cache = model.new_cache(
        len(rows),
        max_seq_len,
        token_budget=len(rows) * pages_per_seq * page_size,
        page_size=page_size,
    )
    for seq, kv in enumerate(rows):
        cache.append(kv[0][0].shape[1], [seq])
        for layer, (k, v) in enumerate(kv):
            cache.write(layer, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    return cache


@torch.inference_mode()
def forward_per_layer(
    model: Transformer, tokens: torch.Tensor, cache: PagedKVCache, policy: Quest
) -> tuple[torch.Tensor, list[BlockSelection]]:
    """``Transformer.forward`` with a selection made inside every layer (``Quest.select_layer``).

    Returns:
        ``(logits [B, n, V], selections)``, one ``[B, Hkv, K]`` selection per layer.
    """
    n = tokens.shape[1]
    starts = cache.append(n)
    positions = torch.tensor(starts, device=model.device)[:, None] + torch.arange(
        n, device=model.device
    )
    chosen = []

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache.write(layer, k, v)
        selection = policy.select_layer(
            q, cache.k(layer), cache.block_table, cache.kv_lens, cache.page_size, cache.layout
        )
        chosen.append(selection)
        out, _ = ops.sparse_verify(
            q.contiguous(),
            cache.k(layer),
            cache.v(layer),
            cache.block_table,
            cache.kv_lens,
            selection.block_ids,
            selection.block_counts,
            model.sm_scale,
            cache.layout,
        )
        return out

    h, _ = model.run_layers(tokens, positions, attend, None)
    return model.logits(h), chosen


@dataclass(frozen=True)
class Variant:
    """One measured configuration: a label, its policy and the block (= page) size."""

    label: str
    policy: Policy
    page_size: int


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Per-window tensor -> per-row (each window has a draft row and a real-text row)."""
    return x.repeat_interleave(2, dim=0)


def _copy_tail(
    src: PagedKVCache, src_seq: int, dst: PagedKVCache, dst_seqs: list[int], n: int
) -> None:
    """Appends the last ``n`` tokens of ``src``'s sequence to each of ``dst``'s sequences."""
    dst.append(n, dst_seqs)
    for layer in range(src.num_layers):
        k, v = src.gather(layer, src_seq)
        k, v = k[:, -n:].transpose(0, 1), v[:, -n:].transpose(0, 1)
        dst.write(layer, k.expand(len(dst_seqs), *k.shape), v.expand(len(dst_seqs), *v.shape))


@dataclass
class TeacherForcedResult:
    """Per-variant summaries plus, when asked for, the per-head data calibration ranks heads by."""

    summaries: dict[str, dict]
    dense: dict
    head_data: list[dict] = field(default_factory=list)


@torch.inference_mode()
def teacher_forced(
    target: Transformer,
    draft: Transformer,
    windows: Sequence[PrefilledWindow],
    variants: Sequence[Variant],
    gamma: int = 4,
    steps: int = 16,
    head_data_page_size: int | None = None,
    progress: bool = False,
) -> TeacherForcedResult:
    """Teacher-forced verification of greedy drafts along the real continuations.

    Args:
        windows: prefilled windows of one context length, each with at least
            ``steps * (gamma + 1) + 1`` continuation tokens.
        variants: what to measure; the dense reference is always measured.
        gamma: drafts per step (1..15).
        steps: verifications per window.
        head_data_page_size: when set, also record per step every head's lookahead (draft) and
            history (target) block scores at this block size with the true attention mass per
            block, for calibration.

    Returns:
        Summaries per variant label and of dense (``Tally.summary``).
    """
    if not windows:
        raise ValueError("teacher_forced: windows must not be empty")
    context = windows[0].window.context
    if any(w.window.context != context for w in windows):
        raise ValueError("teacher_forced: windows must share one context length")
    needed = steps * (gamma + 1) + 1
    short = [w.window.text for w in windows if len(w.window.tokens) - context < needed]
    if short:
        raise ValueError(
            f"teacher_forced: {steps} steps of gamma {gamma} need {needed} continuation tokens; too few in {short}"
        )
    if not 1 <= gamma <= 15:
        raise ValueError(f"teacher_forced: gamma must be in [1, 15], got {gamma}")
    device = target.device
    # Pairs may differ in embedding rows past their shared tokenizer: draft and score shared ids.
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    text = torch.tensor([w.window.tokens for w in windows], device=device)  # [W, len]
    num_windows, q_len = len(windows), gamma + 1
    max_len = context + needed + q_len
    page_sizes = sorted({v.page_size for v in variants} | {head_data_page_size or 16})
    caches = {
        p: build_cache(target, [w.target_kv for w in windows for _ in (0, 1)], p, max_len)
        for p in page_sizes
    }
    reference = caches[page_sizes[0]]
    dcache = build_cache(draft, [w.draft_kv for w in windows], 16, max_len)
    every_target = {
        l: torch.arange(target.config.num_heads, device=device)
        for l in range(target.config.num_layers)
    }
    every_draft = {
        l: torch.arange(draft.config.num_heads, device=device)
        for l in range(draft.config.num_layers)
    }
    prompt_queries = {
        l: _rows(torch.stack([w.target_queries[l] for w in windows])) for l in every_target
    }

    def history_of(queries, heads, page_size):
        """History scores from the retrieval heads' queries (layer -> ``[2W, n, Hs, D]``)."""
        if not heads:
            return None
        cache = caches[page_size]
        scores = _block_scores(target, cache, queries, heads, page_size, cache.max_pages_per_seq)
        return _rows(scores[::2])  # the draft row's history serves the real-text row too

    target_heads = {v.label: heads_by_layer(v.policy.target_heads, device) for v in variants}
    draft_heads = {v.label: heads_by_layer(v.policy.draft_heads, device) for v in variants}
    history = {
        v.label: history_of(
            {l: prompt_queries[l][:, :, h] for l, h in target_heads[v.label].items()},
            target_heads[v.label],
            v.page_size,
        )
        for v in variants
    }
    tallies = {v.label: Tally() for v in variants}
    dense_tally = Tally()
    head_data = []
    previous_dense_queries = prompt_queries

    c = context + 1  # committed tokens: the target's caches hold c - 1, the draft's c_draft
    c_draft = context
    for _ in tqdm(range(steps), desc="teacher-forced", unit="step", disable=not progress):
        # 1. Greedy drafts from the real prefix, recording every draft head's queries.
        window = text[:, c_draft:c]
        drafted, looked = [], {}
        for _ in range(gamma):
            logits, queries = draft.forward(
                window, dcache, record_heads=every_draft, last_logits_only=True
            )
            window = logits[:, -1, :vocab].argmax(-1, keepdim=True)
            drafted.append(window)
            for layer, q in queries.items():
                looked.setdefault(layer, []).append(q[:, -1:])
        drafted = torch.cat(drafted, dim=1)  # [W, gamma]
        looked = {layer: torch.cat(q, dim=1) for layer, q in looked.items()}
        lookahead = {}
        for v in variants:
            heads = draft_heads[v.label]
            key = (tuple((l, tuple(h.tolist())) for l, h in heads.items()), v.page_size)
            if heads and key not in lookahead:
                scores = _block_scores(
                    draft,
                    dcache,
                    {l: looked[l][:, :, h] for l, h in heads.items()},
                    heads,
                    v.page_size,
                    caches[v.page_size].max_pages_per_seq,
                )
                lookahead[key] = _rows(scores)
        if head_data_page_size:
            draft_head_scores = per_head_block_scores(draft, dcache, looked, head_data_page_size)
            target_head_scores = per_head_block_scores(
                target, caches[head_data_page_size], previous_dense_queries, head_data_page_size
            )[::2]
        dcache.truncate([c] * num_windows)
        c_draft = c

        # 2. Every variant verifies the drafts (even rows) and the real text (odd rows).
        real = text[:, c : c + gamma]
        rows = torch.stack(
            (torch.cat((text[:, c - 1 : c], drafted), 1), torch.cat((text[:, c - 1 : c], real), 1)),
            1,
        ).flatten(0, 1)
        labels = text[:, c : c + q_len]
        masks, logits_of = {}, {}
        for v in variants:
            cache = caches[v.page_size]
            kv_after = cache.kv_lens + q_len
            if isinstance(v.policy, Quest):
                logits, chosen = forward_per_layer(target, rows, cache, v.policy)
                masks[v.label] = torch.stack(
                    [
                        attended_mask(s, kv_after, q_len, v.page_size, int(kv_after.max()))
                        for s in chosen
                    ],
                    1,
                )
                share = sum(_kv_read_share(s, kv_after, q_len, v.page_size) for s in chosen) / len(
                    chosen
                )
            else:
                heads = draft_heads[v.label]
                key = (tuple((l, tuple(h.tolist())) for l, h in heads.items()), v.page_size)
                selection = v.policy.select(
                    Signals(lookahead.get(key), history[v.label]), kv_after, q_len, v.page_size
                )
                logits, queries = target.forward(
                    rows, cache, selection, record_heads=target_heads[v.label]
                )
                history[v.label] = history_of(queries, target_heads[v.label], v.page_size)
                masks[v.label] = attended_mask(
                    selection, kv_after, q_len, v.page_size, int(kv_after.max())
                )
                share = _kv_read_share(selection, kv_after, q_len, v.page_size)
            cache.truncate([c - 1] * cache.batch_size)
            logits_of[v.label] = logits[..., :vocab]
            tallies[v.label].read_share.append(share)

        # 3. Dense reference on the first cache: acceptance, greedy tokens, true attention mass.
        logits, queries = target.forward(rows, reference, None, record_heads=every_target)
        logits = logits[..., :vocab]
        mass = true_attention_mass(target, reference, queries)[::2]  # recall: on the draft rows
        dense_argmax = logits[1::2].argmax(-1)
        for tally, lg, mask in [(dense_tally, logits, None)] + [
            (tallies[v.label], logits_of[v.label], masks[v.label]) for v in variants
        ]:
            accepted, _ = accept_greedy(lg[::2], drafted)
            tally.accepted += accepted.tolist()
            tally.nll += token_nll(lg[1::2], labels)
            tally.agree += (lg[1::2].argmax(-1) == dense_argmax).flatten().tolist()
            full = (
                torch.ones(1, 1, mass.shape[-1], dtype=torch.bool, device=device)
                if mask is None
                else mask[::2]
            )
            tally.recall += attention_recall(mass, full).tolist()
        dense_tally.read_share.append(1.0)
        if head_data_page_size:
            p = head_data_page_size
            block_mass = (
                torch.nn.functional.pad(mass.sum((1, 2)), (0, -mass.shape[-1] % p))
                .view(num_windows, -1, p)
                .sum(-1)
            )
            head_data.append(
                {
                    "draft": draft_head_scores,
                    "target": target_head_scores,
                    "mass": block_mass,
                    "kv_lens": reference.kv_lens[::2].clone(),
                    "q_len": q_len,
                }
            )
        previous_dense_queries = {
            l: _rows(q[1::2]) for l, q in queries.items()
        }  # the real text's queries

        # 4. Advance every cache along the real text (the real-text rows of the dense pass).
        reference.truncate(
            [c - 1 if seq % 2 == 0 else c - 1 + q_len for seq in range(reference.batch_size)]
        )
        for w in range(num_windows):
            _copy_tail(reference, 2 * w + 1, reference, [2 * w], q_len)
        for p, cache in caches.items():
            if cache is not reference:
                for w in range(num_windows):
                    _copy_tail(reference, 2 * w + 1, cache, [2 * w, 2 * w + 1], q_len)
        c += q_len

    dense = dense_tally.summary(gamma, None)
    dense["retention"] = 1.0
    return TeacherForcedResult(
        {label: t.summary(gamma, dense_tally) for label, t in tallies.items()}, dense, head_data
    )


def prefilled_state(
    target: Transformer,
    draft: Transformer,
    window: PrefilledWindow,
    page_size: int,
    options: DecodeOptions,
) -> Prefilled:
    """The engine's ``Prefilled`` for one window, from the stored prefill, at any page size."""
    max_len = options.context_needed(window.window.context)
    return Prefilled(
        [window.window.prompt],
        build_cache(target, [window.target_kv], page_size, max_len),
        build_cache(draft, [window.draft_kv], page_size, max_len),
        window.first_logits[None],
        {l: q[None] for l, q in window.target_queries.items()},
    )


def free_running(
    target: Transformer,
    draft: Transformer,
    windows: Sequence[PrefilledWindow],
    variants: Sequence[Variant],
    options: DecodeOptions,
    progress: bool = False,
) -> dict[str, dict]:
    """Greedy speculative decoding with the engine's loop, per variant, against dense.

    Variants whose policy selects inside the layers (Quest) are not supported by the engine's
    loop and are skipped. Returns per label: mean accepted length (tokens per verification),
    acceptance rate, agreement with the dense-verified output, KV read share, and the tokens.
    """
    if options.temperature != 0.0:
        raise ValueError(
            "free_running: agreement with dense is defined for greedy decoding (temperature 0)"
        )
    results: dict[str, dict] = {}
    runnable = [v for v in variants if not isinstance(v.policy, Quest)]
    states = {}
    for v in [Variant("dense", Dense(), 16)] + runnable:
        emitted, verifications, shares, tokens = 0.0, 0, [], []
        for w in windows:
            key = (w.window, v.page_size)
            if key not in states:
                states[key] = prefilled_state(target, draft, w, v.page_size, options)
            with tqdm(
                total=options.max_new_tokens,
                desc=f"free-running {v.label}",
                unit="tok",
                disable=not progress,
            ) as bar:
                r = speculative_decode(
                    target, draft, states[key].fork(), v.policy, options, bar.update
                )
            emitted += r.emitted_per_verification * r.verifications
            verifications += r.verifications
            shares.append(r.kv_read_share)
            tokens.append(r.tokens[0])
        tau = emitted / verifications
        results[v.label] = {
            "mean_accepted_length": tau,
            "acceptance_rate": (tau - 1.0) / options.gamma,
            "kv_read_share": sum(shares) / len(shares),
            "tokens": tokens,
        }
    reference = results["dense"]["tokens"]
    for r in results.values():
        same = sum(a == b for seq, ref in zip(r["tokens"], reference) for a, b in zip(seq, ref))
        r["agreement_with_dense"] = same / sum(map(len, reference))
        r["retention"] = r["mean_accepted_length"] / results["dense"]["mean_accepted_length"]
    return results
