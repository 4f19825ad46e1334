# SPDX-License-Identifier: Apache-2.0
"""Llama/Qwen2 decoder whose attention reads a paged KV cache through ``dustin.ops.sparse_verify``.

Two ways through the model:

- ``forward``: a window of up to 16 new tokens per sequence (decoding, drafting, verification).
  Every layer appends the window's keys/values to the cache and attends with ``sparse_verify``
  over the listed blocks (``BlockSelection``) plus the window; no selection lists every block,
  which is dense attention through the same kernel.
- ``prefill``: a long prompt of one sequence. Attention runs dense and causal with PyTorch's
  ``scaled_dot_product_attention`` over the cached prefix plus the new chunk: the ops are built
  for short windows (q <= 16), and a prompt is read once, so a dense prefill costs what it must.

Both can record the post-RoPE queries of chosen (layer, query head) pairs, the retrieval heads
whose attention gives Dustin its scoring signals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dustin import ops
from dustin.cache import PagedKVCache
from dustin.config import ModelConfig

if TYPE_CHECKING:
    from dustin.parallel import TensorParallel

__all__ = ["BlockSelection", "Transformer", "rope_inv_freq"]

MAX_WINDOW = 16  # longest window forward() takes: the ops' q limit on CUDA


@dataclass(frozen=True)
class BlockSelection:
    """Blocks every layer of one verification attends to (besides the window's own blocks).

    ``block_ids`` ``[B, K]`` or ``[B, Hkv, K]`` int32 ascending ids, ``block_counts`` ``[B]`` or
    ``[B, Hkv]`` int32: the ``sparse_verify`` arguments.
    """

    block_ids: torch.Tensor
    block_counts: torch.Tensor


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE (float32 ``[D / 2]``), with the checkpoint's scaling applied.

    Supports no scaling, ``"linear"`` and ``"llama3"`` (Llama 3.1+); other kinds raise.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(
        f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate-half of the last dim: ``(x1, x2) -> (-x2, x1)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim: normalised in float32 as the reference implementations do,
    then cast back and scaled by ``weight``."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, decode: bool, residual: torch.Tensor | None
) -> torch.Tensor:
    """``residual + x @ weight.T`` (no residual: the product alone, e.g. a tensor-parallel
    rank's partial sum): with ``decode``, one ``ops.decode_linear`` where it applies and pays (a
    decode step's at most 16 rows, 16-bit, on CUDA, a weight of at most
    ``DECODE_LINEAR_MAX_WEIGHT_BYTES``), the add fused in; else ``F.linear`` and the add
    apart."""
    if decode and _fits_decode_linear(x, weight):
        return ops.decode_linear(x, weight, residual=residual)
    y = F.linear(x, weight)
    return y if residual is None else residual + y


def _fused_norm(x: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, dict]:
    """x and ``ops.decode_linear``'s arguments for an RMSNorm of it: the norm fused in, or
    applied apart where K is past what the kernel normalises on chip."""
    if x.shape[-1] > ops.DECODE_LINEAR_MAX_NORMED_K:
        return norm(x), {}
    return x, {"norm_weight": norm.weight, "norm_eps": norm.eps}


#: Largest weight the model hands to ``ops.decode_linear``. In bench_e2e (H100, 7B/0.5B, B 16,
#: 2026-12-08) the 0.5B draft's projections (1.6-17.4 MB) through it took the draft phase from
#: 5.37 to 4.93 ms, while the 7B's q/k/v (33 MB) and o (25.7 MB) through it, all larger ones
#: apart, made plain decoding slower (15.59 to 15.83 ms). Weights that large cuBLAS streams
#: faster (bench_decode_linear: the kernel alone 0.76-0.98x on the 7B's), and much of the glue
#: the kernel fuses the compiled model fuses on its own (the bench's compiled peer keeps it
#: apart, so its fused speedups overstate the model's).
DECODE_LINEAR_MAX_WEIGHT_BYTES = 20 << 20


def _fits_decode_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    k = x.shape[-1]
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and k % 8 == 0
        and x.numel() <= ops.DECODE_LINEAR_MAX_ROWS * k
        and weight.numel() * weight.element_size() <= DECODE_LINEAR_MAX_WEIGHT_BYTES
    )


def _fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """One weight (and bias) for linears that read the same input, so that one GEMM computes all
    their outputs; the linears' parameters become views of it, so nothing is stored twice.

    Returns ``(weight, bias, sizes)``: split the GEMM's last dimension by ``sizes``.
    """
    sizes = [m.out_features for m in linears]
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    for m, w, b in zip(
        linears, weight.split(sizes), [None] * len(sizes) if bias is None else bias.split(sizes)
    ):
        m.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b, requires_grad=False)
    return weight, bias, sizes


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias
        )
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None
        self.decode_linear = False  # projections of decode steps through ops.decode_linear

    def fuse_projections(self, decode_linear: bool = False) -> None:
        """q, k and v from one GEMM (``_fuse_linears``); with ``decode_linear``, that GEMM and
        o_proj run as ``ops.decode_linear`` at decode sizes. Do it once the weights are in place:
        moving the module afterwards moves the views, not the fused copy."""
        self.fused_qkv = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        self.decode_linear = decode_linear

    def project(self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor):
        """q ``[B, n, Hq, D]``, k and v ``[B, n, Hkv, D]`` of ``norm(x)``, ``x [B, n, H]``."""
        b, n, _ = x.shape
        rotated = False
        if self.fused_qkv is None:
            x = norm(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            weight, bias, sizes = self.fused_qkv
            # D a multiple of 8: the kernel rotates 4 columns of each half-head per tile.
            rotated = (
                self.decode_linear and self.head_dim % 8 == 0 and _fits_decode_linear(x, weight)
            )
            if rotated:  # one launch: norm, projection, bias and RoPE of q and k
                x, fused = _fused_norm(x, norm)
                rope_columns = (self.num_heads + self.num_kv_heads) * self.head_dim
                qkv = ops.decode_linear(
                    x, weight, bias, **fused, rope=(cos, sin), rope_columns=rope_columns
                )
            else:
                qkv = F.linear(norm(x), weight, bias)
            q, k, v = qkv.split(sizes, dim=-1)
        q = q.view(b, n, self.num_heads, self.head_dim)
        k = k.view(b, n, self.num_kv_heads, self.head_dim)
        v = v.view(b, n, self.num_kv_heads, self.head_dim)
        if not rotated:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        return q, k, v

    def output(self, attn_out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """o_proj of the attention output ``[B, n, Hq * D]`` (plus ``residual``)."""
        return _linear(attn_out, self.o_proj.weight, self.decode_linear, residual)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused_gate_up: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None
        self.decode_linear = False

    def fuse_projections(self, decode_linear: bool = False) -> None:
        """gate and up from one GEMM (``_fuse_linears``), as ``Attention.fuse_projections``; with
        ``decode_linear``, at decode sizes the norm, that GEMM and the activation are one
        ``ops.decode_linear`` (gated), and down_proj with the residual add another."""
        self.fused_gate_up = _fuse_linears(self.gate_proj, self.up_proj)
        self.decode_linear = decode_linear

    def forward(
        self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``residual + MLP(norm(x))`` (no residual: the MLP's output alone)."""
        if self.fused_gate_up is None:
            x = norm(x)
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            weight, _, sizes = self.fused_gate_up
            if self.decode_linear and _fits_decode_linear(x, weight):
                x, fused = _fused_norm(x, norm)
                hidden = ops.decode_linear(x, weight, gated=True, **fused)
            else:
                gate, up = F.linear(norm(x), weight).split(sizes, dim=-1)
                hidden = F.silu(gate) * up
        return _linear(hidden, self.down_proj.weight, self.decode_linear, residual)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # The glue around attention, in pieces ``Transformer.compile_layers`` can compile: at decode
    # sizes each layer is a few dozen tiny kernels, which cost more than its weights' read.
    def attention_input(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v of the residual stream ``h``: RMSNorm, projections, RoPE."""
        return self.self_attn.project(h, self.input_layernorm, cos, sin)

    def mlp_block(self, h: torch.Tensor, attn_sum: torch.Tensor):
        """``(h + attn_sum, MLP output)``: the residual stream after the attention's projected
        output ``attn_sum`` (summed over tensor-parallel ranks) and the MLP's output on it (one
        rank's partial sum under tensor parallelism)."""
        h = h + attn_sum
        return h, self.mlp(h, self.post_attention_layernorm)

    def layer_output(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The residual stream after o_proj of the attention output ``[B, n, Hq * D]`` and the
        MLP, on one rank (no tensor parallelism): one compiled region. Both residual adds go to
        the projections, so at decode sizes the region is three ``ops.decode_linear`` calls."""
        h = self.self_attn.output(attn_out, residual=h)
        return self.mlp(h, self.post_attention_layernorm, residual=h)


class Transformer(nn.Module):
    """A Llama/Qwen2-family decoder. Parameter names follow Hugging Face without ``model.``.

    Build it with ``Transformer.from_state_dict``; ``forward`` and ``prefill`` read and extend a
    ``PagedKVCache`` made by ``new_cache``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch not in ("llama", "qwen2"):
            raise ValueError(f"Transformer: arch must be 'llama' or 'qwen2', got {config.arch!r}")
        if config.num_heads % config.num_kv_heads:
            raise ValueError(
                f"Transformer: num_heads ({config.num_heads}) must be a multiple of num_kv_heads "
                f"({config.num_kv_heads})"
            )
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.sm_scale = config.head_dim**-0.5
        self.inv_freq = rope_inv_freq(config)
        # Set by dustin.parallel.sharded_model: this model holds one rank's share of the heads
        # and MLP columns, and o_proj and down_proj outputs are partial sums over the ranks.
        self.parallel: TensorParallel | None = None
        # Replaced by their compiled versions in compile_layers.
        self._attention_input = DecoderLayer.attention_input
        self._layer_output = DecoderLayer.layer_output
        self._mlp_block = DecoderLayer.mlp_block

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Transformer:
        """The model with Hugging Face-named weights (``model.layers.0.self_attn.q_proj.weight``,
        ..., ``lm_head.weight`` unless embeddings are tied), cast to ``dtype`` on ``device``.

        Raises:
            ValueError: weights are missing, unexpected or of the wrong shape.
        """
        with torch.device("meta"):
            model = cls(config)
        weights = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if config.tie_word_embeddings:
            if "lm_head.weight" in weights:
                raise ValueError(
                    "Transformer: tied embeddings, yet the checkpoint has lm_head.weight"
                )
            weights["lm_head.weight"] = weights.get("embed_tokens.weight")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"Transformer: checkpoint does not match the {config.arch} config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, tensor in weights.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"Transformer: {name} has shape {tuple(tensor.shape)}, the config implies "
                    f"{tuple(expected[name].shape)}"
                )
        cast = {}
        for name, tensor in weights.items():  # tied weights stay one tensor after the cast
            cast.setdefault(id(tensor), tensor.to(device=device, dtype=dtype))
        model.load_state_dict({k: cast[id(v)] for k, v in weights.items()}, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(config).to(device)
        return model.eval().requires_grad_(False)

    def compile_layers(self, backend: str = "inductor", decode_linear: bool = True) -> Transformer:
        """Fewer, fused kernels per layer: q/k/v and gate/up each become one GEMM
        (``fuse_projections``), and the glue around attention (norms, projections, RoPE,
        residual adds, MLP) is compiled with ``torch.compile`` in two regions per layer, and so
        are the RoPE tables and the final norm with the LM head (``logits``). With
        ``decode_linear`` (the default), windows of at most 16 rows in all (decode and draft
        steps) run their projections of weights up to ``DECODE_LINEAR_MAX_WEIGHT_BYTES`` (a
        small draft's, not a 7B's) as ``ops.decode_linear`` on CUDA, each norm fused into the
        projection after it, q/k/v with RoPE, gate/up with its activation, o and down with the
        residual add, so no compiled kernel is left at those sizes; longer windows (prefill,
        wide verification) and larger weights keep cuBLAS and the compiled glue.

        Attention and the cache writes stay outside, so the ops, the block lists and CUDA-graph
        capture work as before. One compiled graph serves every layer (the layers are inputs, not
        constants) and every batch and window size (``dynamic=True``; sizes 1 get their own).
        Compilation happens on the first call of each kind, so warm up before a CUDA-graph
        capture (``GraphDecoder`` does). Call it once the model is on its device. Returns the
        model.

        On a tensor-parallel rank the two all-reduces of a layer stay outside the compiled
        regions (eager collectives, as CUDA-graph capture of NCCL expects): o_proj runs on its
        own, then the compiled residual add, norm and MLP (``DecoderLayer.mlp_block``).
        """
        for layer in self.layers:
            layer.self_attn.fuse_projections(decode_linear)
            layer.mlp.fuse_projections(decode_linear)
        # Both models of a pair, windows of 1 and of gamma + 1, prefill chunks: more variants
        # than the default limit of 8 compiled graphs per function.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._attention_input = torch.compile(
            DecoderLayer.attention_input, dynamic=True, backend=backend
        )
        if self.parallel is None:
            self._layer_output = torch.compile(
                DecoderLayer.layer_output, dynamic=True, backend=backend
            )
        else:
            self._mlp_block = torch.compile(DecoderLayer.mlp_block, dynamic=True, backend=backend)
        # Eager, the RoPE tables and the final norm are a dozen tiny kernels per forward.
        self._rope = torch.compile(self._rope, dynamic=True, backend=backend)
        self.logits = torch.compile(self.logits, dynamic=True, backend=backend)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        token_budget: int | None = None,
        page_size: int = 16,
        layout: str = "HND",
    ) -> PagedKVCache:
        """An empty paged cache shaped for this model (its dtype and device)."""
        c = self.config
        if max_seq_len > c.max_position_embeddings:
            raise ValueError(
                f"max_seq_len ({max_seq_len}) is longer than the model's context "
                f"({c.max_position_embeddings} tokens)"
            )
        return PagedKVCache(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            batch_size,
            max_seq_len,
            token_budget=token_budget,
            page_size=page_size,
            layout=layout,
            dtype=self.dtype,
            device=self.device,
        )

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[B, n, 1, D]`` for integer positions ``[B, n]``."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of final hidden states ``h`` (final norm, then the LM head)."""
        return self.lm_head(self.norm(h)).float()

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: PagedKVCache,
        selection: BlockSelection | None = None,
        record_heads: Mapping[int, torch.Tensor] | None = None,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Appends a window of tokens to every sequence of the cache and returns its logits.

        Args:
            tokens: ``[B, n]`` int64 new tokens, ``n <= 16``, B = the cache's batch size.
            cache: the model's cache; the window is appended at each sequence's end.
            selection: blocks to attend besides the window; None attends every block (dense).
            record_heads: layer -> ``[Hs]`` int64 query heads whose queries to return.
            last_logits_only: compute logits of the window's last token only (``[B, 1, V]``):
                drafting needs no more, and the vocabulary projection is a large read.

        Returns:
            ``(logits [B, n, V] float32, queries)`` with ``queries[layer]`` ``[B, n, Hs, D]``
            post-RoPE, in the cache's dtype.
        """
        batch, n = tokens.shape
        if batch != cache.batch_size:
            raise ValueError(f"forward: tokens has {batch} sequences, the cache {cache.batch_size}")
        if not 1 <= n <= MAX_WINDOW:
            raise ValueError(
                f"forward: windows hold 1..{MAX_WINDOW} tokens, got {n}; use prefill()"
            )
        starts = cache.append(n)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            n, device=self.device
        )
        if selection is None:
            ids, counts = ops.dense_block_lists(
                cache.kv_lens, cache.page_size, cache.max_pages_per_seq
            )
            selection = BlockSelection(ids, counts)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write(layer, k, v)
            out, _ = ops.sparse_verify(
                q,  # any strides: a view of the fused q/k/v projection's output
                cache.k(layer),
                cache.v(layer),
                cache.block_table,
                cache.kv_lens,
                selection.block_ids,
                selection.block_counts,
                self.sm_scale,
                cache.layout,
            )
            return out

        h, queries = self.run_layers(tokens, positions, attend, record_heads)
        return self.logits(h[:, -1:] if last_logits_only else h), queries

    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor,
        cache: PagedKVCache,
        seq: int,
        *,
        chunk_size: int = 4096,
        record_heads: Mapping[int, torch.Tensor] | None = None,
        record_last: int = 0,
        progress=None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Appends a prompt to one sequence, in chunks, with dense causal attention (SDPA).

        Args:
            tokens: ``[n]`` int64 prompt tokens.
            cache: the model's cache; sequence ``seq`` grows by n tokens.
            seq: which sequence of the cache.
            chunk_size: tokens per forward pass (bounds activation memory).
            record_heads: layer -> ``[Hs]`` query heads whose queries to return.
            record_last: how many of the last positions' queries to return.
            progress: optional callable receiving the number of tokens done after each chunk.

        Returns:
            ``(logits [V] float32 of the last token, queries)``, ``queries[layer]``
            ``[record_last, Hs, D]``.
        """
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(
                f"prefill: tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}"
            )
        if not 0 <= record_last <= min(chunk_size, tokens.numel()):
            raise ValueError(
                f"prefill: record_last must be in [0, min(chunk_size, prompt length)] = "
                f"[0, {min(chunk_size, tokens.numel())}], got {record_last}"
            )
        kept: dict[int, list[torch.Tensor]] = {}
        for begin in range(0, tokens.numel(), chunk_size):
            chunk = tokens[begin : begin + chunk_size].to(self.device)[None]
            (start,) = cache.append(chunk.shape[1], [seq])
            positions = start + torch.arange(chunk.shape[1], device=self.device)[None]

            def attend(layer, q, k, v, start=start) -> torch.Tensor:  # start: this chunk's
                cache.write(layer, k, v)
                keys, values = cache.gather(layer, seq)  # [Hkv, start + n, D]
                mask = None
                if start:  # query i at start + i sees keys 0..start + i
                    mask = torch.ones(q.shape[1], keys.shape[1], dtype=torch.bool, device=q.device)
                    mask = mask.tril(diagonal=start)
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    keys[None],
                    values[None],
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=self.sm_scale,
                    enable_gqa=True,
                )
                return out.transpose(1, 2)

            h, queries = self.run_layers(chunk, positions, attend, record_heads, record_last)
            for layer, q in queries.items():
                kept[layer] = (kept.get(layer, []) + [q[0]])[-2:]  # two chunks cover record_last
            if progress is not None:
                progress(chunk.shape[1])
        queries = {}
        for layer, parts in kept.items():
            recent = torch.cat(parts)
            queries[layer] = recent[recent.shape[0] - record_last :]
        return self.logits(h[0, -1]), queries

    def run_layers(self, tokens, positions, attend, record_heads, record_last=None):
        """Embedding and decoder layers; ``attend(layer, q, k, v)`` supplies the attention.

        The extension point of ``forward``, ``prefill`` and of callers with their own cache
        handling (``dustin.fast.forward_window``, ``dustin.evaluate.forward_per_layer``):
        ``positions`` ``[B, n]`` are the tokens' absolute positions (for RoPE), and ``attend``
        returns ``[B, n, Hq, D]``. Returns ``(h, queries)``: final hidden states ``[B, n, H]``
        (``logits`` turns them into logits) and the recorded queries by layer.

        Records the queries of ``record_heads`` at the last ``record_last`` positions (all when
        None), so a long prefill keeps only what scoring needs.
        """
        first = 0 if record_last is None else max(0, tokens.shape[1] - record_last)
        cos, sin = self._rope(positions)
        h = self.embed_tokens(tokens)
        queries = {}
        for index, layer in enumerate(self.layers):
            q, k, v = self._attention_input(layer, h, cos, sin)
            if record_heads and index in record_heads:
                queries[index] = q[:, first:, record_heads[index]].to(self.dtype)
            out = attend(index, q, k, v).reshape(*h.shape[:2], -1)
            if self.parallel is None:
                h = self._layer_output(layer, h, out)
            else:  # o_proj and down_proj give partial sums over the ranks: one all-reduce each
                attn_sum = self.parallel.all_reduce(layer.self_attn.output(out))
                h, mlp_out = self._mlp_block(layer, h, attn_sum)
                h = h + self.parallel.all_reduce(mlp_out)
        return h, queries
