# SPDX-License-Identifier: Apache-2.0
"""decode_linear on the CPU: against a float64 reference (plain and gated, bias, strided x, views
of a fused weight, 0..16 rows, the fused RMSNorm and residual add), its argument errors, opcheck,
Meta shapes, torch.compile with dynamic row counts, and a tiny Qwen2 whose layers run through it.
Fresh random inputs every run (the seed is in each failure message)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_generator
from dustin import model as model_module
from dustin import ops
from dustin.checkpoint import load_checkpoint
from dustin.model import Transformer
from reference import relative_error
from tiny_models import VOCAB, save_tiny

# float32 sums of 16-bit products, rounded once: the norm-wise error is the output rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# With the fused norm, x * g is rounded to the dtype before the products: one rounding more.
NORMED_TOLERANCE = {dtype: 2 * tol for dtype, tol in TOLERANCE.items()}


def reference(x, weight, bias, gated, norm_weight=None, norm_eps=1e-6, residual=None):
    """float64 ``residual + RMSNorm(x) weight^T + bias`` (and silu(gate) * up when gated)."""
    x = x.double()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.double()
    y = F.linear(x, weight.double(), None if bias is None else bias.double())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else y + residual.double()


def rope_reference(y, cos, sin, rope_columns):
    """float64 rotate-half RoPE of the first ``rope_columns`` columns of ``y`` (heads of
    ``D = cos.shape[-1]``), the others as they are."""
    d = cos.shape[-1]
    y = y.double().clone()
    heads = y[:, :rope_columns].view(y.shape[0], -1, d)
    rotated = torch.cat((-heads[..., d // 2 :], heads[..., : d // 2]), dim=-1)
    y[:, :rope_columns] = (heads * cos.double()[:, None] + rotated * sin.double()[:, None]).flatten(
        1
    )
    return y


def make_rope(rows, d, dtype, gen, device="cpu"):
    """cos and sin ``[M, D]`` of random positions, as a model's RoPE tables give them."""
    angles = torch.rand(rows, d // 2, generator=gen, dtype=torch.float64) * 1000
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def make_glue(rows, k, columns, dtype, gen, device="cpu"):
    """A norm weight ``[K]`` near 1 and a residual ``[M, columns]`` larger than the products."""
    norm_weight = (1 + 0.3 * torch.randn(k, generator=gen)).to(dtype)
    residual = (4 * torch.randn(rows, columns, generator=gen)).to(dtype)
    return norm_weight.to(device), residual.to(device)


def make_inputs(rows, k, n, dtype, gen, bias=False, x_pad=0, device="cpu"):
    x = torch.randn(rows, k + x_pad, generator=gen).to(dtype)[:, :k]
    weight = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x.to(device), weight.to(device), None if b is None else b.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_matches_float64_reference(dtype, gated, rows):
    gen, seed = fresh_generator()
    for k, n, bias, x_pad in [(8, 2, False, 0), (40, 14, True, 8), (296, 64, True, 3)]:
        x, weight, b = make_inputs(rows, k, n, dtype, gen, bias, x_pad)
        y = ops.decode_linear(x, weight, b, gated=gated)
        assert y.shape == (rows, n // 2 if gated else n) and y.dtype == dtype and y.is_contiguous()
        err = relative_error(y, reference(x, weight, b, gated))
        assert err < TOLERANCE[dtype], f"seed {seed} K={k} N={n} bias={bias}: error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_fused_norm_and_residual_match_float64_reference(dtype, gated, rows):
    gen, seed = fresh_generator()
    # Several columns even when gated: one column's error relative to itself has no bound.
    for k, n, bias in [(8, 16, False), (40, 14, True), (296, 64, True)]:
        x, weight, b = make_inputs(rows, k, n, dtype, gen, bias)
        x = (x.float() * 5).to(dtype)  # a norm that is not near the identity
        norm_weight, residual = make_glue(rows, k, n // 2 if gated else n, dtype, gen)
        for g, r in [(norm_weight, None), (None, residual), (norm_weight, residual)]:
            y = ops.decode_linear(x, weight, b, gated, norm_weight=g, norm_eps=1e-5, residual=r)
            err = relative_error(y, reference(x, weight, b, gated, g, 1e-5, r))
            what = f"seed {seed} K={k} N={n} norm={g is not None} residual={r is not None}"
            tolerance = (TOLERANCE if g is None else NORMED_TOLERANCE)[dtype]
            assert err < tolerance, f"{what}: error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_is_added_as_a_separate_add_rounds(dtype):
    gen, seed = fresh_generator()
    x, weight, bias = make_inputs(5, 64, 24, dtype, gen, bias=True)
    _, residual = make_glue(5, 64, 24, dtype, gen)
    fused = ops.decode_linear(x, weight, bias, residual=residual[:, :24])
    assert torch.equal(fused, residual + ops.decode_linear(x, weight, bias)), f"seed {seed}"


def test_norm_makes_the_result_independent_of_the_row_scale():
    """Rows scaled by 4 (exact in every dtype, eps 0) give the same result bit for bit, as an
    RMSNorm's output does; without the norm the result scales."""
    gen, seed = fresh_generator()
    x, weight, _ = make_inputs(6, 96, 20, torch.bfloat16, gen)
    norm_weight, _ = make_glue(6, 96, 20, torch.bfloat16, gen)
    scaled = x * 4
    for gated in (False, True):
        y = ops.decode_linear(x, weight, None, gated, norm_weight=norm_weight, norm_eps=0.0)
        y4 = ops.decode_linear(scaled, weight, None, gated, norm_weight=norm_weight, norm_eps=0.0)
        assert torch.equal(y, y4), f"seed {seed} gated={gated}"
    assert not torch.equal(ops.decode_linear(x, weight), ops.decode_linear(scaled, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 6, 16])
def test_rope_matches_float64_reference(dtype, rows):
    """q/k/v of a fused projection with the norm, bias and RoPE of q and k in one call: against
    float64 products rounded to the dtype, then rotated in float64."""
    gen, seed = fresh_generator()
    for k, d, heads, kv_heads in [(64, 8, 2, 1), (96, 16, 3, 1), (128, 64, 2, 2)]:
        n = (heads + 2 * kv_heads) * d
        x, weight, bias = make_inputs(rows, k, n, dtype, gen, bias=True)
        norm_weight, _ = make_glue(rows, k, n, dtype, gen)
        cos, sin = make_rope(rows, d, dtype, gen)
        rope_columns = (heads + kv_heads) * d
        y = ops.decode_linear(
            x, weight, bias, norm_weight=norm_weight, rope=(cos, sin), rope_columns=rope_columns
        )
        linear = reference(x, weight, bias, False, norm_weight).to(dtype)
        expected = rope_reference(linear, cos, sin, rope_columns)
        err = relative_error(y, expected)
        assert err < NORMED_TOLERANCE[dtype], f"seed {seed} K={k} D={d}: error {err:.2e}"
        unrotated = ops.decode_linear(x, weight, bias, norm_weight=norm_weight)
        assert torch.equal(y[:, rope_columns:], unrotated[:, rope_columns:]), f"seed {seed}: v"


def test_leading_dims_and_views_of_a_fused_weight():
    gen, seed = fresh_generator()
    x = torch.randn(4, 2, 64, generator=gen).to(torch.bfloat16)  # [B, n, K]: 8 rows
    fused = torch.randn(3 * 24, 64, generator=gen).to(torch.bfloat16)
    view = fused[24:48]  # a row slice: offset storage, row stride K
    y = ops.decode_linear(x, view)
    assert y.shape == (4, 2, 24)
    assert relative_error(y, reference(x, view, None, False)) < 1e-2, f"seed {seed}"


def test_expanded_x_rows():
    gen, seed = fresh_generator()
    x = torch.randn(1, 48, generator=gen).to(torch.bfloat16).expand(6, 48)  # row stride 0
    weight = torch.randn(10, 48, generator=gen).to(torch.bfloat16)
    y = ops.decode_linear(x, weight, gated=True)
    assert relative_error(y, reference(x, weight, None, True)) < 1e-2, f"seed {seed}"
    assert torch.equal(y, y[:1].expand(6, 5)), f"seed {seed}: rows of one x differ"


def test_zero_rows():
    x = torch.empty(0, 16, dtype=torch.bfloat16)
    assert ops.decode_linear(x, torch.ones(6, 16, dtype=torch.bfloat16), gated=True).shape == (0, 3)


ROPE8 = (torch.ones(2, 8), torch.zeros(2, 8))  # cos and sin of D 8 for 2 rows


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w: ops.decode_linear(torch.ones(17, 16), w), ValueError, "at most 16 rows M"),
        (lambda w: ops.decode_linear(torch.ones(2, 8), w), ValueError, r"weight.size\(1\)"),
        (lambda w: ops.decode_linear(torch.ones(2, 16).half(), w), TypeError, "dtype of x"),
        (lambda w: ops.decode_linear(torch.ones(2, 16), w[:5], gated=True), ValueError, "even"),
        (lambda w: ops.decode_linear(torch.ones(2, 16), w, torch.ones(5)), ValueError, "bias"),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), torch.ones(16, 6).t()),
            ValueError,
            "innermost",
        ),
        (lambda w: ops.decode_linear(torch.ones(2, 16).int(), w.int()), TypeError, "x must be"),
        (lambda w: torch.ops.dustin.decode_linear(torch.ones(16), w), ValueError, "2 dims"),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), w, norm_weight=torch.ones(8)),
            ValueError,
            r"norm_weight must have shape \[16\]",
        ),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), w, norm_weight=torch.ones(16).half()),
            TypeError,
            "norm_weight must have the dtype of x",
        ),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), w, norm_weight=torch.ones(32)[::2]),
            ValueError,
            "norm_weight must be contiguous",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16), w, norm_weight=torch.ones(16), norm_eps=-1.0
            ),
            ValueError,
            "norm_eps must be finite and >= 0",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16), w, norm_weight=torch.ones(16), norm_eps=float("nan")
            ),
            ValueError,
            "norm_eps",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16), w, gated=True, residual=torch.ones(2, 6)
            ),
            ValueError,
            r"residual must have shape \[2, 3\]",
        ),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), w, residual=torch.ones(2, 6).half()),
            TypeError,
            "residual must have the dtype of x",
        ),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), w, residual=torch.ones(6, 2).t()),
            ValueError,
            "residual must have innermost stride 1",
        ),
        (
            lambda w: torch.ops.dustin.decode_linear(
                torch.ones(2, 16), w, rope_cos=torch.ones(2, 8), rope_columns=8
            ),
            ValueError,
            "rope_cos and rope_sin must be given together",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16), torch.ones(16, 16), gated=True, rope=ROPE8, rope_columns=8
            ),
            ValueError,
            "cannot be combined with gated",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16),
                torch.ones(16, 16),
                residual=torch.ones(2, 16),
                rope=ROPE8,
                rope_columns=8,
            ),
            ValueError,
            "cannot be combined with residual",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16), torch.ones(12, 16), rope=(torch.ones(2, 6),) * 2, rope_columns=6
            ),
            ValueError,
            "positive multiple of 8",
        ),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), w, rope=ROPE8, rope_columns=8),
            ValueError,
            "multiple of the head dim 8 rows N",
        ),
        (
            lambda w: ops.decode_linear(torch.ones(2, 16), torch.ones(16, 16), rope=ROPE8),
            ValueError,
            "rope_columns must be a positive multiple of the head dim 8",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16), torch.ones(16, 16), rope=ROPE8, rope_columns=12
            ),
            ValueError,
            "rope_columns",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16), torch.ones(16, 16), rope=(torch.ones(3, 8),) * 2, rope_columns=8
            ),
            ValueError,
            r"rope_cos.size\(0\) must equal M of x",
        ),
        (
            lambda w: ops.decode_linear(
                torch.ones(2, 16),
                torch.ones(16, 16),
                rope=(torch.ones(2, 8), torch.ones(2, 16)),
                rope_columns=8,
            ),
            ValueError,
            r"rope_sin must have shape \[2, 8\]",
        ),
    ],
)
def test_errors_name_the_argument(call, error, match):
    weight = torch.ones(6, 16)
    with pytest.raises(error, match=match):
        call(weight)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("glue", [False, True])
