# SPDX-License-Identifier: Apache-2.0
"""decode_linear on CUDA against the CPU twin and a float64 reference: both dtypes, plain and
gated, bias, the fused RMSNorm and residual add, 1..16 rows, K and N that are not multiples of
the kernel's 32 and 8 (K down to 8, N down to 1), strided x, a row slice of a fused weight, the
decode shapes of the benchmark's models, more tiles than one wave; the output's memory poisoned
first; the CUDA-only errors; CUDA-graph replay; a tiny Qwen2 against the cuBLAS path.
Fresh random inputs every run (the seed is in each failure message)."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_generator
from dustin import model as model_module
from dustin import ops
from dustin.checkpoint import load_checkpoint
from dustin.model import Transformer
from reference import relative_error
from test_decode_linear import (
    NORMED_TOLERANCE,
    TOLERANCE,
    make_glue,
    make_inputs,
    make_rope,
    reference,
    rope_reference,
)
from tiny_models import VOCAB, save_tiny

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16]


def poison_allocator(numel: int = 1 << 22) -> None:
    """Leaves NaN in the caching allocator's free blocks, so an output element the kernel never
    writes shows up as NaN."""
    torch.full((numel,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def check(x, weight, bias, gated, what, norm_weight=None, residual=None):
    poison_allocator()
    glue = {"norm_weight": norm_weight, "norm_eps": 1e-5, "residual": residual}
    y = ops.decode_linear(x, weight, bias, gated, **glue)
    cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in glue.items()}
    bias = None if bias is None else bias.cpu()
    expected = reference(x.cpu(), weight.cpu(), bias, gated, *cpu.values())
    twin = ops.decode_linear(x.cpu(), weight.cpu(), bias, gated, **cpu)
    assert y.shape == twin.shape and torch.isfinite(y).all(), f"{what}: unwritten outputs"
    err = relative_error(y.cpu(), expected)
    tolerance = (TOLERANCE if norm_weight is None else NORMED_TOLERANCE)[x.dtype]
    assert err < tolerance, f"{what}: error {err:.2e} against float64"
    # Twin and kernel sum in different orders (and their row scales may differ in the last
    # bit); both round the same way.
    assert relative_error(y.cpu(), twin) < tolerance, f"{what}: differs from the twin"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_matches_reference_and_twin(dtype, gated, rows):
    gen, seed = fresh_generator()
    for k, n, bias, x_pad in [
        (8, 2, False, 0),  # one vector per row: most lanes past K
        (40, 14, True, 8),  # K not a multiple of 32, N not of 8
        (1000, 26, False, 16),
        (896, 1152, True, 0),  # the 0.5B draft's q/k/v
        (4864, 896, False, 0),  # its down projection: many steps per warp
        (256, 2, True, 0),  # one column
    ]:
        if gated and n % 2:
            continue
        x, weight, b = make_inputs(rows, k, n, dtype, gen, bias, x_pad, device="cuda")
        check(x, weight, b, gated, f"seed {seed} M={rows} K={k} N={n} bias={bias}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_fused_norm_and_residual(dtype, gated, rows):
    """The RMSNorm's row scale comes from a CTA's first tile only: N of 8 to 3000 tiles covers
    CTAs with one tile and with many, K from one step to many per warp."""
    gen, seed = fresh_generator()
    for k, n, bias in [
        (8, 16, False),
        (40, 14, True),
        (896, 1152, True),
        (896, 9728, False),
        (2048, 24000, False),
    ]:
        if gated and n % 2:
            continue
        x, weight, b = make_inputs(rows, k, n, dtype, gen, bias, device="cuda")
        x = (x.float() * 5).to(dtype)
        norm_weight, residual = make_glue(rows, k, n // 2 if gated else n, dtype, gen, "cuda")
        for g, r in [(norm_weight, None), (None, residual), (norm_weight, residual)]:
            what = f"seed {seed} M={rows} K={k} N={n} norm={g is not None} res={r is not None}"
            check(x, weight, b, gated, what, g, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_rope(dtype, rows):
    """q/k/v with RoPE (its tiles permuted within heads): the draft's and the 7B's shapes, with
    and without the norm, against the twin and float64."""
    gen, seed = fresh_generator()
    for k, d, heads, kv_heads, normed in [
        (64, 8, 2, 1, True),
        (896, 64, 14, 2, True),  # the 0.5B draft
        (3584, 128, 28, 4, False),  # the 7B: K past the fused norm's
    ]:
        n = (heads + 2 * kv_heads) * d
        x, weight, bias = make_inputs(rows, k, n, dtype, gen, bias=True, device="cuda")
        norm_weight = make_glue(rows, k, n, dtype, gen, "cuda")[0] if normed else None
        cos, sin = make_rope(rows, d, dtype, gen, "cuda")
        rope_columns = (heads + kv_heads) * d
        poison_allocator()
        glue = {"norm_weight": norm_weight, "rope": (cos, sin), "rope_columns": rope_columns}
        y = ops.decode_linear(x, weight, bias, **glue).cpu()
        cpu = {"norm_weight": None if norm_weight is None else norm_weight.cpu()}
        twin = ops.decode_linear(
            x.cpu(),
            weight.cpu(),
            bias.cpu(),
            **cpu,
            rope=(cos.cpu(), sin.cpu()),
            rope_columns=rope_columns,
        )
        linear = reference(x.cpu(), weight.cpu(), bias.cpu(), False, cpu["norm_weight"])
        expected = rope_reference(linear.to(dtype), cos.cpu(), sin.cpu(), rope_columns)
        what = f"seed {seed} M={rows} K={k} D={d} norm={normed}"
        assert torch.isfinite(y).all(), f"{what}: unwritten outputs"
        assert relative_error(y, expected) < NORMED_TOLERANCE[dtype], f"{what}: against float64"
        assert relative_error(y, twin) < NORMED_TOLERANCE[dtype], f"{what}: differs from the twin"


def test_gated_mlp_shape_and_fused_weight_slice():
    gen, seed = fresh_generator()
    x, weight, _ = make_inputs(16, 896, 2 * 4864, torch.bfloat16, gen, device="cuda")
    check(x, weight, None, True, f"seed {seed} 0.5B gate/up")
    fused = (torch.randn(1152, 896, generator=gen) * 0.03).to(torch.bfloat16).cuda()
    check(x, fused[896:1024], None, False, f"seed {seed} k_proj view")
    check(x[:1].expand(16, 896), fused, None, False, f"seed {seed} expanded x (row stride 0)")


def test_cuda_errors():
    x = torch.ones(4, 24, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(8, 24, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bfloat16 or float16 on CUDA"):
        ops.decode_linear(x.float(), weight.float())
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.decode_linear(x[:, :20], weight[:, :20])
    with pytest.raises(ValueError, match="16-byte aligned"):
        ops.decode_linear(torch.ones(4, 32, device="cuda", dtype=torch.bfloat16)[:, 4:28], weight)
    with pytest.raises(ValueError, match="device"):
        ops.decode_linear(x, weight.cpu())
    with pytest.raises(ValueError, match="norm_weight must start 16-byte aligned"):
        ops.decode_linear(x, weight, norm_weight=torch.ones(32, device="cuda").bfloat16()[4:28])
    with pytest.raises(NotImplementedError, match="at most 2048 with norm_weight on CUDA"):
        wide = torch.ones(4, 2056, device="cuda", dtype=torch.bfloat16)
        ops.decode_linear(wide, torch.ones(8, 2056).to(wide), norm_weight=wide[0])
    with pytest.raises(ValueError, match="residual must be on the device"):
        ops.decode_linear(x, weight, residual=torch.ones(4, 8, dtype=torch.bfloat16))


def test_graph_replay_matches_eager():
    gen, seed = fresh_generator()
    x, weight, bias = make_inputs(16, 896, 1152, torch.bfloat16, gen, bias=True, device="cuda")
    eager = ops.decode_linear(x, weight, bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.decode_linear(x, weight, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.decode_linear(x, weight, bias)
    x.copy_(torch.randn(16, 896, generator=gen).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ops.decode_linear(x, weight, bias)), f"seed {seed}: replay differs"
    assert not torch.equal(y, eager), f"seed {seed}: replay did not read the new x"


@pytest.mark.parametrize("width", [1, 5])
def test_model_decode_steps_match_the_cublas_path(tmp_path, width):
    """A tiny Qwen2 (q/k/v bias, K of 256 and 128, head dim 64 as sparse_verify's CUDA kernel
    needs) compiled with and without decode_linear (and with it the fused norms and residual
    adds): the decode windows of 3 sequences (3 and 15 rows) give the same logits up to bf16
    rounding, and not bit-identical ones (the other kernel ran); the prefill's 20 rows take
    cuBLAS either way."""
    directory = save_tiny(tmp_path, "qwen2", hidden_size=256)
    config, state_dict, _ = load_checkpoint(directory)
    tokens = torch.randint(0, VOCAB, (3, 20 + width), generator=torch.Generator().manual_seed(0))
    logits = []
    for decode_linear in (False, True):
        model = Transformer.from_state_dict(config, state_dict, dtype=torch.bfloat16, device="cuda")
        model.compile_layers("aot_eager", decode_linear=decode_linear)
        cache = model.new_cache(3, 48)
        for b in range(3):
            model.prefill(tokens[b, :20].cuda(), cache, b)
        out, _ = model.forward(tokens[:, 20:].cuda(), cache)
        logits.append(out.float().cpu())
    assert relative_error(logits[1], logits[0]) < 3e-2
    assert not torch.equal(logits[1], logits[0]), "decode_linear did not run"


def test_model_takes_cublas_for_large_weights():
    """The model's choice of kernel: a 0.5B draft's q/k/v weight goes to decode_linear, a 7B's
    (33 MB, past DECODE_LINEAR_MAX_WEIGHT_BYTES) to cuBLAS, as do 17 rows."""
    x = torch.ones(16, 896, device="cuda", dtype=torch.bfloat16)
    small = torch.ones(1152, 896, device="cuda", dtype=torch.bfloat16)
    large = torch.ones(4608, 3584, device="cuda", dtype=torch.bfloat16)
    assert model_module._fits_decode_linear(x, small)
    assert not model_module._fits_decode_linear(x.new_ones(16, 3584), large)
    assert not model_module._fits_decode_linear(x.new_ones(17, 896), small)
