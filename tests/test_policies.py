# SPDX-License-Identifier: Apache-2.0
"""Selection policies: exact at a whole-context budget, sparse below it, signals, configs, errors."""

from __future__ import annotations

import pytest
import torch
from dustin.config import ModelConfig
from dustin.policies import (
    CONFIG_DIR,
    POLICIES,
    Dense,
    DraftOnly,
    Dustin,
    HistoryOnly,
    PairConfig,
    Signals,
    Streaming,
    heads_by_layer,
    make_policy,
)
from dustin.spec import (
    DecodeOptions,
    autoregressive_decode,
    prefill,
    speculative_decode,
)
from tiny_models import VOCAB, load_tiny, save_tiny

HEADS = PairConfig(
    draft_heads=((0, 1), (1, 2)), target_heads=((1, 0), (2, 3)), n_sink=4, n_recent=8
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
    target = save_tiny(tmp_path_factory.mktemp("target"), request.param, "target", seed=0)
    draft = save_tiny(tmp_path_factory.mktemp("draft"), request.param, "target", seed=0, noise=0.1)
    return load_tiny(target), load_tiny(draft)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (90, 61)]


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"dense"}))
def test_a_whole_context_budget_reproduces_dense_greedy(models, name):
    target, draft = models
    options = DecodeOptions(max_new_tokens=12, gamma=3)
    state = prefill(target, draft, _prompts(), options, page_size=4)
    policy = make_policy(name, HEADS, budget_tokens=state.target_cache.max_seq_len)
    sparse = speculative_decode(target, draft, state.fork(), policy, options)
    assert sparse.tokens == autoregressive_decode(target, state, options).tokens
    assert sparse.kv_read_share == 1.0


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"dense"}))
def test_a_small_budget_reads_less(models, name):
    target, draft = models
    options = DecodeOptions(max_new_tokens=8, gamma=3)
    state = prefill(target, draft, _prompts(), options, page_size=4)
    result = speculative_decode(
        target, draft, state, make_policy(name, HEADS, budget_tokens=24), options
    )
    assert all(len(t) == 8 for t in result.tokens)
    # Budget 6 blocks (+ forced sink/recent/window blocks) of about 25 per sequence.
    assert 0.1 < result.kv_read_share < 0.5


def _select(policy, lookahead=None, history=None, kv_len=40, q_len=5):
    chosen = policy.select(
        Signals(lookahead, history), torch.tensor([kv_len], dtype=torch.int32), q_len, 4
    )
    return chosen.block_ids[0, : chosen.block_counts[0]].tolist()


def _peak(block: int, num_blocks: int = 10) -> torch.Tensor:
    scores = torch.zeros(1, num_blocks)
    scores[0, block] = 1.0
    return scores


def test_each_policy_picks_by_its_own_signal():
    # 40 tokens in blocks of 4; forced: block 0 (4 sinks) and blocks 7-9 (4 recent + 5 window);
    # a budget of 6 blocks leaves 2 to choose (ties go to the lower id).
    common = {"budget_tokens": 24, "n_sink": 4, "n_recent": 4}
    assert _select(Streaming(**common)) == [0, 5, 6, 7, 8, 9]
    assert _select(DraftOnly(draft_heads=((0, 0),), **common), lookahead=_peak(2)) == [
        0,
        1,
        2,
        7,
        8,
        9,
    ]
    history_only = HistoryOnly(target_heads=((0, 0),), **common)
    assert _select(history_only, history=_peak(3)) == [0, 1, 3, 7, 8, 9]
    dustin = Dustin(draft_heads=((0, 0),), target_heads=((0, 0),), draft_share=0.5, **common)
    assert _select(dustin, lookahead=_peak(2), history=_peak(4)) == [0, 2, 4, 7, 8, 9]
    assert Dense().select(Signals(None, None), torch.tensor([40], dtype=torch.int32), 5, 4) is None


def test_bundled_pair_config_fits_the_real_pair():
    pair = PairConfig.load(CONFIG_DIR / "qwen2.5-coder-0.5b_1.5b.json")
    draft = ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 1e-6, 1e6, 32768, True, False)
    target = ModelConfig("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, 1e-6, 1e6, 32768, True, False)
    pair.check(draft, target)
    assert "NOT CALIBRATED" in pair.note
    PairConfig.default_for(draft, target).check(draft, target)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"draft_heads": [[0, 0]]}', "needs draft_heads and target_heads"),
        ('{"draft_heads": [], "target_heads": [], "budget": 3}', "unknown keys \\['budget'\\]"),
        ('{"draft_heads": [[0]], "target_heads": []}', "heads must be \\[layer, head\\] pairs"),
        (
            '{"draft_heads": [], "target_heads": [], "draft_share": 1.5}',
            "draft_share must be in \\[0, 1\\]",
        ),
    ],
)
def test_bad_pair_config(tmp_path, content, message):
    path = tmp_path / "pair.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        PairConfig.load(path)