def test_opcheck(gated, glue):
    gen, _ = fresh_generator()
    x, weight, bias = make_inputs(3, 32, 10, torch.float32, gen, bias=True)
    norm_weight, residual = make_glue(3, 32, 5 if gated else 10, torch.float32, gen)
    args = (x, weight, bias, gated) + ((norm_weight, 1e-5, residual) if glue else ())
    torch.library.opcheck(torch.ops.dustin.decode_linear.default, args)


def test_opcheck_with_rope():
    gen, _ = fresh_generator()
    x, weight, bias = make_inputs(3, 32, 48, torch.float32, gen, bias=True)
    norm_weight, _ = make_glue(3, 32, 48, torch.float32, gen)
    cos, sin = make_rope(3, 16, torch.float32, gen)
    args = (x, weight, bias, False, norm_weight, 1e-6, None, cos, sin, 32)
    torch.library.opcheck(torch.ops.dustin.decode_linear.default, args)


def test_meta_shape_matches():
    gen, _ = fresh_generator()
    x, weight, _ = make_inputs(7, 24, 12, torch.bfloat16, gen)
    norm_weight, residual = make_glue(7, 24, 6, torch.bfloat16, gen)
    args = (x, weight, None, True, norm_weight, 1e-6, residual)
    real = torch.ops.dustin.decode_linear(*args)
    meta = torch.ops.dustin.decode_linear(
        *(a.to("meta") if torch.is_tensor(a) else a for a in args)
    )
    assert (meta.shape, meta.dtype, meta.stride()) == (real.shape, real.dtype, real.stride())


