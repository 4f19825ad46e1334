# SPDX-License-Identifier: Apache-2.0
"""Checkpoint loading: Hugging Face directories and GGUF files against transformers, and bad input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from dustin.checkpoint import CheckpointError, check_compatible, load_checkpoint
from dustin.config import ModelConfig
from dustin.fetch import cached_real_pair
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

transformers = pytest.importorskip("transformers")

VOCAB = 300
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLES = [
    "It is a truth universally acknowledged, that a single man in possession",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "Café naïve — 東京 12345 don't WE'LL <|im_start|>user\nhi<|im_end|>",
    "   leading spaces and trailing   ",
]
# llama.cpp tensor names, written out here independently of the loader's own mapping.
GGUF_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer of VOCAB tokens, trained on a little text.

    It is trained with GPT-2's split, which keeps digit runs together, so it learns digit merges
    that Qwen2's one-digit split must then never apply (a wrong split pattern changes the ids).
    """
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [s * 3 for s in SAMPLES] + [
        "the quick brown fox jumps over the lazy dog " * 5,
        "1234 " * 50,
    ]
    tok.train_from_iterator(corpus, trainer)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == VOCAB
    assert tok.token_to_id("12") is not None  # a digit merge the Qwen2 split must not use
    return tok


def _save_hf(model, tokenizer: Tokenizer, directory: Path, **save_kwargs) -> Path:
    model.save_pretrained(directory, **save_kwargs)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _tiny_qwen2(tie: bool = False):
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    return _randomize_norms(transformers.Qwen2ForCausalLM(config).eval())


def _tiny_llama(tie: bool = True, rope_scaling: dict | None = None):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_scaling=rope_scaling,
    )  # fmt: skip
    torch.manual_seed(1)
    return _randomize_norms(transformers.LlamaForCausalLM(config).eval())


def _randomize_norms(model):
    # Norm weights start at one; random ones make a swapped or misnamed norm tensor visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _assert_state_equal(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]):
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def _reference_state(model, tied: bool) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        del state["lm_head.weight"]
    return state


# ------------------------------------------------------------------------- Hugging Face directories


def test_hf_qwen2_dir(tmp_path, bpe_tokenizer):
    model = _tiny_qwen2()
    cfg, state, tok = load_checkpoint(_save_hf(model, bpe_tokenizer, tmp_path))
    assert cfg == ModelConfig(
        arch="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5000.0,
        max_position_embeddings=256, attention_bias=True, tie_word_embeddings=False,
        rope_scaling=None,
    )  # fmt: skip
    _assert_state_equal(state, _reference_state(model, tied=False))
    for text in SAMPLES:
        assert tok.encode(text).ids == bpe_tokenizer.encode(text).ids


def test_hf_llama_sharded_tied_dir(tmp_path, bpe_tokenizer):
    scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }  # fmt: skip
    model = _tiny_llama(tie=True, rope_scaling=dict(scaling))  # transformers edits it
    directory = _save_hf(model, bpe_tokenizer, tmp_path, max_shard_size="50KB")
    assert (directory / "model.safetensors.index.json").is_file()
    cfg, state, _ = load_checkpoint(directory)
    assert (cfg.arch, cfg.attention_bias, cfg.tie_word_embeddings) == ("llama", False, True)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == scaling
    assert "lm_head.weight" not in state
    _assert_state_equal(state, _reference_state(model, tied=True))


