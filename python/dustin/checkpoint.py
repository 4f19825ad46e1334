# SPDX-License-Identifier: Apache-2.0
"""Load Llama/Qwen2 checkpoints (Hugging Face directories or GGUF files) into Hugging Face naming.

Both formats give the same triple: a ``ModelConfig``, a state dict with Hugging Face tensor names
(``model.layers.{i}.self_attn.q_proj.weight`` ...; no ``lm_head.weight`` when embeddings are tied)
and a ``tokenizers.Tokenizer``. GGUF tensors are dequantized exactly with ``gguf.quants`` and
converted to the requested dtype one at a time, so peak memory stays near the final state dict.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE
from tqdm import tqdm

from dustin.config import ModelConfig

SUPPORTED_ARCHS = ("llama", "qwen2")

# Pre-tokenizer split patterns of the byte-level BPE vocabularies, keyed by GGUF `tokenizer.ggml.pre`
# (the same patterns as the models' own tokenizer.json files).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
_GGUF_NFC_PRES = {"qwen2"}  # Qwen2's tokenizer.json normalizes to NFC; Llama 3's does not
_GGUF_TOKEN_CONTROL = 3  # llama.cpp token types: special tokens such as <|endoftext|>
_GGUF_TOKEN_USER_DEFINED = 4  # added tokens matched whole but not special, such as <tool_call>
_GGUF_PAD_TOKEN = re.compile(r"\[PAD(\d+)\]")  # llama.cpp's filler for unused embedding rows

# Hugging Face layer tensor suffix -> GGUF suffix under blk.{i}.
_GGUF_LAYER_NAMES = {
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
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class CheckpointError(ValueError):
    """A checkpoint is corrupt, incomplete, unsupported, or incompatible with its partner."""


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Load a Llama/Qwen2 checkpoint.

    Args:
      path: a Hugging Face checkpoint directory (config.json, model.safetensors or a sharded
        model.safetensors.index.json, tokenizer.json) or a ``.gguf`` file.
      dtype: floating dtype of the returned tensors (each tensor is converted as it is read).
      progress: show a progress bar over tensors.

    Returns:
      (config, state_dict, tokenizer). state_dict maps Hugging Face names to CPU tensors of the
      shapes Hugging Face uses ([out_features, in_features] for projections); ``lm_head.weight`` is
      absent when ``config.tie_word_embeddings``.

    Raises:
      FileNotFoundError: ``path`` or a file the checkpoint needs does not exist.
      CheckpointError: a file is corrupt or lacks a tensor or key, a tensor has the wrong shape, or
        the architecture or tokenizer kind is not supported.
    """
    path = Path(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"load_checkpoint: dtype must be a floating torch.dtype, got {dtype!r}"
        )
    if path.is_dir():
        return _load_hf_dir(path, dtype, progress)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(
                f"load_checkpoint: {path} is a file but not a .gguf file; expected a GGUF file or a "
                "Hugging Face checkpoint directory"
            )
        return _load_gguf(path, dtype, progress)
    raise FileNotFoundError(
        f"load_checkpoint: {path} does not exist; expected a Hugging Face checkpoint directory or a "
        ".gguf file"
    )


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a checkpoint of ``cfg`` must provide."""
    hidden, q_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    kv_dim, ffn = cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, hidden)}
    for i in range(cfg.num_layers):
        layer = {
            "input_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q_dim, hidden),
            "self_attn.k_proj.weight": (kv_dim, hidden),
            "self_attn.v_proj.weight": (kv_dim, hidden),
            "self_attn.o_proj.weight": (hidden, q_dim),
            "post_attention_layernorm.weight": (hidden,),
            "mlp.gate_proj.weight": (ffn, hidden),
            "mlp.up_proj.weight": (ffn, hidden),
            "mlp.down_proj.weight": (hidden, ffn),
        }
        if cfg.attention_bias:
            layer |= {
                "self_attn.q_proj.bias": (q_dim,),
                "self_attn.k_proj.bias": (kv_dim,),
                "self_attn.v_proj.bias": (kv_dim,),
            }
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    shapes["model.norm.weight"] = (hidden,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    return shapes


def check_compatible(
    draft_cfg: ModelConfig, draft_tok: Tokenizer, target_cfg: ModelConfig, target_tok: Tokenizer
) -> int:
    """Check that a draft model can propose tokens for a target model; return the shared vocab size.

    The two must map every token string to the same id. llama.cpp's ``[PADn]`` fillers for unused
    embedding rows are ignored, and the models' vocab sizes (embedding rows) may differ, as in
    Qwen2.5-0.5B (151,936) drafting for Qwen2.5-7B (152,064): only ids below the returned size
    are shared, and both tokenizers' ids lie below it.

    Raises:
      CheckpointError: the vocabularies differ (names the first differing ids), or a tokenizer has
        ids beyond its model's embedding rows.
    """
    vocabs = {}
    for role, cfg, tok in (("draft", draft_cfg, draft_tok), ("target", target_cfg, target_tok)):
        vocab = {
            token: index
            for token, index in tok.get_vocab(with_added_tokens=True).items()
            if not ((m := _GGUF_PAD_TOKEN.fullmatch(token)) and int(m.group(1)) == index)
        }
        if vocab and max(vocab.values()) >= cfg.vocab_size:
            raise CheckpointError(
                f"check_compatible: the {role} tokenizer has token id {max(vocab.values())}, beyond "
                f"the {role} model's vocab_size {cfg.vocab_size}"
            )
        vocabs[role] = vocab
    if vocabs["draft"] != vocabs["target"]:
        draft_ids = {index: token for token, index in vocabs["draft"].items()}
        target_ids = {index: token for token, index in vocabs["target"].items()}
        differing = sorted(
            i for i in draft_ids.keys() | target_ids.keys() if draft_ids.get(i) != target_ids.get(i)
        )
        examples = ", ".join(
            f"id {i}: draft {draft_ids.get(i)!r} vs target {target_ids.get(i)!r}"
            for i in differing[:3]
        )
        raise CheckpointError(
            "check_compatible: draft and target tokenizers differ "
            f"({len(vocabs['draft'])} vs {len(vocabs['target'])} tokens, {len(differing)} ids "
            f"differ; {examples}); speculative decoding needs one shared vocabulary"
        )
    return min(draft_cfg.vocab_size, target_cfg.vocab_size)


# --------------------------------------------------------------------------- Hugging Face directories


def _load_hf_dir(
    directory: Path, dtype: torch.dtype, progress: bool
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    from safetensors import SafetensorError, safe_open

    cfg = _hf_config(_read_json(directory / "config.json", "the model configuration"))
    tokenizer = _hf_tokenizer(directory / "tokenizer.json")
    shard_of = _hf_shards(directory)

    shapes = expected_tensor_shapes(cfg)
    missing = [name for name in shapes if name not in shard_of]
    if missing:
        raise CheckpointError(
            f"{directory}: the safetensors files lack {len(missing)} tensors the {cfg.arch} config "
            f"needs, e.g. {missing[:3]}"
        )
    _reject_unused(shard_of.keys() - shapes.keys() - _hf_ignored_tensors(cfg), directory)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(shard_of[name], []).append(name)
    bar = tqdm(
        total=len(shapes), desc=f"load {directory.name}", unit="tensor", disable=not progress
    )
    with bar:
        for file, names in by_file.items():
            if not file.is_file():
                raise FileNotFoundError(f"{file}: safetensors shard listed in the index is missing")
            try:
                with safe_open(file, framework="pt") as shard:
                    for name in names:
                        state[name] = _checked(
                            shard.get_tensor(name), name, shapes[name], file, dtype
                        )
                        bar.update()
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise CheckpointError(f"{file}: corrupt safetensors file ({exc})") from exc
    return cfg, {name: state[name] for name in shapes}, tokenizer


def _hf_ignored_tensors(cfg: ModelConfig) -> set[str]:
    # Buffers some exporters save (recomputed from the config), and a duplicate of tied embeddings.
    ignored = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.num_layers)}
    return ignored | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())


def _reject_unused(unused: set[str], source: Path) -> None:
    # A tensor this loader does not place (an o_proj or MLP bias, a sliding-window mask) would
    # change the model's outputs; refusing the checkpoint is better than silently dropping it.
    if unused:
        raise CheckpointError(
            f"{source}: has {len(unused)} tensors this Llama/Qwen2 loader does not support, "
            f"e.g. {sorted(unused)[:3]}"
        )


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected {what} (JSON)")
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); expected {what}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object with {what}, got {type(value).__name__}"
        )
    return value


def _hf_config(raw: dict) -> ModelConfig:
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"config.json: model_type {arch!r} is not supported; expected one of {SUPPORTED_ARCHS}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"config.json: hidden_act {raw['hidden_act']!r} is not supported; expected 'silu'"
        )
    if arch == "llama" and (raw.get("attention_bias") or raw.get("mlp_bias")):
        raise CheckpointError(
            "config.json: Llama attention_bias/mlp_bias (biases on o_proj and the MLP) are not supported"
        )
    if arch == "qwen2" and raw.get("use_sliding_window"):
        raise CheckpointError("config.json: Qwen2 use_sliding_window=true is not supported")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        # transformers >= 5 writes rope_theta and the scaling into one rope_parameters dict.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(raw.get("rope_theta", rope.pop("rope_theta", 10000.0)))
        rope.pop("rope_theta", None)
        if "type" in rope:  # the pre-2024 spelling of rope_type
            rope["rope_type"] = rope.pop("type")
        rope_type = rope.get("rope_type", "default")
        return ModelConfig(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw["rms_norm_eps"]),
            rope_theta=rope_theta,
            max_position_embeddings=int(raw["max_position_embeddings"]),
            attention_bias=arch == "qwen2",  # Qwen2 always has q/k/v biases
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_scaling=None if rope_type == "default" else rope,
        )
    except KeyError as exc:
        raise CheckpointError(
            f"config.json: missing key {exc.args[0]!r} needed by a {arch} model"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: malformed value ({exc})") from exc


def _hf_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; expected the tokenizer (tokenizers' tokenizer.json)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from exc


def _hf_shards(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single model file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of tensor name -> file")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{directory} has neither model.safetensors nor model.safetensors.index.json; expected "
            "the weights as safetensors"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{single}: corrupt safetensors file ({exc})") from exc


def _checked(
    tensor: torch.Tensor, name: str, shape: tuple[int, ...], file: Path, dtype: torch.dtype
) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(
            f"{file}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}"
        )
    return tensor.to(dtype)


# --------------------------------------------------------------------------------------- GGUF files


def _load_gguf(
    path: Path, dtype: torch.dtype, progress: bool
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct.error/IndexError on damaged files
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    tensors = {t.name: t for t in reader.tensors}
    cfg = _gguf_config(reader, tensors, path)
    tokenizer = _gguf_tokenizer(reader, path)

    shapes = expected_tensor_shapes(cfg)
    _reject_unused(tensors.keys() - {_gguf_name(name) for name in shapes}, path)
    state: dict[str, torch.Tensor] = {}
    for name, shape in tqdm(
        shapes.items(), desc=f"load {path.name}", unit="tensor", disable=not progress
    ):
        gguf_name = _gguf_name(name)
        if gguf_name not in tensors:
            raise CheckpointError(f"{path}: tensor {gguf_name} (for {name}) is missing")
        source = tensors[gguf_name]
        try:
            values = gguf.quants.dequantize(source.data, source.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(
                f"{path}: tensor {gguf_name} uses {source.tensor_type.name}, which gguf cannot dequantize"
            ) from exc
        if values.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {gguf_name} has shape {values.shape}, expected {shape}"
            )
        if cfg.arch == "llama" and name.endswith(
            ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")
        ):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            values = _unpermute_rope_rows(values, heads)
        # OWNDATA forces a copy out of the file's memory map (F32 tensors are returned as views).
        state[name] = torch.from_numpy(np.require(values, np.float32, ["C", "O", "W"])).to(dtype)
    return cfg, state, tokenizer


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    layer, suffix = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name).groups()
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[suffix]}"


def _unpermute_rope_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama Q/K row permutation (rotate-half pairs -> interleaved pairs).

    llama.cpp's converter reorders each head's rows from Hugging Face's [first half, second half]
    RoPE layout to interleaved pairs; this is its inverse.
    """
    rows = values.shape[0]
    return (
        values.reshape(heads, rows // heads // 2, 2, *values.shape[1:])
        .swapaxes(1, 2)
        .reshape(values.shape)
    )


def _gguf_field(reader, key: str, path: Path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CheckpointError(f"{path}: metadata key {key} is missing")
        return default
    return field.contents()


def _float32_decimal(value: float) -> float:
    # GGUF stores floats as float32; the shortest decimal that round-trips (1e-06, not
    # 9.99999997e-07) is the value the model was configured with.
    return float(str(np.float32(value)))


def _gguf_config(reader, tensors: dict, path: Path) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: general.architecture {arch!r} is not supported; expected one of {SUPPORTED_ARCHS}"
        )
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(
            f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1+ scaling) are not "
            "supported for GGUF; load the Hugging Face checkpoint directory instead"
        )
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")

    def key(name, default=None):
        return _gguf_field(reader, f"{arch}.{name}", path, default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type == "none":
        rope_scaling = None
    elif scaling_type == "linear":
        rope_scaling = {
            "rope_type": "linear",
            "factor": _float32_decimal(key("rope.scaling.factor")),
        }
    elif scaling_type == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": _float32_decimal(key("rope.scaling.factor")),
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
        }
    else:
        raise CheckpointError(f"{path}: {arch}.rope.scaling.type {scaling_type!r} is not supported")
    return ModelConfig(
        arch=arch,
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes list columns first
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=_float32_decimal(key("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_decimal(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length")),
        attention_bias="blk.0.attn_q.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        rope_scaling=rope_scaling,
    )


