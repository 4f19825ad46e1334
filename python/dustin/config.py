# SPDX-License-Identifier: Apache-2.0
"""Model configuration shared by the checkpoint loaders and the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama/Qwen2-family decoder, as read from a checkpoint."""

    arch: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool  # q/k/v projections carry biases (qwen2)
    tie_word_embeddings: bool
    rope_scaling: dict | None = None  # Hugging Face's rope_scaling dict, e.g. {"rope_type": "llama3", ...}
