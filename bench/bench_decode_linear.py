# SPDX-License-Identifier: Apache-2.0
"""decode_linear against cuBLAS (torch.nn.functional.linear), same run: the projections of a
decode step at M = 1, 8 and 16 rows for the Qwen2.5-0.5B draft, Qwen2.5-Coder-1.5B and
Qwen2.5-7B, bf16.

Per model: q/k/v fused (with bias), o, gate/up fused (gated: dustin also applies silu(gate) * up;
the peer is the GEMM alone, its best case), down, and the LM head (Qwen2.5's 151936 rows: the
model keeps cuBLAS for it, which this row checks). Bytes are the weight read once (plus x and y).
The fused columns time each projection with the layer glue it takes in the model: the RMSNorm
before q/k/v and gate/up (where K allows it), RoPE of q and k, the residual add after o and
down; their peer is the same glue compiled with torch.compile around F.linear, as
``compile_layers`` runs it without decode_linear.
Every call reads another copy of the weight, enough copies that none is in the 50 MB L2 when it
is read again, as in a decode step whose layers each have their own weights.

    python3 bench/bench_decode_linear.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dustin  # noqa: F401  (registers torch.ops.dustin)
from dustin import ops
from dustin.config import ModelConfig
from dustin.model import rms_norm, rotate_half

from bench.bench_e2e import DRAFT_0_5B, PAIRS
from bench.common import (
    L2_ROTATE_BYTES,
    Report,
    ceiling_note,
    pct_of_ceiling,
    rotating,
    tbps,
    time_cuda,
)

DTYPE = torch.bfloat16
# The shapes bench_e2e runs.
MODELS = {
    "qwen2.5-0.5b": DRAFT_0_5B,
    "qwen2.5-coder-1.5b": PAIRS["qwen2.5-coder-1.5b/0.5b"][0],
    "qwen2.5-7b": PAIRS["qwen2.5-7b/0.5b"][0],
}


def projections(config: ModelConfig):
    """(name, N, K, bias, gated) of one layer's projections, and the LM head."""
    hidden, head_dim = config.hidden_size, config.head_dim
    qkv = (config.num_heads + 2 * config.num_kv_heads) * head_dim
    return [
        ("qkv", qkv, hidden, config.attention_bias, False),
        ("o", hidden, config.num_heads * head_dim, False, False),
        ("gate_up", 2 * config.intermediate_size, hidden, False, True),
        ("down", hidden, config.intermediate_size, False, False),
        ("lm_head", config.vocab_size, hidden, False, False),
    ]


def time_both(x, weights, bias, gated, glue=None):
    """Timings of decode_linear and of F.linear, each call on the next copy of the weight; with
    ``glue`` (decode_linear's keyword arguments, from ``model_glue``) both take it: fused into
    decode_linear, compiled around F.linear."""
    glue = glue or {}
    dustin_calls = [
        functools.partial(ops.decode_linear, x, w, bias, gated, **glue) for w in weights
    ]
    if glue:
        peer_calls = [functools.partial(peer_glue, x, w, bias, gated, **glue) for w in weights]
    else:
        peer_calls = [functools.partial(F.linear, x, w, bias) for w in weights]
    return time_cuda(rotating(dustin_calls), reps=9), time_cuda(rotating(peer_calls), reps=9)


