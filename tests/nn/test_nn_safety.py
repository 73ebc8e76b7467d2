"""Numerical safety (the arccos, low-precision and overflow hazards of paper Sec. 2.1's operator).

Zero patches, exactly collinear filters and inputs, cosines rounded past 1, low precision (bf16
autocast on CPU; fp16 autocast and TF32 on CUDA) and a fuzz test of extreme magnitudes. No NaN or
Inf may reach an output or a gradient."""

from __future__ import annotations

import contextlib
import math

import nn_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphereconv.nn import (
    DecoupledConv2d,
    SphereConv2d,
    SphereLinear,
    SphereNorm2d,
)
from sphereconv.nn import (
    functional as SF,
)
from sphereconv.nn.angular import acos_derivative_bound, angular_function, safe_acos

PRECISIONS = ["float32", "float64", "bf16-autocast"]
SPHERE_OPERATORS = ["linear", "cosine", "sigmoid", "learnable_sigmoid"]


def _setup(precision):
    """(dtype of the tensors, context manager) for a precision name."""
    if precision == "bf16-autocast":
        return torch.float32, torch.autocast("cpu", dtype=torch.bfloat16)
    return getattr(torch, precision), contextlib.nullcontext()


def assert_all_finite(*tensors):
    for t in tensors:
        assert t is not None, "missing gradient"
        assert torch.isfinite(t).all(), t


def _finite_grads(module, x, out):
    out.backward(torch.randn_like(out))
    assert_all_finite(out, x.grad, *(p.grad for p in module.parameters()))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("operator", ["cosine", "linear", "sigmoid"])
def test_zero_patches_give_exactly_zero_and_finite_grads(operator, precision, impl):
    dtype, ctx = _setup(precision)
    torch.manual_seed(0)
    layer = SphereConv2d(3, 4, 3, padding=1, operator=operator, dtype=dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    x[0] = 0  # an all-zero sample
    x[1, :, :, :4] = 0  # a zero region: columns 0..2 of the output see only zeros
    x.requires_grad_()
    with ctx:
        out = layer(x)
    assert (out[0] == 0).all() and (out[1, :, :, :3] == 0).all()  # g(pi/2) = 0 exactly
    assert (out[1, :, :, 4:] != 0).any()
    _finite_grads(layer, x, out)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_zero_patches_in_decoupled_and_sphere_norm_layers(precision):
    dtype, ctx = _setup(precision)
    torch.manual_seed(1)
    x = torch.zeros(2, 3, 5, 5, dtype=dtype, requires_grad=True)
    for layer in (
        DecoupledConv2d(3, 4, 3, padding=1, magnitude="tanh", operator="square_cosine", learnable=True, dtype=dtype),
        DecoupledConv2d(3, 4, 3, padding=1, magnitude="mix", operator="linear", weighted=True, dtype=dtype),
        SphereNorm2d(3, 4, 3, padding=1, dtype=dtype),
    ):
        if isinstance(layer, SphereNorm2d):
            with torch.no_grad():
                layer.beta.copy_(torch.randn(4))
        x.grad = None
        with ctx:
            out = layer(x)
        expected = layer.beta.detach().reshape(-1, 1, 1) if isinstance(layer, SphereNorm2d) else 0.0
        assert (out == expected).all()
        _finite_grads(layer, x, out)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("operator", SPHERE_OPERATORS)
def test_exactly_collinear_filter_and_input(operator, sign, precision, impl):
    # The kernel covers the whole input and the input is the filter itself (or its negative):
    # cos(theta) = +-1 up to eps, which is relative to the largest value (at any scale): an eps far
    # below the dtype's resolution makes cos round to +-1 or past it.
    dtype, ctx = _setup(precision)
    torch.manual_seed(2)
    layer = SphereConv2d(3, 1, 3, operator=operator, dtype=dtype, eps=1e-20)
    with torch.no_grad():
        layer.weight.mul_(1e6)
    x = (sign * layer.weight.detach()[0]).clone().requires_grad_()  # unbatched (C, kH, kW)
    with ctx:
        cos, _, _ = SF.sphere_cosine(x.unsqueeze(0), layer.weight, eps=layer.eps)
        out = layer(x)
    # Tolerances: the rounding of <w, x> (bf16 under autocast) moves cos by ~1 ulp of that dtype, and
    # arccos turns a cosine error d near 1 into an angle error sqrt(2 d).
    cos_tol, out_tol = {"float64": (1e-12, 1e-6), "float32": (1e-6, 2e-3), "bf16-autocast": (1e-2, 0.1)}[precision]
    assert abs(float(cos.detach()) - sign) < cos_tol  # at, or rounded past, |cos| = 1
    torch.testing.assert_close(out.double(), torch.full_like(out, sign, dtype=torch.float64), rtol=0, atol=out_tol)
    _finite_grads(layer, x, out)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "square_cosine"])
