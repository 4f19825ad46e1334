# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism of the target over ranks of a ``torch.distributed`` group (gloo or NCCL).

Each rank holds a contiguous share of the KV heads and the query heads that read them, so a
rank's attention, paged cache and retrieval-head scoring need nothing from the others:

- q/k/v projections (and their Qwen2 biases) split by KV-head group, ``o_proj`` by its input
  columns; MLP ``gate_proj``/``up_proj`` split by output rows, ``down_proj`` by input columns;
  the partial outputs of ``o_proj`` and ``down_proj`` are summed by one all-reduce each
  (``Transformer.parallel``, used in ``Transformer.run_layers``);
- embeddings, norms and ``lm_head`` are replicated: every rank then computes the same full
  logits with no gather, and acceptance, sampling and cache bookkeeping run identically on
  every rank (same inputs, same seed) with nothing to broadcast;
- the draft is not split: every rank runs all of it (it is small), so lookahead scores are the
  same on every rank;
- history scores: a retrieval head is scored on the rank holding its KV head (its query and its
  keys are both there); the partial ``[B, NB]`` scores are summed by one all-reduce, so every
  rank selects the same blocks from the same scores. Selection is computed redundantly on every
  rank rather than on rank 0 and broadcast: ``select_blocks`` is cheap, deterministic, and its
  outputs' shapes would otherwise need a second message.

Launch with ``torchrun --nproc-per-node N``; ``init_from_env`` reads torchrun's variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from dustin.config import ModelConfig
from dustin.model import Transformer

__all__ = ["TensorParallel", "init_from_env", "shard_state_dict", "sharded_model"]


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in a tensor-parallel group.

    ``config`` is the whole model's; the rank's model is built from ``local_config``.
    """

    config: ModelConfig
    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        c, n = self.config, self.world_size
        if not 0 <= self.rank < n:
            raise ValueError(f"TensorParallel: rank must be in [0, {n}), got {self.rank}")
        for name, value in (
            ("num_kv_heads", c.num_kv_heads),
            ("intermediate_size", c.intermediate_size),
        ):
            if value % n:
                raise ValueError(
                    f"TensorParallel: the model's {name} ({value}) must be a multiple of the "
                    f"tensor-parallel size ({n})"
                )

    @property
    def local_config(self) -> ModelConfig:
        """The rank's share: its query and KV heads and MLP columns (head_dim unchanged)."""
        c, n = self.config, self.world_size
        return replace(
            c,
            num_heads=c.num_heads // n,
            num_kv_heads=c.num_kv_heads // n,
            intermediate_size=c.intermediate_size // n,
        )

    @property
    def first_head(self) -> int:
        """Global index of the rank's first query head."""
        return self.rank * self.local_config.num_heads

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``partial`` (in place), the same on every rank."""
        dist.all_reduce(partial, group=self.group)
        return partial

    def local_heads(self, heads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """layer -> ``[Hs]`` global query heads, reduced to those of this rank and renumbered
        from its first head; layers with none here are left out."""
        first, count = self.first_head, self.local_config.num_heads
        local = {}
        for layer, ids in heads.items():
            mine = ids[(ids >= first) & (ids < first + count)] - first
            if mine.numel():
                local[layer] = mine
        return local


def init_from_env(tp: int, device: str) -> tuple[int, int]:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    NCCL on CUDA (each rank on GPU LOCAL_RANK, NVLink multicast off: ``NCCL_NVLS_ENABLE=0``
    unless set), gloo on CPU.

    Returns:
        ``(rank, world_size)``.

    Raises:
        ValueError: not started by torchrun, or its world size is not ``tp``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"--tp {tp}: start the command with `torchrun --nproc-per-node {tp} -m dustin ...` "
            "(RANK and WORLD_SIZE are not set)"
        )
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != tp:
        raise ValueError(f"--tp {tp}: torchrun started {world_size} processes; they must match")
    if device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), world_size


def shard_state_dict(
    parallel: TensorParallel, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The rank's share of Hugging Face-named weights.

    Split tensors are contiguous copies, so the whole checkpoint can be freed once the model is
    built; replicated ones (embeddings, norms, ``lm_head``) are the given tensors.
    """
    local = parallel.local_config
    rank = parallel.rank
    rows = {  # weight (or bias) -> rows of the rank's share along dim 0
        "self_attn.q_proj": local.num_heads * local.head_dim,
        "self_attn.k_proj": local.num_kv_heads * local.head_dim,
        "self_attn.v_proj": local.num_kv_heads * local.head_dim,
        "mlp.gate_proj": local.intermediate_size,
        "mlp.up_proj": local.intermediate_size,
    }
    columns = {  # weight -> columns of the rank's share along dim 1
        "self_attn.o_proj": local.num_heads * local.head_dim,
        "mlp.down_proj": local.intermediate_size,
    }
    out = {}
    for name, tensor in state_dict.items():
        # "model.layers.0.mlp.up_proj.weight" -> "mlp.up_proj"
        module = ".".join(name.split(".")[-3:-1])
        if module in rows:
            size = rows[module]
            out[name] = tensor[rank * size : (rank + 1) * size].clone()
        elif module in columns:
            size = columns[module]
            out[name] = tensor[:, rank * size : (rank + 1) * size].contiguous()
        else:
            out[name] = tensor
    return out


def sharded_model(
    parallel: TensorParallel,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Transformer:
    """The rank's ``Transformer`` (``config`` is its ``local_config``), summing across ranks.

    Only the rank's share is cast and moved to ``device``.
    """
    model = Transformer.from_state_dict(
        parallel.local_config, shard_state_dict(parallel, state_dict), dtype=dtype, device=device
    )
    model.parallel = parallel
    return model