@torch.compile(dynamic=True)
def peer_glue(
    x,
    weight,
    bias,
    gated,
    norm_weight=None,
    norm_eps=1e-6,
    residual=None,
    rope=None,
    rope_columns=0,
):
    """F.linear with the model's glue around it (and the activation when gated), as compiled
    without decode_linear."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, norm_eps)
    y = F.linear(x, weight, bias)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if rope is not None:
        cos, sin = rope
        heads = y[:, :rope_columns].unflatten(1, (-1, cos.shape[-1]))
        heads = heads * cos[:, None] + rotate_half(heads) * sin[:, None]
        y = torch.cat((heads.flatten(1), y[:, rope_columns:]), dim=-1)
    return y if residual is None else residual + y


def model_glue(config: ModelConfig, proj, rows, k, columns, gen):
    """decode_linear's keyword arguments for the glue the model fuses into this projection
    (for the LM head: the final norm, which it would fuse)."""
    if proj in ("o", "down"):
        return {"residual": torch.randn(rows, columns, device="cuda", generator=gen).to(DTYPE)}
    glue = {}
    if k <= ops.DECODE_LINEAR_MAX_NORMED_K:
        glue["norm_weight"] = torch.rand(k, device="cuda", generator=gen).add_(0.5).to(DTYPE)
        glue["norm_eps"] = config.rms_norm_eps
    if proj == "qkv":
        head_dim = config.head_dim
        angles = torch.rand(rows, head_dim // 2, device="cuda", generator=gen) * 1000
        angles = torch.cat((angles, angles), dim=-1)
        glue["rope"] = (angles.cos().to(DTYPE), angles.sin().to(DTYPE))
        glue["rope_columns"] = (config.num_heads + config.num_kv_heads) * head_dim
    return glue


def glue_label(glue):
    names = {"norm_weight": "norm", "residual": "residual", "rope": "rope"}
    return "+".join(names[key] for key in glue if key in names) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M = 16 only")
    args = parser.parse_args()
    row_counts = [16] if args.quick else [16, 1, 8]

    report = Report(
        "decode_linear",
        [
            "model",
            "proj",
            "M",
            "N",
            "K",
            "weight_MB",
            "dustin_us",
            "dustin_TBps",
            "pct_ceiling",
            "cublas_us",
            "cublas_TBps",
            "speedup",
            "glue",
            "fused_us",
            "peer_glue_us",
            "fused_speedup",
        ],
    )
    report.notes.append(
        "bf16; bytes = weight + x + y once; peer = F.linear (cuBLAS), for "
        "gate_up without the silu(gate) * up that dustin fuses"
    )
    report.notes.append(
        "glue: what the model fuses into the projection (norm: the RMSNorm before it, past K 2048 "
        "none; rope: RoPE of q and k; residual: the add after it); fused_us = decode_linear with it, "
        "peer_glue_us = the same glue and F.linear (for gate_up with silu(gate) * up) under "
        "torch.compile"
    )
    report.notes.append(f"weights rotated over >= {L2_ROTATE_BYTES >> 20} MB of copies (cold L2)")
    report.notes.append(ceiling_note())
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model, rows in itertools.product(MODELS, row_counts):
        for proj, n, k, has_bias, gated in projections(MODELS[model]):
            weight_bytes = n * k * 2
            copies = max(2, -(-L2_ROTATE_BYTES // weight_bytes))
            weights = [
                torch.randn(n, k, device="cuda", generator=gen).mul_(k**-0.5).to(DTYPE)
                for _ in range(copies)
            ]
            bias = torch.randn(n, device="cuda", generator=gen).to(DTYPE) if has_bias else None
            x = torch.randn(rows, k, device="cuda", generator=gen).to(DTYPE)

            expected = F.linear(
                x.float(), weights[0].float(), None if bias is None else bias.float()
            )
            if gated:
                gate, up = expected.chunk(2, dim=-1)
                expected = F.silu(gate) * up
            got = ops.decode_linear(x, weights[0], bias, gated=gated).float()
            err = ((got - expected).norm() / expected.norm()).item()
            assert err < 1e-2, f"{model} {proj} M={rows}: relative error {err:.2e}"

            out_columns = n // 2 if gated else n
            moved = weight_bytes + rows * (k + out_columns) * 2
            ours, peer = time_both(x, weights, bias, gated)
            glue = model_glue(MODELS[model], proj, rows, k, out_columns, gen)
            fused = peer_fused = None
            if glue:
                fused, peer_fused = time_both(x, weights, bias, gated, glue)
            report.add(
                model=model,
                proj=proj,
                M=rows,
                N=n,
                K=k,
                weight_MB=weight_bytes / 1e6,
                dustin_us=ours.best_us,
                dustin_TBps=tbps(moved, ours.best_us),
                pct_ceiling=pct_of_ceiling(moved, ours.best_us),
                cublas_us=peer.best_us,
                cublas_TBps=tbps(moved, peer.best_us),
                speedup=peer.best_us / ours.best_us,
                glue=glue_label(glue),
                fused_us=None if fused is None else fused.best_us,
                peer_glue_us=None if peer_fused is None else peer_fused.best_us,
                fused_speedup=None if peer_fused is None else peer_fused.best_us / fused.best_us,
            )
            print(report.markdown().splitlines()[-1], flush=True)
    print(report.markdown())
    for path in report.save(tag="quick" if args.quick else ""):
        print("wrote", path)


if __name__ == "__main__":
    main()
