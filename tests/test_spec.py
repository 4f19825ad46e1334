# SPDX-License-Identifier: Apache-2.0
"""The speculative loop: exact greedy output, exact sampling, batching, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from dustin.cache import CacheFullError
from dustin.policies import Dense, Dustin, PairConfig
from dustin.spec import (
    DecodeOptions,
    accept_by_sampling,
    autoregressive_decode,
    prefill,
    speculative_decode,
)
from tiny_models import VOCAB, load_tiny, reference_model, save_tiny

PROMPT_LENS = (37, 52, 18)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(target dir, target, draft) of one family. The draft is the target with 10% weight noise:
    it agrees often but not always, so steps accept some drafts and roll back the rest."""
    target_dir = save_tiny(tmp_path_factory.mktemp("target"), request.param, "target", seed=0)
    draft_dir = save_tiny(
        tmp_path_factory.mktemp("draft"), request.param, "target", seed=0, noise=0.1
    )
    return target_dir, load_tiny(target_dir), load_tiny(draft_dir)


@pytest.fixture(scope="module")
def small_draft(pair, tmp_path_factory):
    """A draft of another shape (1 KV head, head dim 8) and other weights, same family."""
    family = pair[1].config.arch
    return load_tiny(save_tiny(tmp_path_factory.mktemp("small"), family, "draft", seed=1))


def _prompts(lens=PROMPT_LENS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]


def _greedy_reference(directory, prompt: list[int], n: int) -> list[int]:
    """``transformers``' greedy continuation, one full forward pass per token."""
    model, tokens = reference_model(directory), list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_greedy_speculative_with_dense_reproduces_the_target(pair):
    target_dir, target, draft = pair
    options = DecodeOptions(max_new_tokens=16, gamma=3)
    state = prefill(target, draft, _prompts(), options, page_size=4)
    plain = autoregressive_decode(target, state.fork(), options)
    spec = speculative_decode(target, draft, state.fork(), Dense(), options)
    assert plain.tokens[0] == _greedy_reference(target_dir, _prompts()[0], 16)
    assert spec.tokens == plain.tokens
    assert all(len(t) == 16 for t in spec.tokens)
    assert spec.kv_read_share == 1.0
    assert 1.2 < spec.emitted_per_verification < options.gamma + 1  # partial acceptance ran


def test_a_draft_of_another_shape_keeps_the_output_exact(pair, small_draft):
    _, target, _ = pair
    options = DecodeOptions(max_new_tokens=10, gamma=5)
    state = prefill(target, small_draft, _prompts(), options, page_size=2)
    spec = speculative_decode(target, small_draft, state.fork(), Dense(), options)
    assert spec.tokens == autoregressive_decode(target, state, options).tokens


def test_a_draft_equal_to_the_target_is_always_accepted(pair):
    _, target, _ = pair
    options = DecodeOptions(max_new_tokens=21, gamma=4)
    state = prefill(target, target, _prompts(), options, page_size=8, layout="NHD")
    spec = speculative_decode(target, target, state.fork(), Dense(), options)
    assert spec.emitted_per_verification == options.gamma + 1
    assert spec.verifications == math.ceil((21 - 1) / (options.gamma + 1))
    assert spec.tokens == autoregressive_decode(target, state, options).tokens


@pytest.mark.parametrize("policy", [Dense(), Dustin(((0, 1),), ((1, 0), (2, 3)), budget_tokens=12)])
def test_mixed_prompt_lengths_equal_each_sequence_alone(pair, policy):
    _, target, draft = pair
    options = DecodeOptions(max_new_tokens=12, gamma=3)
    together = speculative_decode(
        target, draft, prefill(target, draft, _prompts(), options), policy, options
    )
    for prompt, tokens in zip(_prompts(), together.tokens):
        alone = speculative_decode(
            target, draft, prefill(target, draft, [prompt], options), policy, options
        )
        assert alone.tokens == [tokens]


