# SPDX-License-Identifier: Apache-2.0
"""The decoder matches ``transformers`` on tiny random Llama and Qwen2 checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from dustin.checkpoint import load_checkpoint
from dustin.config import ModelConfig
from dustin.model import Transformer, rope_inv_freq
from tiny_models import VOCAB, load_tiny, reference_logits, save_tiny

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "qwen2": {"family": "qwen2"},
    "qwen2-tied": {"family": "qwen2", "tie_word_embeddings": True},
    "llama": {"family": "llama"},
    "llama3-scaled-tied": {
        "family": "llama",
        "rope_scaling": LLAMA3_SCALING,
        "tie_word_embeddings": True,
    },
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return save_tiny(
        directory, **copy.deepcopy(VARIANTS[request.param])
    )  # transformers edits dicts


@pytest.mark.parametrize("glue", ["eager", "compiled"])
@pytest.mark.parametrize("layout, page_size", [("HND", 4), ("NHD", 1), ("HND", 16)])
def test_logits_match_transformers(checkpoint, layout, page_size, glue):
    model = load_tiny(checkpoint)
    if glue == "compiled":  # fused projections, traced as inductor would (no C++ build here)
        model.compile_layers("aot_eager")
    torch.manual_seed(1)
    lens = [30, 21]
    tokens = torch.randint(0, VOCAB, (2, 40))
    reference = [
        reference_logits(checkpoint, tokens[b : b + 1, : n + 10])[0] for b, n in enumerate(lens)
    ]

    cache = model.new_cache(2, 64, page_size=page_size, layout=layout)
    for b, n in enumerate(lens):  # prefill in chunks of 8: later chunks attend the cached prefix
        last, _ = model.prefill(tokens[b, :n], cache, b, chunk_size=8)
        torch.testing.assert_close(last, reference[b][n - 1], rtol=1e-4, atol=1e-4)
    done = 0
    for width in (5, 1, 4):  # windows through sparse_verify, sequences at different positions
        window = torch.stack([tokens[b, n + done : n + done + width] for b, n in enumerate(lens)])
        logits, _ = model.forward(window, cache)
        for b, n in enumerate(lens):
            torch.testing.assert_close(
                logits[b], reference[b][n + done : n + done + width], rtol=1e-4, atol=1e-4
            )
        done += width


def test_bfloat16_is_close(checkpoint):
    model = load_tiny(checkpoint, dtype=torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    reference = reference_logits(checkpoint, tokens)[0]
    cache = model.new_cache(1, 32)
    model.prefill(tokens[0, :20], cache, 0)
    logits, _ = model.forward(tokens[:, 20:], cache)
    error = (logits[0] - reference[20:]).norm() / reference[20:].norm()
    assert error < 3e-2


def test_recorded_queries_agree_between_prefill_and_windows(checkpoint):
    model = load_tiny(checkpoint)
    tokens = torch.randint(0, VOCAB, (26,), generator=torch.Generator().manual_seed(3))
    heads = {0: torch.tensor([1, 3]), 2 % model.config.num_layers: torch.tensor([0])}
    cache = model.new_cache(1, 32)
    _, from_prefill = model.prefill(
        tokens, cache, 0, chunk_size=10, record_heads=heads, record_last=6
    )
    cache = model.new_cache(1, 32)
    model.prefill(tokens[:20], cache, 0)
    _, from_window = model.forward(tokens[None, 20:], cache, record_heads=heads)
    assert set(from_prefill) == set(heads)
    for layer, q in from_prefill.items():
        assert q.shape == (6, len(heads[layer]), model.config.head_dim)
        torch.testing.assert_close(q, from_window[layer][0], rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_SCALING),
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    config = ModelConfig(
        "llama", 10, 64, 64, 1, 4, 4, 16, 1e-5, 500000.0, 128, False, False, LLAMA3_SCALING
    )
    torch.testing.assert_close(rope_inv_freq(config), expected.float())


def test_bad_inputs(checkpoint):
    model = load_tiny(checkpoint)
    cache = model.new_cache(2, 32)
    with pytest.raises(ValueError, match="windows hold 1..16 tokens, got 17"):
        model.forward(torch.zeros(2, 17, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="tokens has 1 sequences, the cache 2"):
        model.forward(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="longer than the model's context \\(512 tokens\\)"):
        model.new_cache(1, 513)
    with pytest.raises(ValueError, match="record_last must be in"):
        model.prefill(torch.zeros(4, dtype=torch.long), cache, 0, record_last=5)
    config, weights, _ = load_checkpoint(checkpoint)
    weights.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="missing \\['layers.0.mlp.up_proj.weight'\\]"):
        Transformer.from_state_dict(config, weights)
    scaled = ModelConfig(
        **{**config.__dict__, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    )
    with pytest.raises(NotImplementedError, match="rope_scaling type 'yarn' is not supported"):
        rope_inv_freq(scaled)


def test_compile_layers_fuses_projections_without_copies(checkpoint):
    model = load_tiny(checkpoint)
    before = {name: w.clone() for name, w in model.state_dict().items()}
    model.compile_layers("aot_eager")
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, w in before.items():
        torch.testing.assert_close(after[name], w, rtol=0, atol=0, msg=name)
    for layer in model.layers:
        fused = {
            layer.self_attn.fused_qkv[0].untyped_storage().data_ptr(): layer.self_attn,
            layer.mlp.fused_gate_up[0].untyped_storage().data_ptr(): layer.mlp,
        }
        for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            owner = layer.self_attn if proj[0] in "qkv" else layer.mlp
            storage = getattr(owner, proj).weight.untyped_storage().data_ptr()
            assert fused.get(storage) is owner, f"{proj} is not a view of the fused weight"