def test_bad_policy_options():
    with pytest.raises(ValueError, match="unknown policy 'sparse'"):
        make_policy("sparse", HEADS)
    with pytest.raises(ValueError, match="Dustin: needs retrieval heads of both models"):
        Dustin(draft_heads=((0, 0),))
    with pytest.raises(ValueError, match="Dustin: draft_share must be in \\[0, 1\\]"):
        Dustin(draft_heads=((0, 0),), target_heads=((0, 0),), draft_share=-0.1)
    with pytest.raises(ValueError, match="Streaming: budget_tokens must be >= 0"):
        Streaming(budget_tokens=-1)
    with pytest.raises(ValueError, match="DraftOnly: needs the draft's retrieval heads"):
        DraftOnly()


class _SignalSpy(Dustin):
    """Dustin that keeps a copy of the signals of every step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seen = []

    def select(self, signals, kv_lens, q_len, page_size):
        self.seen.append((signals.lookahead.clone(), signals.history.clone()))
        return super().select(signals, kv_lens, q_len, page_size)


def _attention_blocks(model, tokens, heads, num_queries, block):
    """Softmax attention of the last ``num_queries`` positions of ``tokens`` on ``heads``, summed
    over queries and heads into blocks: the signals recomputed by a dense prefill."""
    cache = model.new_cache(1, len(tokens), page_size=block)
    _, queries = model.prefill(
        torch.tensor(tokens), cache, 0, record_heads=heads, record_last=num_queries
    )
    group = model.config.num_heads // model.config.num_kv_heads
    scores = torch.zeros(cache.max_pages_per_seq, dtype=torch.float64)
    length = len(tokens)
    positions = torch.arange(length - num_queries, length)
    for layer, head_ids in heads.items():
        keys, _ = cache.gather(layer, 0)
        for i, head in enumerate(head_ids.tolist()):
            logits = queries[layer][:, i].double() @ keys[head // group].double().T
            causal = torch.arange(length)[None] > positions[:, None]
            weights = (logits * model.sm_scale).masked_fill(causal, float("-inf")).softmax(-1)
            scores.index_add_(0, torch.arange(length) // block, weights.sum(0))
    return scores


def _assert_blocks(scores: torch.Tensor, expected: torch.Tensor) -> None:
    """Scores equal the recomputed ones on their blocks and are zero on later blocks."""
    torch.testing.assert_close(scores[: len(expected)].double(), expected, rtol=1e-4, atol=1e-5)
    assert not scores[len(expected) :].any()


def test_signals_are_the_attention_of_the_drafted_and_verified_positions(models):
    target, _ = models
    gamma, block = 3, 4
    # The target drafting for itself, verified at a whole-context budget, accepts every draft:
    # nothing is rolled back and every step's signal can be recomputed from the final tokens.
    options = DecodeOptions(max_new_tokens=3 * (gamma + 1) + 1, gamma=gamma)
    prompt = _prompts()[0][:50]
    state = prefill(target, target, [prompt], options, page_size=block)
    spy = _SignalSpy(
        HEADS.draft_heads, HEADS.target_heads, budget_tokens=state.target_cache.max_seq_len
    )
    result = speculative_decode(target, target, state, spy, options)
    assert result.emitted_per_verification == gamma + 1 and len(spy.seen) == 3
    tokens = prompt + result.tokens[0]
    draft_heads = heads_by_layer(HEADS.draft_heads, target.device)
    target_heads = heads_by_layer(HEADS.target_heads, target.device)
    for step, (lookahead, history) in enumerate(spy.seen):
        committed = len(prompt) + 1 + step * (gamma + 1)
        # Lookahead: the draft's queries at the positions that produced the drafts.
        expected = _attention_blocks(
            target, tokens[: committed + gamma - 1], draft_heads, gamma, block
        )
        _assert_blocks(lookahead[0], expected)
        # History: the previous verification window's queries (the prompt's end before any).
        if step == 0:
            expected = _attention_blocks(
                target, prompt, target_heads, options.history_window, block
            )
        else:
            end = committed - 1  # the previous window ends just before the last committed token
            expected = _attention_blocks(target, tokens[:end], target_heads, gamma + 1, block)
        _assert_blocks(history[0], expected)