def test_compile_with_dynamic_rows():
    gen, seed = fresh_generator()
    weight = torch.randn(16, 32, generator=gen)

    def mlp(x):
        return ops.decode_linear(x * 2, weight, gated=True) + 1

    compiled = torch.compile(mlp, dynamic=True, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    for rows in (3, 9, 16):
        x = torch.randn(rows, 32, generator=gen)
        torch.testing.assert_close(compiled(x), mlp(x), msg=lambda m: f"seed {seed}: {m}")


def test_model_layers_through_decode_linear_match_the_plain_path(tmp_path, monkeypatch):
    """A tiny Qwen2 in float32 whose decode windows take decode_linear (the CPU twin: the CUDA
    condition is lifted for the test) with its norms, activation and residual adds fused, against
    the same model on F.linear and separate norms: the same logits up to float32 rounding, and
    not bit-identical ones (the fused path ran)."""
    monkeypatch.setattr(
        model_module, "_fits_decode_linear", lambda x, weight: x.shape[:-1].numel() <= 16
    )
    directory = save_tiny(tmp_path, "qwen2")
    config, state_dict, _ = load_checkpoint(directory)
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for decode_linear in (False, True):
        model = Transformer.from_state_dict(config, state_dict, dtype=torch.float32)
        model.compile_layers("aot_eager", decode_linear=decode_linear)
        cache = model.new_cache(3, 48)
        for b in range(3):
            model.prefill(tokens[b, :20], cache, b)
        out, _ = model.forward(tokens[:, 20:], cache)  # 12 rows
        logits.append(out)
    assert relative_error(logits[1], logits[0]) < 1e-4
    assert not torch.equal(logits[1], logits[0]), "decode_linear did not run"