def test_sampling_is_seeded_and_stays_in_the_vocabulary(pair, small_draft):
    _, target, _ = pair
    draft = small_draft
    options = DecodeOptions(max_new_tokens=10, gamma=2, temperature=0.8, seed=7)
    state = prefill(target, draft, _prompts(), options)
    first = speculative_decode(target, draft, state.fork(), Dense(), options)
    again = speculative_decode(target, draft, state.fork(), Dense(), options)
    assert first.tokens == again.tokens
    assert all(0 <= t < target.config.vocab_size for seq in first.tokens for t in seq)


def test_eos_ends_a_sequence(pair):
    _, target, draft = pair
    options = DecodeOptions(max_new_tokens=12, gamma=3)
    full = autoregressive_decode(target, prefill(target, None, _prompts(), options), options).tokens
    eos = full[0][4]
    stopped = DecodeOptions(max_new_tokens=12, gamma=3, eos_token_id=eos)
    spec = speculative_decode(
        target, draft, prefill(target, draft, _prompts(), stopped), Dense(), stopped
    )
    assert spec.tokens[0] == full[0][: full[0].index(eos) + 1]


def _emitted_first_two(target_probs, draft_probs, samples: int, seed: int):
    """Draws drafts from q and runs rejection sampling ``samples`` times in one batch."""
    g = torch.Generator().manual_seed(seed)
    batch_t = target_probs.expand(samples, -1, -1)
    batch_q = draft_probs.expand(samples, -1, -1)
    drafted = torch.stack(
        [
            torch.multinomial(draft_probs[0, i], samples, replacement=True, generator=g)
            for i in range(draft_probs.shape[1])
        ],
        dim=1,
    )
    accepted, next_token = accept_by_sampling(batch_t, batch_q, drafted, g)
    emitted = torch.cat((drafted, torch.full_like(drafted[:, :1], -1)), 1)
    emitted[torch.arange(samples), accepted] = next_token
    return emitted, accepted


def test_rejection_sampling_leaves_the_verifier_distribution_unchanged():
    torch.manual_seed(0)
    vocab, gamma, samples = 6, 2, 200_000
    target_probs = torch.softmax(2 * torch.randn(1, gamma + 1, vocab), -1)
    draft_probs = torch.softmax(2 * torch.randn(1, gamma, vocab), -1)
    draft_probs[0, 0, 2] = 0.0  # a token the draft never proposes must still appear
    draft_probs /= draft_probs.sum(-1, keepdim=True)
    emitted, accepted = _emitted_first_two(target_probs, draft_probs, samples, seed=1)

    def check(tokens: torch.Tensor, p: torch.Tensor) -> None:
        freq = torch.bincount(tokens, minlength=vocab).double() / tokens.numel()
        sigma = (p.double() * (1 - p.double()) / tokens.numel()).sqrt()
        assert torch.all((freq - p.double()).abs() <= 5 * sigma + 1e-9), (freq, p)

    # The first emitted token follows p_0; given it was a kept draft, the second follows p_1
    # (these synthetic verifier rows do not depend on the prefix).
    check(emitted[:, 0], target_probs[0, 0])
    check(emitted[accepted >= 1, 1], target_probs[0, 1])
    # Acceptance itself is not trivial: a sampler that always rejected would pass the above.
    expected_accept = torch.minimum(target_probs[0, 0], draft_probs[0, 0]).sum()
    assert abs(float((accepted >= 1).double().mean()) - float(expected_accept)) < 0.01