def _gguf_tokenizer(reader, path: Path) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer that the file's tokenizer.ggml.* metadata describes."""
    model = _gguf_field(reader, "tokenizer.ggml.model", path)
    pre = _gguf_field(reader, "tokenizer.ggml.pre", path, "default")
    if model != "gpt2" or pre not in _GGUF_PRE_SPLITS:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model {model!r} with pre-tokenizer {pre!r} is not supported; "
            f"expected 'gpt2' (byte-level BPE) with one of {sorted(_GGUF_PRE_SPLITS)}"
        )
    tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens", path))
    merges = [
        tuple(merge.split(" ", 1)) for merge in _gguf_field(reader, "tokenizer.ggml.merges", path)
    ]
    types = list(_gguf_field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens)))
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries, expected one per token ({len(tokens)})"
        )
    tokenizer = Tokenizer(
        BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=merges,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    if pre in _GGUF_NFC_PRES:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_GGUF_PRE_SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == _GGUF_TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types)
            if k == _GGUF_TOKEN_USER_DEFINED
        ]
    )
    post = [processors.ByteLevel(trim_offsets=False)]
    if _gguf_field(reader, "tokenizer.ggml.add_bos_token", path, False):
        bos_id = int(_gguf_field(reader, "tokenizer.ggml.bos_token_id", path))
        bos = tokens[bos_id]
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        )
    tokenizer.post_processor = processors.Sequence(post)
    return tokenizer