def test_cosine_rounded_past_one(operator, precision):
    dtype, ctx = _setup(precision)
    past = 1 + 1e-7  # float32 rounds it to 1 + 2^-23, still past 1
    cos = torch.tensor([past, -past, 1.0, -1.0], dtype=dtype, requires_grad=True)
    assert float(cos[0].detach()) > 1  # really past 1 in this dtype
    with ctx:
        g = angular_function(cos, operator, 0.3)
    torch.testing.assert_close(g.double(), torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-6)
    g.sum().backward()
    assert_all_finite(g, cos.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_acos_gradient_is_bounded_at_plus_minus_one(dtype):
    c = torch.tensor([1.0, -1.0, 1 - 1e-12, 0.0], dtype=dtype, requires_grad=True)
    safe_acos(c).sum().backward()
    bound = acos_derivative_bound(dtype)
    assert_all_finite(c.grad)
    assert (c.grad.abs() <= bound * (1 + 1e-6)).all()
    assert float(c.grad[3]) == -1.0  # the true derivative where it is not clipped


@pytest.mark.parametrize("operator", SPHERE_OPERATORS)
def test_bf16_autocast_output_is_float32_and_close_to_float32(operator, impl):
    torch.manual_seed(3)
    layer = SphereConv2d(8, 6, 3, padding=1, operator=operator)
    x = 50 * torch.randn(2, 8, 6, 6)  # squares beyond fp16 range: norms must be summed in float32
    exact = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, rtol=0, atol=0.05)


def _extreme_tensor(shape, scales, mode, dtype, generator):
    """Random normal values times magnitudes from ``scales`` (one for all, or mixed per element)."""
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    table = torch.tensor(scales, dtype=torch.float64)
    if mode == "uniform":
        factor = table[torch.randint(len(scales), (1,), generator=generator)]
    else:
        factor = table[torch.randint(len(scales), shape, generator=generator)]
    return (base * factor).to(dtype)


FULL_RANGE = [0.0, 1e-30, 1e-15, 1e-5, 1.0, 1e5, 1e15, 1e30]
# Layers whose output is proportional to |x| or |w| (SphereNorm's magnitude term, unbounded or
# learnt-radius decoupled magnitudes) need |x|^2 to be representable: float32 overflows past ~1e19.
REPRESENTABLE_RANGE = [0.0, 1e-30, 1e-15, 1e-5, 1.0, 1e5, 1e15]


