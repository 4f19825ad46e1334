# SPDX-License-Identifier: Apache-2.0
"""decode_linear on the CPU: against a float64 reference (plain and gated, bias, strided x, views
of a fused weight, 0..16 rows), its argument errors, opcheck, Meta shapes and torch.compile with
dynamic row counts. Fresh random inputs every run (the seed is in each failure message)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_generator
from dustin import ops
from reference import relative_error

# float32 sums of 16-bit products, rounded once: the norm-wise error is the output rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(x, weight, bias, gated):
    """float64 ``x weight^T + bias`` (and silu(gate) * up when gated)."""
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


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
    ],
)
def test_errors_name_the_argument(call, error, match):
    weight = torch.ones(6, 16)
    with pytest.raises(error, match=match):
        call(weight)


@pytest.mark.parametrize("gated", [False, True])
def test_opcheck(gated):
    gen, _ = fresh_generator()
    x, weight, bias = make_inputs(3, 32, 10, torch.float32, gen, bias=True)
    torch.library.opcheck(torch.ops.dustin.decode_linear.default, (x, weight, bias, gated))


def test_meta_shape_matches():
    gen, _ = fresh_generator()
    x, weight, _ = make_inputs(7, 24, 12, torch.bfloat16, gen)
    real = torch.ops.dustin.decode_linear(x, weight, None, True)
    meta = torch.ops.dustin.decode_linear(x.to("meta"), weight.to("meta"), None, True)
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