def test_bad_input(pair):
    _, target, draft = pair
    with pytest.raises(ValueError, match="gamma must be in \\[1, 15\\]"):
        DecodeOptions(gamma=16)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        DecodeOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        DecodeOptions(temperature=-1.0)
    options = DecodeOptions(max_new_tokens=8, gamma=3)
    with pytest.raises(ValueError, match="more than the target's context \\(512\\)"):
        prefill(target, draft, _prompts((500,)), options)
    with pytest.raises(
        CacheFullError, match="needs a KV cache of 144 tokens .* token_budget is 100"
    ):
        prefill(target, draft, _prompts((60, 50)), options, page_size=4, token_budget=100)
    with pytest.raises(ValueError, match="non-empty token lists"):
        prefill(target, draft, [[]], options)
    state = prefill(target, draft, _prompts(), options)
    whole = state.target_cache.max_seq_len
    too_big = Dustin(((0, 0),), ((0, 0),), budget_tokens=whole + 1)
    with pytest.raises(
        ValueError, match=f"budget \\({whole + 1} tokens\\) is larger than the context"
    ):
        speculative_decode(target, draft, state.fork(), too_big, options)
    with pytest.raises(ValueError, match="prefilled without a draft"):
        speculative_decode(
            target, draft, prefill(target, None, _prompts(), options), Dense(), options
        )
    with pytest.raises(ValueError, match="head \\(9, 0\\) does not exist in the draft"):
        PairConfig(((9, 0),), ((0, 0),)).check(draft.config, target.config)


def _random_model(config, device):
    """A model of ``config`` with random bf16 weights (speed and plumbing do not need trained ones)."""
    from dustin.model import Transformer

    with torch.device("meta"):
        shapes = Transformer(config).state_dict()
    g = torch.Generator().manual_seed(0)
    weights = {
        ("" if name.startswith("lm_head") else "model.") + name: 0.02
        * torch.randn(t.shape, generator=g, dtype=torch.float32)
        for name, t in shapes.items()
        if not (name.startswith("lm_head") and config.tie_word_embeddings)
    }
    return Transformer.from_state_dict(config, weights, dtype=torch.bfloat16, device=device)


@pytest.mark.cuda
def test_cuda_real_shapes_end_to_end():
    """The loop on random-weight models of the Qwen2.5-Coder 1.5B/0.5B shapes with the CUDA ops."""
    from dustin.config import ModelConfig

    target = _random_model(
        ModelConfig("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, 1e-6, 1e6, 32768, True, False),
        "cuda",
    )
    draft = _random_model(
        ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 1e-6, 1e6, 32768, True, False),
        "cuda",
    )
    options = DecodeOptions(max_new_tokens=24, gamma=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (3000, 2100)]
    state = prefill(target, draft, prompts, options)
    heads = (((12, 0), (16, 7)), ((14, 0), (18, 6)))
    whole = Dustin(*heads, budget_tokens=state.target_cache.max_seq_len)
    dense = speculative_decode(target, draft, state.fork(), Dense(), options)
    full = speculative_decode(target, draft, state.fork(), whole, options)
    sparse = speculative_decode(
        target, draft, state.fork(), Dustin(*heads, budget_tokens=512), options
    )
    plain = autoregressive_decode(target, state.fork(), options)
    # Same block lists, same kernel: a whole-context budget is dense verification exactly.
    assert full.tokens == dense.tokens
    assert all(len(t) == 24 for r in (dense, sparse, plain) for t in r.tokens)
    assert sparse.kv_read_share < 0.35 and dense.kv_read_share == 1.0


def test_a_draft_with_fewer_embedding_rows_drafts_from_the_shared_ids(pair, tmp_path):
    _, target, _ = pair
    family = target.config.arch
    rows = target.config.vocab_size - 3  # still above the tokenizer's VOCAB ids
    draft = load_tiny(save_tiny(tmp_path, family, "draft", seed=2, vocab_size=rows))
    for temperature in (0.0, 0.9):
        options = DecodeOptions(max_new_tokens=8, gamma=3, temperature=temperature)
        state = prefill(target, draft, _prompts(), options)
        spec = speculative_decode(target, draft, state, Dense(), options)
        assert all(0 <= t < rows for seq in spec.tokens for t in seq)
