"""Exact scale invariance over each dtype's whole finite range (paper Sec. 2.1; the norms of
``sphereconv.nn.functional``: ``|x|_e = sqrt(sum x^2 + eps m_x^2)``, evaluated on inputs and filters
rescaled by exact powers of two).

For every operator, every layer and both implementations: ``out(c x, d w) == out(x, w)`` within
the dtype's rounding, the gradient w.r.t. the input scales as ``1/c``, the one w.r.t. the weight as
``1/d``, and those w.r.t. the bias and a learnable k do not change. Before the norms were rescaled,
float32 gave exactly zero for inputs of 1e19 and NaN near its largest value, float64 zero at 1e300,
and float16 NaN near 6e4 (the regression tests at the end).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from sphereconv.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear, _fused
from sphereconv.nn import functional as SF

OPERATORS = ["linear", "cosine", "sigmoid", "learnable_sigmoid"]
IMPLS = ["fused", "reference"]
# Relative error (to the largest value) allowed between the scaled and the unscaled evaluation: the
# scaled input c x is rounded to the dtype once more, and sums run in another order. In float16 and
# bfloat16 the inner product itself is rounded to 11 / 8 bits, and arccos turns a cosine error d
# near |cos| = 1 into an angle error sqrt(2 d) (bf16: up to 0.06 rad), which sums such as dL/dk
# collect: over 150 random cases the largest error was 0.017 (bf16) and 0.003 (fp16) at scale 1
# and at random scales alike, with rare cases up to 0.07 (bf16).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}
# log10 of the scales drawn per dtype: all of float32/float64 (inputs are randn, |x| < ~5, so c x
# stays finite); float16 and bfloat16 store the input itself, so c x must stay representable there
# and above the subnormals: float16 holds 6e-5..65504, bfloat16 float32's exponent range.
LOG_SCALES = {
    torch.float32: (-30.0, 37.0),
    torch.float64: (-300.0, 300.0),
    torch.float16: (-2.0, 4.0),
    torch.bfloat16: (-30.0, 37.0),
}


class _Functional(nn.Module):
    """``sphere_conv2d`` called directly, with groups, stride, dilation and a per-channel k tensor."""

    def __init__(self, operator: str) -> None:
        super().__init__()
        self.operator = operator
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 2))
        self.bias = nn.Parameter(torch.randn(4))
        self.k = nn.Parameter(torch.rand(4) + 0.2) if operator == "learnable_sigmoid" else None

    def forward(self, x):
        k = self.k if self.k is not None else 0.4
        return SF.sphere_conv2d(
            x,
            self.weight,
            self.bias,
            stride=(2, 1),
            padding=2,
            dilation=(2, 1),
            groups=2,
            operator=self.operator,
            sigmoid_k=k,
        )


# layer kind -> (constructor, input shape)
KINDS = {
    "conv1d": (lambda op: SphereConv1d(3, 4, 3, stride=2, padding=1, bias=True, operator=op), (2, 3, 9)),
    "conv2d": (lambda op: SphereConv2d(3, 4, 3, padding=1, bias=True, operator=op), (2, 3, 6, 5)),
    "conv2d-reflect-groups": (
        lambda op: SphereConv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect", bias=True, operator=op),
        (2, 4, 5, 5),
    ),
    "conv3d": (lambda op: SphereConv3d(2, 3, 2, padding=(1, 0, 1), bias=True, operator=op), (1, 2, 4, 3, 4)),
    "linear": (lambda op: SphereLinear(6, 4, bias=True, operator=op), (3, 6)),
    "functional": (_Functional, (2, 4, 7, 6)),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (inf if a is not finite)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _evaluate(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, impl: str):
    """Output and gradients w.r.t. (x, weight, every other parameter)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    others = [p for name, p in layer.named_parameters() if name != "weight"]
    with SF.use_reference_impl(impl == "reference"):
        out = functional_call(layer, {"weight": weight}, (x,))
    return out, torch.autograd.grad(out, [x, weight, *others], grad_out.to(out.dtype))


