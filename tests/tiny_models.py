# SPDX-License-Identifier: Apache-2.0
"""Tiny random Llama/Qwen2 checkpoints made with ``transformers`` for the engine tests.

Each is saved with ``save_pretrained`` plus a word-level ``tokenizer.json`` and loaded back through
``dustin.checkpoint.load_checkpoint``, so the tests run the same path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from dustin.checkpoint import load_checkpoint
from dustin.model import Transformer
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 96  # tokens of the tiny tokenizer; models have a few more embedding rows

SHAPES = {  # name -> (layers, hidden, ffn, q heads, kv heads)
    "target": (3, 64, 128, 4, 2),
    "draft": (2, 32, 64, 4, 1),
}


def tiny_tokenizer(vocab: int = VOCAB) -> Tokenizer:
    """A whitespace word-level tokenizer over ``w0 .. w{vocab-1}``."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def save_tiny(
    directory: Path,
    family: str,
    role: str = "target",
    seed: int = 0,
    vocab_size: int = VOCAB + 4,
    tokenizer: Tokenizer | None = None,
    noise: float = 0.0,
    **overrides,
) -> Path:
    """Writes a random ``family`` ("llama" | "qwen2") checkpoint of the ``role``'s shape.

    ``noise`` > 0 perturbs the weights drawn from ``seed`` by that relative amount (fresh random
    numbers): a draft made so agrees with its target often but not always, which exercises
    partial acceptance.
    """
    layers, hidden, ffn, heads, kv_heads = SHAPES[role]
    torch.manual_seed(seed)
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    # Random init of this size gives near-uniform logits; sharper ones make greedy choices and
    # acceptance depend on the weights, as in a trained model.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        generator = torch.Generator().manual_seed(seed + 1000)
        for p in model.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
    model.save_pretrained(directory)
    (tokenizer or tiny_tokenizer()).save(str(directory / "tokenizer.json"))
    return directory


def load_tiny(directory: Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """The dustin model of a checkpoint written by ``save_tiny``."""
    config, state_dict, _ = load_checkpoint(directory)
    return Transformer.from_state_dict(config, state_dict, dtype=dtype)


def reference_model(directory: Path):
    """``transformers``' float32 model of the same checkpoint."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def reference_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """``transformers``' float32 logits ``[B, n, V]`` of the same checkpoint."""
    with torch.no_grad():
        return reference_model(directory)(tokens).logits