def test_hf_dir_converts_dtype(tmp_path, bpe_tokenizer):
    model = _tiny_qwen2()
    _, state, _ = load_checkpoint(_save_hf(model, bpe_tokenizer, tmp_path), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    reference = model.state_dict()["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], reference)


def test_hf_old_style_rope_config(tmp_path, bpe_tokenizer):
    model = _tiny_llama(tie=False)
    directory = _save_hf(model, bpe_tokenizer, tmp_path)
    raw = json.loads((directory / "config.json").read_text())
    del raw["rope_parameters"]
    raw |= {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (directory / "config.json").write_text(json.dumps(raw))
    cfg, _, _ = load_checkpoint(directory)
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


# ------------------------------------------------------------------------------------- GGUF files


def _llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute for Q/K rows."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_gguf(
    path: Path, model, tokenizer: Tokenizer, pre: str, add_bos: bool, quantized: dict[str, int]
) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp would; return the float32 values the file holds per HF name
    (dequantized, and in llama.cpp's permuted row order for Llama Q/K)."""
    cfg = model.config
    arch = cfg.model_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    spec = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(add_bos)

    stored = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.detach().numpy().astype(np.float32)
        if _is_permuted(arch, name):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            values = _llama_cpp_permute(values, heads)
        if name in GGUF_GLOBAL:
            gguf_name = GGUF_GLOBAL[name]
        else:
            layer, suffix = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_LAYER[suffix]}"
        if name in quantized:
            blocks = gguf.quants.quantize(values, quantized[name])
            writer.add_tensor(gguf_name, blocks, raw_dtype=quantized[name])
            values = gguf.quants.dequantize(blocks, quantized[name])
        else:
            writer.add_tensor(gguf_name, values)
        stored[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _is_permuted(arch: str, name: str) -> bool:
    return arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight"))


@dataclass
class TinyGGUF:
    family: str
    model: torch.nn.Module
    path: Path
    stored: dict[str, np.ndarray]
    add_bos: bool
    tied: bool


QUANTIZED = {
    "model.layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q8_0,
    "model.layers.1.self_attn.q_proj.weight": gguf.GGMLQuantizationType.Q8_0,
    "model.layers.0.self_attn.k_proj.weight": gguf.GGMLQuantizationType.Q8_0,
}


@pytest.fixture(params=["qwen2", "llama"])
def tiny_gguf(request, tmp_path, bpe_tokenizer) -> TinyGGUF:
    """A tiny GGUF written as llama.cpp would, with some Q8_0 tensors: untied Qwen2, tied Llama."""
    if request.param == "qwen2":
        model, pre, add_bos, tied = _tiny_qwen2(tie=False), "qwen2", False, False
    else:
        model, pre, add_bos, tied = _tiny_llama(tie=True), "llama-bpe", True, True
    path = tmp_path / f"tiny-{request.param}.gguf"
    stored = _write_gguf(path, model, bpe_tokenizer, pre, add_bos, QUANTIZED)
    return TinyGGUF(request.param, model, path, stored, add_bos, tied)


def test_gguf_matches_source(tiny_gguf, bpe_tokenizer):
    model = tiny_gguf.model
    cfg, state, tok = load_checkpoint(tiny_gguf.path)
    assert cfg.arch == tiny_gguf.family
    assert cfg.tie_word_embeddings == tiny_gguf.tied
    assert cfg.attention_bias == (tiny_gguf.family == "qwen2")
    shape = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    assert shape == (2, 64, 4, 2, 16)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.max_position_embeddings) == (VOCAB, 96, 256)
    assert cfg.rms_norm_eps == model.config.rms_norm_eps
    assert cfg.rope_theta == model.config.rope_parameters["rope_theta"]

    reference = _reference_state(model, tiny_gguf.tied)
    assert state.keys() == reference.keys()
    for name, values in tiny_gguf.stored.items():  # exact: what the file holds, dequantized
        loaded = state[name].numpy()
        if _is_permuted(tiny_gguf.family, name):
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            loaded = _llama_cpp_permute(loaded, heads)
        assert np.array_equal(loaded, values), name
    for name in QUANTIZED:  # Q8_0 stays close to the source weights
        torch.testing.assert_close(state[name], reference[name], rtol=0, atol=2e-3)
    for name in reference.keys() - QUANTIZED.keys():
        assert torch.equal(state[name], reference[name]), name

    reference_tok = Tokenizer.from_str(bpe_tokenizer.to_str())
    if tiny_gguf.family == "llama":  # the file says llama-bpe: Llama 3's split, no NFC
        reference_tok.normalizer = None
        reference_tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    bos = bpe_tokenizer.token_to_id("<|endoftext|>")
    for text in SAMPLES:
        ids = tok.encode(text).ids
        if tiny_gguf.add_bos:
            assert ids[0] == bos
            ids = ids[1:]
        assert ids == reference_tok.encode(text).ids, text
        assert tok.decode(ids, skip_special_tokens=False) == reference_tok.decode(
            ids, skip_special_tokens=False
        )


def test_gguf_matches_transformers(tiny_gguf):
    """transformers' own GGUF loader (dequantize, reverse permutation, tokenizer) agrees."""
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights
    path = tiny_gguf.path
    _, state, tok = load_checkpoint(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name
    ).state_dict()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)
    their_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # Ordinary text only: transformers versions disagree on whether their GGUF Llama tokenizer
    # honours tokenizer.ggml.add_bos_token and on the whitespace around special tokens (5.24
    # agrees with us on both, the GPU machine's version on neither); BOS and special tokens are
    # checked against the tokenizers library in the test above.
    for text in (t for t in SAMPLES if "<|" not in t):
        ours = tok.encode(text, add_special_tokens=False).ids
        assert ours == their_tok(text, add_special_tokens=False)["input_ids"], text


# -------------------------------------------------------------------------------------- bad input


@pytest.fixture
def qwen2_dir(tmp_path, bpe_tokenizer) -> Path:
    return _save_hf(_tiny_qwen2(), bpe_tokenizer, tmp_path / "qwen2")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("config.json", "config.json is missing"),
        ("tokenizer.json", "tokenizer.json is missing"),
        ("model.safetensors", "neither model.safetensors nor"),
    ],
)
def test_missing_file_in_dir(qwen2_dir, missing, message):
    (qwen2_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        load_checkpoint(qwen2_dir)


def test_missing_shard(tmp_path, bpe_tokenizer):
    directory = _save_hf(_tiny_llama(), bpe_tokenizer, tmp_path, max_shard_size="50KB")
    (directory / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00006.safetensors"):
        load_checkpoint(directory)


def test_corrupt_safetensors(qwen2_dir):
    weights = qwen2_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors"):
        load_checkpoint(qwen2_dir)


def test_missing_tensor(qwen2_dir):
    from safetensors.torch import load_file, save_file

    weights = qwen2_dir / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.self_attn.v_proj.bias"]
    save_file(state, weights)
    with pytest.raises(
        CheckpointError, match=r"lack 1 tensors.*layers\.1\.self_attn\.v_proj\.bias"
    ):
        load_checkpoint(qwen2_dir)


def test_wrong_tensor_shape(qwen2_dir):
    from safetensors.torch import load_file, save_file

    weights = qwen2_dir / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.down_proj.weight"] = state[
        "model.layers.0.mlp.down_proj.weight"
    ].T.contiguous()
    save_file(state, weights)
    with pytest.raises(
        CheckpointError, match=r"down_proj.weight has shape \(96, 64\), expected \(64, 96\)"
    ):
        load_checkpoint(qwen2_dir)


def test_unsupported_tensor_rejected(qwen2_dir):
    from safetensors.torch import load_file, save_file

    weights = qwen2_dir / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="o_proj.bias"):
        load_checkpoint(qwen2_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"num_hidden_layers": None}, "malformed value"),
    ],
)
def test_bad_config(qwen2_dir, edit, message):
    raw = json.loads((qwen2_dir / "config.json").read_text()) | edit
    (qwen2_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(qwen2_dir)


def test_config_missing_key(qwen2_dir):
    raw = json.loads((qwen2_dir / "config.json").read_text())
    del raw["intermediate_size"]
    (qwen2_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="missing key 'intermediate_size'"):
        load_checkpoint(qwen2_dir)


def test_config_not_json(qwen2_dir):
    (qwen2_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(qwen2_dir)


def test_bad_dtype(qwen2_dir):
    with pytest.raises(CheckpointError, match="dtype must be a floating torch.dtype"):
        load_checkpoint(qwen2_dir, dtype=torch.int8)


@pytest.fixture
def qwen2_gguf(tmp_path, bpe_tokenizer) -> Path:
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, _tiny_qwen2(), bpe_tokenizer, "qwen2", False, {})
    return path


def test_not_a_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a .gguf file"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gguf(qwen2_gguf, damage):
    data = qwen2_gguf.read_bytes()
    qwen2_gguf.write_bytes(b"NOPE" + data[4:] if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="tiny.gguf: not a readable GGUF file"):
        load_checkpoint(qwen2_gguf)


def test_gguf_unsupported_arch(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="general.architecture 'falcon' is not supported"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ check_compatible


def _config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        arch="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=256, attention_bias=True, tie_word_embeddings=False,
    )  # fmt: skip


def test_check_compatible(bpe_tokenizer):
    same = Tokenizer.from_str(bpe_tokenizer.to_str())
    assert check_compatible(_config(VOCAB), bpe_tokenizer, _config(VOCAB + 64), same) == VOCAB


def test_check_compatible_ignores_gguf_padding(bpe_tokenizer):
    padded = Tokenizer.from_str(bpe_tokenizer.to_str())
    padded.add_tokens([f"[PAD{VOCAB + i}]" for i in range(4)])
    assert check_compatible(_config(VOCAB + 4), padded, _config(VOCAB), bpe_tokenizer) == VOCAB


def test_check_compatible_different_vocab(bpe_tokenizer):
    other = Tokenizer.from_str(bpe_tokenizer.to_str())
    other.add_tokens(["<extra>"])
    with pytest.raises(CheckpointError, match=r"tokenizers differ \(300 vs 301 tokens.*'<extra>'"):
        check_compatible(_config(VOCAB + 8), bpe_tokenizer, _config(VOCAB + 8), other)


def test_check_compatible_tokenizer_beyond_model(bpe_tokenizer):
    with pytest.raises(
        CheckpointError,
        match="draft tokenizer has token id 299, beyond the draft model's vocab_size 200",
    ):
        check_compatible(_config(200), bpe_tokenizer, _config(VOCAB), bpe_tokenizer)


# ------------------------------------------------------------------------ the real pair, if cached


@pytest.mark.slow
@pytest.mark.skipif(
    cached_real_pair() is None, reason="real GGUF pair not in the cache (run `dustin fetch`)"
)
def test_real_pair_loads():
    draft_path, target_path = cached_real_pair()
    table = {
        "draft": (24, 896, 14, 2, 64, 4864),
        "target": (28, 1536, 12, 2, 128, 8960),
    }  # models.md
    loaded = {}
    for role, path in (("draft", draft_path), ("target", target_path)):
        cfg, state, tok = load_checkpoint(path, dtype=torch.bfloat16)
        shape = (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        assert shape == table[role]
        assert (cfg.arch, cfg.vocab_size, cfg.max_position_embeddings) == ("qwen2", 151936, 32768)
        assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.attention_bias, cfg.tie_word_embeddings) == (
            1e6,
            1e-6,
            True,
            False,
        )
        assert all(torch.isfinite(t).all() for t in state.values())
        # Known ids of the Qwen2.5 tokenizer.
        assert tok.encode("Hello world<|im_end|>").ids == [9707, 1879, 151645]
        loaded[role] = (cfg, tok)
        del state
    assert check_compatible(*loaded["draft"], *loaded["target"]) == 151936
