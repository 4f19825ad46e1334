# SPDX-License-Identifier: Apache-2.0
"""The static-buffer decoding steps of ``dustin.fast`` against the eager loop of ``dustin.spec``.

On the CPU the phases run as direct calls (no CUDA graphs), which checks the device-side append,
rollback and bookkeeping; on a GPU the captured graphs are replayed and compared with the same
phases run eagerly and with the eager loop.
"""

from __future__ import annotations

import pytest
import torch

from dustin.cache import CacheFullError
from dustin.config import ModelConfig
from dustin.fast import GraphDecoder, streaming_lists
from dustin.model import Transformer
from dustin.policies import Dense, Dustin, PairConfig
from dustin.spec import DecodeOptions, autoregressive_decode, prefill, speculative_decode

VOCAB = 64


def tiny_model(
    seed: int,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
) -> Transformer:
    """A random qwen2-style model whose weights are scaled up so greedy choices are clear-cut
    (near-uniform logits would make the comparison hinge on rounding)."""
    config = ModelConfig(
        arch="qwen2",
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return Transformer.from_state_dict(config, model.state_dict(), dtype=dtype, device=device)


def tiny_pair(
    dtype: torch.dtype, device: str, head_dim: int, draft_kind: str = "small"
) -> tuple[Transformer, Transformer]:
    """A target and a draft: ``"small"`` is an independent model of another shape (it rarely
    agrees with the target), ``"near-copy"`` the target with 2% weight noise (it agrees often,
    so steps accept every draft, some, or none)."""
    target = tiny_model(0, 3, 64, 4, 2, head_dim, dtype, device)
    if draft_kind == "small":
        return target, tiny_model(1, 2, 32, 4, 1, head_dim, dtype, device)
    g = torch.Generator().manual_seed(5)
    noisy = {
        name: w + 0.02 * w.float().std() * torch.randn(w.shape, generator=g).to(w)
        if w.dim() == 2
        else w
        for name, w in target.state_dict().items()
    }
    return target, Transformer.from_state_dict(target.config, noisy, dtype=dtype, device=device)


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def dustin_policy(target: Transformer, draft: Transformer, budget: int) -> Dustin:
    pair = PairConfig.default_for(draft.config, target.config)
    return Dustin(
        draft_heads=pair.draft_heads,
        target_heads=pair.target_heads,
        budget_tokens=budget,
        n_sink=4,
        n_recent=4,
        draft_share=0.5,
    )


def fast_tokens(target, draft, state, policy, options, **kwargs) -> list[list[int]]:
    decoder = GraphDecoder(
        target,
        state.target_cache,
        draft,
        state.draft_cache if draft else None,
        policy,
        gamma=options.gamma if draft else 0,
        max_new_tokens=options.max_new_tokens,
        **kwargs,
    )
    decoder.start_from(state)
    return decoder.generate().tokens


def check_against_eager(
    device: str, dtype: torch.dtype, head_dim: int, draft_kind: str, **kwargs
) -> None:
    target, draft = tiny_pair(dtype, device, head_dim, draft_kind)
    options = DecodeOptions(max_new_tokens=20, gamma=3)
    state = prefill(target, draft, prompts_of([70, 45, 90]), options, page_size=4)

    plain = autoregressive_decode(target, state.fork(), options).tokens
    assert fast_tokens(target, None, state.fork(), None, options, **kwargs) == plain

    dense = speculative_decode(target, draft, state.fork(), Dense(), options).tokens
    assert dense == plain  # dense verification is exact
    assert fast_tokens(target, draft, state.fork(), Dense(), options, **kwargs) == dense

    policy = dustin_policy(target, draft, budget=16)
    sparse = speculative_decode(target, draft, state.fork(), policy, options).tokens
    assert fast_tokens(target, draft, state.fork(), policy, options, **kwargs) == sparse

    # A streaming draft changes only the proposals: dense verification still gives the target's
    # own greedy output (MagicDec-style).
    assert (
        fast_tokens(target, draft, state.fork(), Dense(), options, draft_window=16, **kwargs)
        == plain
    )


@pytest.mark.parametrize("draft_kind", ["small", "near-copy"])
def test_static_steps_match_eager_loop_on_cpu(draft_kind):
    check_against_eager("cpu", torch.float32, 16, draft_kind, use_graphs=False)


@pytest.mark.cuda
@pytest.mark.parametrize("draft_kind", ["small", "near-copy"])
def test_graph_replay_matches_eager_loop_on_cuda(draft_kind):
    check_against_eager("cuda", torch.bfloat16, 64, draft_kind)


def test_compiled_layers_decode_like_eager_layers_on_cpu():
    """Compiled layer glue (``Transformer.compile_layers``) decodes what the eager glue does;
    aot_eager traces and functionalizes the glue as inductor would, without a C++ build."""
    options = DecodeOptions(max_new_tokens=24, gamma=4)
    prompts = prompts_of([70, 45, 90], seed=7)
    tokens = []
    for compiled in (False, True):
        target, draft = tiny_pair(torch.float32, "cpu", 64, "near-copy")
        if compiled:
            target.compile_layers("aot_eager"), draft.compile_layers("aot_eager")
        state = prefill(target, draft, prompts, options, page_size=16)
        policy = dustin_policy(target, draft, budget=32)
        tokens.append(
            [
                fast_tokens(target, None, state.fork(), None, options),
                fast_tokens(target, draft, state.fork(), policy, options),
                fast_tokens(target, draft, state.fork(), policy, options, draft_window=32),
            ]
        )
    assert tokens[1] == tokens[0]


def prefill_and_window_logits(dtype: torch.dtype, device: str, compiled: bool) -> torch.Tensor:
    """float64 logits of a 90-token prefill and a 5-token window after it."""
    target, _ = tiny_pair(dtype, device, 64, "near-copy")
    if compiled:
        target.compile_layers()
    cache = target.new_cache(1, 128)
    first, _ = target.prefill(torch.tensor(prompts_of([90], seed=11)[0], device=device), cache, 0)
    after, _ = target.forward(torch.tensor(prompts_of([5], seed=12), device=device), cache)
    return torch.cat([first.flatten(), after.flatten()]).double().cpu()


@pytest.mark.cuda
def test_compiled_layers_compute_the_eager_logits_on_cuda():
    def error(x: torch.Tensor) -> float:
        return ((x - reference).norm() / reference.norm()).item()

    # The CUDA kernels take 16-bit inputs only, so the float32 reference runs on the CPU (the
    # weights do not depend on the device).
    reference = prefill_and_window_logits(torch.float32, "cpu", compiled=False)
    # In bf16 inductor rounds once where eager rounds after every op, so greedy tokens of the
    # tiny models can flip; the compiled glue must be at least about as accurate.
    eager = error(prefill_and_window_logits(torch.bfloat16, "cuda", compiled=False))
    compiled = error(prefill_and_window_logits(torch.bfloat16, "cuda", compiled=True))
    assert eager < 0.1, f"bf16 eager logit error {eager:.3e}"  # 0.045 on the CPU
    assert compiled <= 1.25 * eager, f"bf16 logit error: compiled {compiled:.3e}, eager {eager:.3e}"


def assert_graphs_match_direct_calls(target, draft, state, policy, options, draft_window):
    """The same tokens from CUDA-graph replays and from direct calls, with the full-KV draft
    and with a streaming draft of ``draft_window`` tokens."""
    for window in (None, draft_window):
        graphs = fast_tokens(target, draft, state.fork(), policy, options, draft_window=window)
        direct = fast_tokens(
            target, draft, state.fork(), policy, options, draft_window=window, use_graphs=False
        )
        assert graphs == direct


@pytest.mark.cuda
def test_compiled_layers_replay_in_graphs_like_direct_calls_on_cuda():
    target, draft = tiny_pair(torch.bfloat16, "cuda", 64, "near-copy")
    target.compile_layers(), draft.compile_layers()
    options = DecodeOptions(max_new_tokens=24, gamma=4)
    state = prefill(target, draft, prompts_of([70, 45, 90], seed=7), options, page_size=16)
    policy = dustin_policy(target, draft, budget=32)
    assert_graphs_match_direct_calls(target, draft, state, policy, options, draft_window=32)


@pytest.mark.cuda
def test_graph_replay_matches_direct_calls_on_cuda():
    target, draft = tiny_pair(torch.bfloat16, "cuda", 64, "near-copy")
    options = DecodeOptions(max_new_tokens=40, gamma=4)
    state = prefill(target, draft, prompts_of([300, 200, 257, 512], seed=3), options, page_size=16)
    policy = dustin_policy(target, draft, budget=64)
    assert_graphs_match_direct_calls(target, draft, state, policy, options, draft_window=64)


def test_streaming_lists_keep_sinks_and_recent_blocks():
    target, _ = tiny_pair(torch.float32, "cpu", 16)
    cache = target.new_cache(2, 200, page_size=4)
    cache.append(100, [0])
    cache.append(30, [1])
    lists = streaming_lists(cache, window_tokens=16, n_sink=4, n_recent=0)
    ids, counts = lists(cache.kv_lens, 2)
    # 100 tokens = 25 blocks: sink block 0, then the most recent blocks (21..24) up to 4 blocks
    # of budget, the window's blocks forced.
    assert ids[0, : counts[0]].tolist() == [0, 22, 23, 24]
    assert ids[1, : counts[1]].tolist() == [0, 5, 6, 7]


def test_replayed_acceptance_commits_and_rolls_back():
    target, draft = tiny_pair(torch.float32, "cpu", 16)
    options = DecodeOptions(max_new_tokens=12, gamma=3)
    state = prefill(target, draft, prompts_of([20, 33]), options, page_size=4)
    decoder = GraphDecoder(
        target,
        state.target_cache,
        draft,
        state.draft_cache,
        Dense(),
        gamma=3,
        max_new_tokens=12,
        replay_acceptance=True,
        use_graphs=False,
    )
    decoder.start_from(state)
    generated = torch.tensor([1, 1])
    for accepted in ([0, 3], [2, 1], [3, 3], [1, 0]):
        decoder.set_acceptance(torch.tensor(accepted, dtype=torch.int32))
        decoder.step()
        active = generated < 12
        generated += active * (torch.tensor(accepted) + 1)
        assert decoder.generated.tolist() == generated.tolist()
    committed = torch.tensor([20, 33]) + generated
    assert decoder.committed.tolist() == committed.tolist()
    assert decoder.tcache.kv_lens.tolist() == (committed - 1).tolist()


def test_bad_settings_are_rejected():
    target, draft = tiny_pair(torch.float32, "cpu", 16)
    cache, dcache = target.new_cache(1, 64), draft.new_cache(1, 64)
    with pytest.raises(ValueError, match="gamma 0"):
        GraphDecoder(target, cache, gamma=4)
    with pytest.raises(ValueError, match="together"):
        GraphDecoder(target, cache, draft, None, Dense())
    with pytest.raises(ValueError, match="gamma must be in"):
        GraphDecoder(target, cache, draft, dcache, Dense(), gamma=16)
    with pytest.raises(ValueError, match="page size"):
        GraphDecoder(target, cache, draft, draft.new_cache(1, 64, page_size=8), Dense())
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(target, cache, gamma=0, use_graphs=True)


def test_start_refuses_a_generation_the_cache_cannot_hold():
    target, _ = tiny_pair(torch.float32, "cpu", 16)
    cache = target.new_cache(2, 64, page_size=4)
    cache.append(40)
    decoder = GraphDecoder(target, cache, gamma=0, max_new_tokens=30)
    first = torch.zeros(2, dtype=torch.long)
    with pytest.raises(CacheFullError, match="max_seq_len"):
        decoder.start([40, 40], first, first)
    decoder = GraphDecoder(target, cache, gamma=0, max_new_tokens=20)
    decoder.start([40, 40], first, first)  # 40 + 20 + 1 fits: pages reserved, lengths kept
    assert cache.lens == [40, 40] and cache.free_pages == cache.num_pages - 2 * 16