def check_scale_invariance(kind: str, operator: str, impl: str, dtype: torch.dtype, c: float, d: float, seed: int):
    """``out(c x, d w) == out(x, w)``; gradients: input x 1/c, weight x 1/d, the others equal.

    float16 and bfloat16 round ``c x`` to 8-11 bits, which moves angles (and sums with cancellation,
    such as dL/dk) by more than their output rounding: there the result at the stored ``c x`` is
    compared with float64 at the same values instead, float64 being scale invariant itself.
    """
    torch.manual_seed(seed)
    make, shape = KINDS[kind]
    layer64 = make(operator).double()  # initialised in float64, then stored in dtype
    x = torch.randn(shape, dtype=torch.float64)
    w = layer64.weight.detach().clone()
    layer = copy.deepcopy(layer64).to(dtype)
    with torch.no_grad():  # (representable in dtype: both evaluations see the same values)
        grad_out = torch.randn(layer(x.to(dtype)).shape, dtype=torch.float64).to(dtype).double()
    x_c, w_c = (c * x).to(dtype), (d * w).to(dtype)
    out_s, grads_s = _evaluate(layer, x_c, w_c, grad_out, impl)
    if dtype in (torch.float32, torch.float64):
        out, grads = _evaluate(layer, x.to(dtype), w.to(dtype), grad_out, impl)
        factors = [c, d] + [1.0] * (len(grads) - 2)
    else:
        with torch.no_grad():
            for name, p in layer64.named_parameters():  # the stored (rounded) parameters
                p.copy_(dict(layer.named_parameters())[name])
        out, grads = _evaluate(layer64, x_c.double(), w_c.double(), grad_out, impl)
        factors = [1.0] * len(grads)
    tol = TOLERANCE[dtype]
    assert out_s.dtype == dtype
    assert _rel(out_s, out) < tol, ("output", _rel(out_s, out))
    names = ["input", "weight"] + [name for name, _ in layer.named_parameters() if name != "weight"]
    for name, g_s, g, factor in zip(names, grads_s, grads, factors):
        assert _rel(g_s.double() * factor, g) < tol, (name, _rel(g_s.double() * factor, g))


def _scales(dtype: torch.dtype):
    low, high = LOG_SCALES[dtype]
    return st.floats(low, high).map(lambda e: 10.0**e)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=6, deadline=None)
@given(impl=st.sampled_from(IMPLS), c=_scales(torch.float32), d=_scales(torch.float32), seed=st.integers(0, 2**16))
def test_float32_scale_invariance_from_1e_minus_30_to_1e37(kind, operator, impl, c, d, seed):
    check_scale_invariance(kind, operator, impl, torch.float32, c, d, seed)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=4, deadline=None)