def _fuzz_layer(kind, dtype):
    if kind == "conv":
        return SphereConv2d(3, 4, 3, padding=1, operator="learnable_sigmoid", dtype=dtype), FULL_RANGE
    if kind == "linear":
        return SphereLinear(6, 3, operator="linear", dtype=dtype), FULL_RANGE
    if kind == "decoupled-bounded":
        return DecoupledConv2d(3, 4, 3, padding=1, magnitude="tanh", operator="sigmoid", dtype=dtype), FULL_RANGE
    if kind == "decoupled-learnt":
        return DecoupledConv2d(
            3, 4, 3, padding=1, magnitude="seg", operator="linear", weighted=True, learnable=True, dtype=dtype
        ), REPRESENTABLE_RANGE
    return SphereNorm2d(3, 4, 3, padding=1, operator="learnable_sigmoid", dtype=dtype), REPRESENTABLE_RANGE


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["conv", "linear", "decoupled-bounded", "decoupled-learnt", "norm"]),
    precision=st.sampled_from(PRECISIONS),
    x_mode=st.sampled_from(["uniform", "mixed"]),
    w_mode=st.sampled_from(["uniform", "mixed"]),
    seed=st.integers(0, 2**16),
    reference=st.booleans(),
)
def test_fuzz_extreme_magnitudes_never_give_nan_or_inf(kind, precision, x_mode, w_mode, seed, reference):
    dtype, autocast = _setup(precision)
    ctx = contextlib.ExitStack()
    ctx.enter_context(SF.use_reference_impl(reference))  # both SphereConv implementations
    ctx.enter_context(autocast)
    generator = torch.Generator().manual_seed(seed)
    layer, scales = _fuzz_layer(kind, dtype)
    with torch.no_grad():
        layer.weight.copy_(_extreme_tensor(layer.weight.shape, scales, w_mode, dtype, generator))
    shape = (2, 6) if kind == "linear" else (2, 3, 5, 5)
    x = _extreme_tensor(shape, scales, x_mode, dtype, generator).requires_grad_()
    with ctx:
        out = layer(x)
    _finite_grads(layer, x, out)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("operator", SPHERE_OPERATORS)
def test_cuda_autocast_is_finite_and_accurate(operator, dtype):
    torch.manual_seed(4)
    layer = SphereConv2d(16, 8, 3, padding=1, operator=operator, device="cuda")
    x = 300 * torch.randn(2, 16, 8, 8, device="cuda", requires_grad=True)  # 300^2 overflows fp16
    expected = ref.sphere_conv_reference(
        x.detach().double().cpu(),
        layer.weight.detach().double().cpu(),
        operator,
        layer.effective_k().detach().double().cpu().reshape(-1, 1, 1) if operator == "learnable_sigmoid" else 0.3,
        padding=1,
    )
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=0.05)
    _finite_grads(layer, x, out)


@cuda
@pytest.mark.parametrize("operator", SPHERE_OPERATORS)
def test_cuda_tf32_is_finite_and_accurate(operator):
    torch.manual_seed(5)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        layer = SphereConv2d(32, 8, 3, padding=1, operator=operator, device="cuda")
        x = torch.randn(2, 32, 8, 8, device="cuda", requires_grad=True)
        out = layer(x)
        expected = ref.sphere_conv_reference(
            x.detach().double().cpu(),
            layer.weight.detach().double().cpu(),
            operator,
            layer.effective_k().detach().double().cpu().reshape(-1, 1, 1) if operator == "learnable_sigmoid" else 0.3,
            padding=1,
        )
        torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=1e-2)
        _finite_grads(layer, x, out)
        # Exactly collinear under TF32: input = filter.
        collinear = layer.weight.detach()[:1].clone().requires_grad_()
        single = SphereConv2d(32, 1, 3, operator=operator, device="cuda")
        with torch.no_grad():
            single.weight.copy_(collinear.detach() * 1e3)
        y = single(collinear)
        assert abs(float(y) - 1.0) < 1e-3
        _finite_grads(single, collinear, y)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# Under fp16 autocast the input itself is cast to fp16 for the convolution: it must be representable
# there (|x| < 65504) and so must <w/|w|, x> <= |x|_1.
FP16_RANGE = [0.0, 1e-30, 1e-5, 1.0, 1e3]


@cuda
def test_cuda_fuzz_extreme_magnitudes_under_fp16_autocast():
    generator = torch.Generator().manual_seed(6)
    for trial in range(20):
        layer = SphereConv2d(3, 4, 3, padding=1, operator="learnable_sigmoid", device="cuda")
        with torch.no_grad():
            layer.weight.copy_(_extreme_tensor(layer.weight.shape, FULL_RANGE, "mixed", torch.float32, generator))
        x = (
            _extreme_tensor((2, 3, 5, 5), FP16_RANGE, "mixed" if trial % 2 else "uniform", torch.float32, generator)
            .cuda()
            .requires_grad_()
        )
        with torch.autocast("cuda", dtype=torch.float16):
            out = layer(x)
        _finite_grads(layer, x, out)
        assert math.isfinite(float(out.abs().max()))