@given(impl=st.sampled_from(IMPLS), c=_scales(torch.float64), d=_scales(torch.float64), seed=st.integers(0, 2**16))
def test_float64_scale_invariance_from_1e_minus_300_to_1e300(kind, operator, impl, c, d, seed):
    check_scale_invariance(kind, operator, impl, torch.float64, c, d, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(list(KINDS)),
    operator=st.sampled_from(OPERATORS),
    impl=st.sampled_from(IMPLS),
    e_c=st.floats(0.0, 1.0),
    e_d=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_half_precision_scale_invariance_over_the_finite_range(dtype, kind, operator, impl, e_c, e_d, seed):
    low, high = LOG_SCALES[dtype]
    c, d = (10.0 ** (low + e * (high - low)) for e in (e_c, e_d))
    check_scale_invariance(kind, operator, impl, dtype, c, d, seed)


@pytest.mark.parametrize("precision", ["bf16-autocast", "float32"])
def test_powers_of_two_give_bitwise_identical_outputs(precision, impl):
    # Rescaling by 2^k is exact, and so is the evaluation: the same bits at every k. (Only where
    # x * 2^k itself is exact: at 2^-120 the smallest inputs here, 4e-4, would become subnormal and
    # lose bits; 2^-100 and 2^120 stay normal and are outside the range used without rescaling.)
    torch.manual_seed(3)
    layer = SphereConv2d(3, 4, 3, padding=1, operator="sigmoid")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        expected = layer(x)
        for k in (-100, -60, -1, 1, 60, 120):
            assert torch.equal((x * 2.0**k) * 2.0**-k, x), k  # the premise
            assert torch.equal(layer(x * 2.0**k), expected), k


@pytest.mark.parametrize("operator", OPERATORS)
def test_direct_and_rescaled_evaluation_agree(operator, monkeypatch):
    # On CPU, inputs whose largest values lie in [2^-40, 2^40] are used without the power-of-two
    # rescaling (which would not change a bit); forcing the rescaled path must give the same result.
    torch.manual_seed(5)
    layer = SphereConv2d(4, 6, 3, padding=1, groups=2, bias=True, operator=operator)
    x = torch.randn(2, 4, 6, 6)
    x[1, :2] *= 1e-6  # one sample-group far smaller: still direct
    grad_out = torch.randn(2, 6, 6, 6)
    results = []
    for always in (False, True):
        monkeypatch.setattr(_fused, "_always_rescale", always)
        results.append(_evaluate(layer, x, layer.weight, grad_out.double(), "fused"))
    (out, grads), (out_r, grads_r) = results
    torch.testing.assert_close(out_r, out, rtol=2e-7, atol=0)
    for g_r, g in zip(grads_r, grads):
        torch.testing.assert_close(g_r, g, rtol=1e-6, atol=1e-12)


def test_zero_and_mixed_scale_samples_in_one_batch(impl):
    # Each sample (and group) is rescaled on its own: a batch mixing 1e-30, 1e30 and zero samples
    # gives every sample its own unscaled output; the zero sample gives cos = 0 and finite gradients.
    torch.manual_seed(4)
    layer = SphereConv2d(4, 6, 3, padding=1, groups=2, operator="linear")
    x = torch.randn(4, 4, 5, 5)
    x[3] = 0.0
    scales = torch.tensor([1e-30, 1.0, 1e30, 1.0]).reshape(4, 1, 1, 1)
    scales_groups = torch.tensor([1.0, 1e20]).reshape(1, 2, 1, 1, 1)
    mixed = (x.unflatten(1, (2, 2)) * scales_groups).flatten(1, 2)
    with torch.no_grad():
        expected = torch.cat([layer(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(layer(x * scales), expected, rtol=1e-5, atol=1e-6)
        assert (expected[3] == 0).all()
        per_group = layer(mixed)
        torch.testing.assert_close(per_group, layer(x), rtol=1e-5, atol=1e-6)
    x = (x * scales).requires_grad_()
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


# ------------------------------------------------------------------------------------------------
# Regressions (issue 13, item 12): each failed before the norms were rescaled
# ------------------------------------------------------------------------------------------------


def _unit_max(shape, dtype=torch.float64, positive=False, seed=0):
    """Random values whose largest magnitude is exactly 1 (float64)."""
    gen = torch.Generator().manual_seed(seed)
    t = (
        torch.rand(shape, generator=gen, dtype=dtype) * 0.5 + 0.5
        if positive
        else torch.randn(shape, generator=gen, dtype=dtype)
    )
    return t / t.abs().max()


def _layer_cases(dtype):
    return [
        (SphereConv2d(3, 4, 3, padding=1, operator="sigmoid", dtype=torch.float64), (2, 3, 5, 5)),
        (SphereLinear(6, 3, operator="linear", dtype=torch.float64), (2, 6)),
    ]


def _compare_at_scale(scale: float, dtype: torch.dtype, impl: str, positive: bool = False, tol: float = 1e-5):
    """Output and input/weight gradients at ``scale * x`` (in dtype) against those at x."""
    torch.manual_seed(8)
    for layer, shape in _layer_cases(dtype):
        if positive:  # filters and inputs all positive: <w, x> close to |w| |x|
            with torch.no_grad():
                layer.weight.abs_()
        x = _unit_max(shape, positive=positive)
        layer = layer.to(dtype)
        with torch.no_grad():
            grad_out = torch.randn(layer(x.to(dtype)).shape, dtype=torch.float64)
        out, grads = _evaluate(layer, x.to(dtype), layer.weight.detach(), grad_out, impl)
        out_s, grads_s = _evaluate(layer, (scale * x).to(dtype), layer.weight.detach(), grad_out, impl)
        assert torch.isfinite(out_s).all() and not (out_s == 0).all(), out_s
        assert _rel(out_s, out) < tol, _rel(out_s, out)
        assert _rel(grads_s[0].double() * scale, grads[0]) < tol  # d/dx scales as 1/c
        assert _rel(grads_s[1], grads[1]) < tol  # d/dw unchanged


@pytest.mark.parametrize("scale", [3e19, 1e30, 1e37, 3.4e38], ids=["3e19", "1e30", "1e37", "3.4e38"])
def test_float32_inputs_from_1e19_to_the_largest_float_give_the_unscaled_output(scale, impl):
    # was: exactly zero output from ~1e19 (sum x^2 overflowed to inf), NaN near 3.4e38
    _compare_at_scale(scale, torch.float32, impl)


@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e-36], ids=["1e-20", "1e-30", "1e-36"])
def test_tiny_float32_inputs_give_the_unscaled_output(scale, impl):
    # was: eps = 1e-4 swamped sum x^2 (output -> 0), and x^2 underflowed. (Below ~1e-38 the
    # gradient, ~1/c, no longer fits in float32.)
    _compare_at_scale(scale, torch.float32, impl)


def test_float64_inputs_of_1e300_give_the_unscaled_output(impl):
    # was: exactly zero output at 1e300
    _compare_at_scale(1e300, torch.float64, impl, tol=1e-10)
    _compare_at_scale(1.7e308, torch.float64, impl, tol=1e-10)


def test_float16_inputs_near_65504_give_the_unscaled_output(impl):
    # was: NaN (the float16 convolution of all-positive inputs of 6e4 overflowed)
    _compare_at_scale(6e4, torch.float16, impl, positive=True, tol=1e-2)


@pytest.mark.parametrize("x_scale,w_scale", [(1e30, 1e30), (1e30, 1.0), (1.0, 1e30), (1e-30, 1e30), (3e38, 1e-36)])
def test_huge_and_tiny_filters_and_inputs_in_float32(x_scale, w_scale, impl):
    # The earlier test of these scales only checked that the results were finite.
    torch.manual_seed(7)
    for layer, shape in _layer_cases(torch.float32):
        x = _unit_max(shape, seed=1)
        layer = layer.float()
        w = layer.weight.detach().double()
        with torch.no_grad():
            grad_out = torch.randn(layer(x.float()).shape, dtype=torch.float64)
        out, grads = _evaluate(layer, x.float(), w.float(), grad_out, impl)
        out_s, grads_s = _evaluate(layer, (x_scale * x).float(), (w_scale * w).float(), grad_out, impl)
        assert _rel(out_s, out) < 1e-5
        assert _rel(grads_s[0].double() * x_scale, grads[0]) < 1e-5
        assert _rel(grads_s[1].double() * w_scale, grads[1]) < 1e-5
