"""The fused SphereConv / SphereLinear (``impl="fused"``, the default) against the reference path.

Forward values and every gradient (input, weight, bias, learnable k) must agree to float32
rounding (relative error < 1e-5) for every operator and geometry; bf16 autocast within bf16
rounding; float64 gradcheck; the saved state must be smaller than the reference path's; and the
Triton epilogue kernels are checked under ``TRITON_INTERPRET=1`` on CPU tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sphereconv.nn.functional as SF
from sphereconv.nn import SphereConv2d, SphereLinear, _cpu_kernels, _fused

OPERATORS = ["cosine", "linear", "sigmoid", "learnable_sigmoid"]
FP32_TOL = 1e-5
# bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.004 per value); sums of a few dozen
# rounded products and their gradients stay within a few percent of the largest value.
BF16_TOL = 3e-2

# (spatial dims, in_channels, out_channels, kernel, keyword arguments)
GEOMETRIES = {
    "2d-pad1": (2, 4, 6, 3, dict(stride=1, padding=1)),
    "2d-stride2-dil2-groups2": (2, 4, 6, 3, dict(stride=2, padding=2, dilation=2, groups=2)),
    "2d-asym-stride-pad": (2, 3, 5, (3, 2), dict(stride=(2, 1), padding=(0, 1))),
    "2d-same-even-kernel": (2, 3, 4, 2, dict(padding="same")),
    "2d-valid-dilated": (2, 3, 4, 3, dict(padding="valid", dilation=(1, 2))),
    "2d-depthwise": (2, 4, 8, 3, dict(padding=1, groups=4)),
    "1d": (1, 3, 5, 3, dict(stride=2, padding=1)),
    "1d-same": (1, 3, 5, 4, dict(padding="same", dilation=2)),
    "3d": (3, 2, 3, 3, dict(stride=(1, 2, 1), padding=(1, 0, 1))),
}


def _fused_conv(out: torch.Tensor) -> bool:
    """Whether ``out`` came from the fused SphereConv: its Python autograd function, or the whole layer
    as the C++ operator (CPU, where every C++ kernel applies)."""
    return out.grad_fn is not None and out.grad_fn.name() in (
        "_FusedSphereConvFnBackward",
        _cpu_kernels.AUTOGRAD_NODE,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _conv_case(geometry: str, operator: str, dtype=torch.float32, bias=True, seed=0):
    dims, cin, cout, kernel, kwargs = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(seed)
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    x = torch.randn(2, cin, *([7] * dims), generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(cout, cin // kwargs.get("groups", 1), *kernel, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(cout, generator=gen, dtype=dtype).requires_grad_() if bias else None
    k = (
        (torch.rand(cout, generator=gen, dtype=dtype) + 0.2).requires_grad_()
        if operator == "learnable_sigmoid"
        else 0.3
    )
    return x, w, b, k, kwargs


def _run(fn, inputs, seed=1):
    out = fn()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


def _conv_pair(x, w, b, k, kwargs, operator):
    inputs = [t for t in (x, w, b, k) if isinstance(t, torch.Tensor)]
    results = {}
    for impl in ("fused", "reference"):
        results[impl] = _run(
            functools.partial(SF.sphere_convnd, x, w, b, operator=operator, sigmoid_k=k, impl=impl, **kwargs), inputs
        )
    return results["fused"], results["reference"]


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_fused_conv_matches_reference_forward_and_all_gradients(geometry, operator):
    x, w, b, k, kwargs = _conv_case(geometry, operator)
    (out_f, grads_f), (out_r, grads_r) = _conv_pair(x, w, b, k, kwargs, operator)
    assert _fused_conv(out_f)
    assert out_f.shape == out_r.shape and out_f.dtype == out_r.dtype
    assert _rel(out_f, out_r) < FP32_TOL
    names = ["input", "weight", "bias", "k"]
    for name, gf, gr in zip(names, grads_f, grads_r):
        assert _rel(gf, gr) < FP32_TOL, f"{name} gradient differs"


@pytest.mark.parametrize("operator", OPERATORS)
def test_fused_conv_unbatched_channels_last_and_scalar_k_tensor(operator):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 6, requires_grad=True)  # unbatched
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    k = torch.tensor(0.4, requires_grad=True)  # one learnable k for every channel
    inputs = [x, w, k] if "sigmoid" in operator else [x, w]
    kk = k if "sigmoid" in operator else 0.3
    f = _run(lambda: SF.sphere_conv2d(x, w, padding=1, operator=operator, sigmoid_k=kk, impl="fused"), inputs)
    r = _run(lambda: SF.sphere_conv2d(x, w, padding=1, operator=operator, sigmoid_k=kk, impl="reference"), inputs)
    assert f[0].shape == (4, 6, 6)
    for a, b in zip((f[0], *f[1]), (r[0], *r[1])):
        assert _rel(a, b) < FP32_TOL
    xc = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    f = _run(lambda: SF.sphere_conv2d(xc, w, padding=1, operator=operator, impl="fused"), [xc, w])
    r = _run(lambda: SF.sphere_conv2d(xc, w, padding=1, operator=operator, impl="reference"), [xc, w])
    for a, b in zip((f[0], *f[1]), (r[0], *r[1])):
        assert _rel(a, b) < FP32_TOL


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 3, 7)], ids=["batch", "unbatched", "3-d"])
def test_fused_linear_matches_reference(operator, shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen).requires_grad_()
    w = torch.randn(6, 7, generator=gen).requires_grad_()
    b = torch.randn(6, generator=gen).requires_grad_()
    k = (torch.rand(6, generator=gen) + 0.2).requires_grad_() if operator == "learnable_sigmoid" else 0.3
    inputs = [t for t in (x, w, b, k) if isinstance(t, torch.Tensor)]
    f = _run(lambda: SF.sphere_linear(x, w, b, operator=operator, sigmoid_k=k, impl="fused"), inputs)
    r = _run(lambda: SF.sphere_linear(x, w, b, operator=operator, sigmoid_k=k, impl="reference"), inputs)
    assert f[0].grad_fn.name() == "_FusedSphereLinearFnBackward"
    assert _rel(f[0], r[0]) < FP32_TOL
    for gf, gr in zip(f[1], r[1]):
        assert _rel(gf, gr) < FP32_TOL


@pytest.mark.parametrize("operator", OPERATORS)
def test_fused_bf16_autocast_matches_reference_within_bf16_rounding(operator):
    x, w, b, k, kwargs = _conv_case("2d-pad1", operator, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out_f, grads_f), (out_r, grads_r) = _conv_pair(x, w, b, k, kwargs, operator)
    assert out_f.dtype == out_r.dtype == torch.float32  # g is computed and returned in float32
    assert _rel(out_f, out_r) < BF16_TOL
    for gf, gr in zip(grads_f, grads_r):
        assert gf.dtype == gr.dtype
        assert _rel(gf, gr) < BF16_TOL
    # and the bf16 result is a bf16-accurate approximation of the float32 one
    out_32, _ = _run(lambda: SF.sphere_convnd(x, w, b, operator=operator, sigmoid_k=k, impl="fused", **kwargs), [x])
    assert _rel(out_f, out_32) < BF16_TOL


def test_fused_pure_bf16_inputs_return_bf16_like_the_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    f = _run(lambda: SF.sphere_conv2d(x, w, operator="linear", impl="fused"), [x, w])
    r = _run(lambda: SF.sphere_conv2d(x, w, operator="linear", impl="reference"), [x, w])
    assert f[0].dtype == torch.bfloat16 and f[1][0].dtype == torch.bfloat16 and f[1][1].dtype == torch.bfloat16
    for a, b in zip((f[0], *f[1]), (r[0], *r[1])):
        assert _rel(a, b) < BF16_TOL


@pytest.mark.parametrize("operator", OPERATORS)
def test_fused_gradcheck_float64(operator):
    x, w, b, k, kwargs = _conv_case("2d-stride2-dil2-groups2", operator, dtype=torch.float64)
    x = x[:1, :, :5, :5].detach().requires_grad_()
    inputs = tuple(t for t in (x, w, b, k) if isinstance(t, torch.Tensor))

    def conv(*args):
        xx, ww, bb, *kk = args
        return SF.sphere_convnd(xx, ww, bb, operator=operator, sigmoid_k=kk[0] if kk else 0.3, impl="fused", **kwargs)

    assert torch.autograd.gradcheck(conv, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    lx = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lk = (torch.rand(4, dtype=torch.float64) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, bw, bb, kk: SF.sphere_linear(a, bw, bb, operator=operator, sigmoid_k=kk, impl="fused"),
        (lx, lw, lb, lk),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )


@pytest.mark.parametrize("operator", OPERATORS)
def test_fused_saturated_and_zero_patches_give_finite_gradients_like_the_reference(operator):
    # Patches parallel to the filter (|cos| rounds to 1 or past it) and an all-zero input patch.
    torch.manual_seed(0)
    w = 1e2 * torch.randn(2, 3, 3, 3)
    eps = 1e-12  # relative to the largest value: below float32 resolution, so cos rounds to +-1
    x = torch.zeros(2, 3, 5, 5)
    x[0, :, 1:4, 1:4] = 10.0 * w[0]
    x[1, :, 1:4, 1:4] = -7.0 * w[1]
    x[:, :, 4, 4] = 0.0
    x.requires_grad_()
    w.requires_grad_()
    kk = torch.full((2,), 0.3, requires_grad=True) if operator == "learnable_sigmoid" else 0.3
    inputs = [x, w, kk] if operator == "learnable_sigmoid" else [x, w]
    f = _run(lambda: SF.sphere_conv2d(x, w, padding=1, operator=operator, sigmoid_k=kk, eps=eps, impl="fused"), inputs)
    r = _run(
        lambda: SF.sphere_conv2d(x, w, padding=1, operator=operator, sigmoid_k=kk, eps=eps, impl="reference"), inputs
    )
    assert f[0].abs().max() <= 1.0 + 1e-6
    # theta is within float32 rounding of 0 / pi (the linear g = 1 - 2 theta/pi is the most sensitive)
    out = f[0].detach()
    assert abs(float(out[0, 0, 2, 2]) - 1.0) < 1e-3 and abs(float(out[1, 1, 2, 2]) + 1.0) < 1e-3
    assert _rel(f[0], r[0]) < FP32_TOL
    for g in f[1]:
        assert torch.isfinite(g).all()
    # g'(c) is capped by the dtype-aware arccos bound (float32: 1/sqrt(2^-23) = 2896.3)
    cap = 1.0 / torch.finfo(torch.float32).eps ** 0.5
    assert float(_fused._acos_derivative_cap(torch.float32)) == pytest.approx(cap, rel=1e-6)


def _saved_bytes(fn) -> tuple[int, list[tuple[int, ...]]]:
    shapes: list[tuple[int, ...]] = []
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total, shapes


@pytest.mark.parametrize("operator", OPERATORS)
def test_fused_saves_only_what_its_backward_needs(operator):
    torch.manual_seed(0)
    layer = SphereConv2d(8, 16, 3, padding=1, operator=operator)
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    out_shape = (4, 16, 12, 12)
    fused, shapes = _saved_bytes(lambda: layer(x))
    with SF.use_reference_impl():
        reference, ref_shapes = _saved_bytes(lambda: layer(x))
    # the input, the normalised weight and its norm, the cosine (plus 2u = asin(c)/k for the
    # sigmoids), the inverse patch norm (one channel) and k, and the largest values with their
    # signs: two values per sample-group and per filter (plus the power-of-two scales where the
    # values are rescaled, which inputs and filters near 1 on CPU are not)
    output_sized = sum(1 for s in shapes if math.prod(s) == math.prod(out_shape))
    assert output_sized == (2 if "sigmoid" in operator else 1)
    assert (4, 1, 12, 12) in shapes and (4, 8, 12, 12) in shapes
    assert sum(1 for s in shapes if s in ((4, 1), (16,))) == 2 + 2 + (2 if operator == "learnable_sigmoid" else 0)
    # (the learnable k = |raw| + 0.05 adds its own two small saved tensors outside the node)
    assert len(shapes) <= (14 if operator == "learnable_sigmoid" else 12)
    out_bytes = 4 * 16 * 12 * 12 * 4
    assert fused <= x.numel() * 4 + output_sized * out_bytes + layer.weight.numel() * 4 + 4 * 144 * 4 + 8 * 16 * 8 + 512
    assert fused < 0.6 * reference, (fused, reference, ref_shapes)


def test_impl_switch_and_errors():
    torch.manual_seed(0)
    layer = SphereConv2d(3, 4, 3, operator="linear")
    x = torch.randn(1, 3, 5, 5)
    assert _fused_conv(layer(x))
    with SF.use_reference_impl():
        assert not _fused_conv(layer(x))
        with SF.use_reference_impl(False):
            assert _fused_conv(layer(x))
        assert _fused_conv(SF.sphere_conv2d(x, layer.weight, impl="fused"))
    assert _fused_conv(layer(x))
    lin = SphereLinear(5, 2)
    assert lin(torch.randn(3, 5)).grad_fn.name() == "_FusedSphereLinearFnBackward"
    with pytest.raises(ValueError, match="impl must be one of auto, fused, reference; got 'fast'"):
        SF.sphere_conv2d(x, layer.weight, impl="fast")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        SF.sphere_conv2d(x, layer.weight, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be an int.*'full'"):
        SF.sphere_conv2d(x, layer.weight, padding="full")
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        SF.sphere_conv2d(x[..., :2, :2], layer.weight)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_layer_padding_modes_take_the_fused_path_and_match(padding_mode):
    torch.manual_seed(0)
    layer = SphereConv2d(3, 4, 3, padding=1, padding_mode=padding_mode, operator="sigmoid", bias=True)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    f = _run(lambda: layer(x), [x, layer.weight, layer.bias])
    with SF.use_reference_impl():
        r = _run(lambda: layer(x), [x, layer.weight, layer.bias])
    for a, b in zip((f[0], *f[1]), (r[0], *r[1])):
        assert _rel(a, b) < FP32_TOL


def test_box_sum_matches_a_convolution_with_ones_and_its_transpose_is_the_adjoint():
    torch.manual_seed(0)
    cases = [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (2, 1), (2, 0), (2, 3)), ((4, 4), (1, 1), (0, 0), (1, 1))]
    for kernel, stride, padding, dilation in cases:
        t = torch.rand(2, 3, 9, 8, dtype=torch.float64)
        ones = torch.ones(3, 1, *kernel, dtype=torch.float64)
        expected = torch.nn.functional.conv2d(t, ones, None, stride, padding, dilation, groups=3)
        got = _fused.box_sum(t, kernel, stride, padding, dilation)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        g = torch.rand_like(got)
        back = _fused.box_sum_transpose(g, t.shape[2:], kernel, stride, padding, dilation)
        # <box(t), g> == <t, box^T(g)>
        assert float((got * g).sum()) == pytest.approx(float((t * back).sum()), rel=1e-12)


def test_torch_compile_and_export_trace_the_fused_path():
    torch.manual_seed(0)
    layer = SphereConv2d(3, 4, 3, padding=1, operator="learnable_sigmoid", bias=True)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    grad_out = torch.randn(2, 4, 6, 6)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c, [x, *layer.parameters()], grad_out)
    out_e = layer(x)
    grads_e = torch.autograd.grad(out_e, [x, *layer.parameters()], grad_out)
    assert _fused_conv(out_e)
    assert _rel(out_c, out_e) < 1e-6
    for a, b in zip(grads_c, grads_e):
        assert _rel(a, b) < FP32_TOL
    exported = torch.export.export(layer.eval(), (x.detach(),))
    with torch.no_grad():
        other = torch.randn(2, 3, 6, 6)
        assert _rel(exported.module()(other), layer(other)) < 1e-6


# ------------------------------------------------------------------------------------------
# Triton kernels (optional dependency): interpreter on CPU tensors, and a compile to sm_90 PTX
# ------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (extra 'triton')"
)


def _triton_interpreter_checks() -> None:
    """Fused path with the Triton kernels vs the reference path; run with TRITON_INTERPRET=1.

    Triton decides between interpreting and compiling when it is first imported, so this runs in
    a fresh process (see the test below), with CPU tensors routed through the kernels.
    """
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    from sphereconv.nn import _triton

    _fused._triton_on_cpu = True
    _fused.set_kernel_backend("triton")  # forced: no self-check calls in the counts below
    calls = {"forward_epilogue": 0, "backward_epilogue": 0, "channel_sq_sum": 0}
    for name in calls:
        original = getattr(_triton, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(_triton, name, counted)
    # 1. whole layer, every operator, grouped/strided/dilated 2-d and 1-d, float32
    for geometry in ("2d-stride2-dil2-groups2", "1d"):
        for operator in OPERATORS:
            x, w, b, k, kwargs = _conv_case(geometry, operator, seed=11)
            (out_f, grads_f), (out_r, grads_r) = _conv_pair(x, w, b, k, kwargs, operator)
            assert _rel(out_f, out_r) < FP32_TOL, (geometry, operator)
            for gf, gr in zip(grads_f, grads_r):
                assert _rel(gf, gr) < FP32_TOL, (geometry, operator)
    assert calls == {"forward_epilogue": 8, "backward_epilogue": 8, "channel_sq_sum": 8}, calls
    # 2. bf16 / fp16 storage, float32 math: kernels vs the ATen epilogue on the same stored values
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float16):
        inner = torch.randn(2, 6, 5, 4, generator=gen).to(dtype)
        r = torch.rand(2, 2, 5, 4, generator=gen) * 0.3
        grad = torch.randn(2, 6, 5, 4, generator=gen)
        k = torch.rand(6, generator=gen) + 0.2
        bias = torch.randn(6, generator=gen)
        out = _triton.forward_epilogue(inner, r, 2, "learnable_sigmoid", k, bias, torch.float32)
        c = inner.float().unflatten(1, (2, 3)) * r.unsqueeze(2)
        expected, v = _fused.forward_epilogue(
            c, "learnable_sigmoid", k.reshape(2, 3, 1, 1), bias.reshape(2, 3, 1, 1), keep_angle=True
        )
        assert _rel(out, expected.reshape(out.shape)) < 1e-6, dtype
        d_inner, d_sq, d_k, d_bias = _triton.backward_epilogue(
            grad, inner, r, 2, "learnable_sigmoid", k, True, True, dtype
        )
        assert d_inner.dtype == dtype
        d_c, scale, dk_elem, dk_scale = _fused.backward_epilogue(
            grad.unflatten(1, (2, 3)), c, v, "learnable_sigmoid", k.reshape(2, 3, 1, 1), True
        )
        assert _rel(d_inner.float(), (d_c * scale * r.unsqueeze(2)).reshape(d_inner.shape)) < 1e-2  # stored in dtype
        assert _rel(d_sq, (d_c * c).sum(2) * r.square() * (-0.5 * scale)) < 1e-5
        assert _rel(d_k, (dk_elem.sum_to_size(2, 3, 1, 1) * dk_scale).reshape(-1)) < 1e-5
        assert _rel(d_bias, grad.sum((0, 2, 3))) < 1e-6
        assert _rel(_triton.channel_sq_sum(inner, 2), _fused.channel_sq_sum(inner, 2)) < 1e-6
    # 3. channels-last storage is addressed through strides, without a copy
    inner = torch.randn(2, 4, 3, 5, generator=gen).to(memory_format=torch.channels_last)
    r = torch.rand(2, 1, 3, 5, generator=gen)
    out = _triton.forward_epilogue(inner, r, 1, "cosine", 0.3, None, torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert _rel(out, (inner * r).clamp(-1, 1)) < 1e-7
    # 4. the in-kernel arcsine series is float32-accurate over all of [-1, 1]
    c = torch.linspace(-1.0, 1.0, 4001)
    out = _triton.forward_epilogue(c.reshape(1, 1, -1), torch.ones(1, 1, 4001), 1, "linear", 0.3, None, torch.float32)
    assert float((out.reshape(-1).double() - torch.asin(c.double()) * (2.0 / math.pi)).abs().max()) < 3e-7
    # 5. "auto": the self-check at first use passes the real kernels, which stay selected, silently
    _fused.set_kernel_backend(None)
    assert _fused.kernel_backend() == "auto"
    _fused.reset_kernel_status()
    before = calls["forward_epilogue"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for operator in OPERATORS:
            x, w, b, k, kwargs = _conv_case("2d-pad1", operator, seed=12)
            (out_f, grads_f), (out_r, grads_r) = _conv_pair(x, w, b, k, kwargs, operator)
            for a, e in zip((out_f, *grads_f), (out_r, *grads_r)):
                assert _rel(a, e) < FP32_TOL, operator
        for dtype in (torch.bfloat16, torch.float16):  # the autocast storage dtypes of the kernels
            assert _fused._self_check("learnable_sigmoid", dtype, torch.device("cpu")) is None, dtype
    status = _fused.kernel_status()
    assert [(case["operator"], case["dtype"], case["kernels"]) for case in status["cases"]] == [
        (op, "float32", "triton") for op in sorted(OPERATORS)
    ], status
    assert calls["forward_epilogue"] - before == 4 + 4 + 2  # 4 first-use checks, 4 layer calls, 2 direct checks
    print("triton interpreter checks passed")


@needs_triton
def test_triton_kernels_under_the_interpreter_match_reference():
    code = (
        "import importlib.util as u; "
        f"s = u.spec_from_file_location('fused_checks', {__file__!r}); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); m._triton_interpreter_checks()"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton interpreter checks passed" in proc.stdout


@needs_triton
def test_triton_kernels_compile_for_a_hopper_gpu_without_one():
    """The non-interpreted path: every kernel lowers to PTX/cubin for sm_90 (no GPU needed), the
    epilogues for each operator code and with their optional outputs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sphereconv.nn import _triton

    target = GPUTarget("cuda", 90, 32)

    def i32(*names):
        return {name: "i32" for name in names}

    square_sum = {
        "x_ptr": "*bf16",
        "out_ptr": "*fp32",
        **i32("C_PER_G", "S", "G", "sxn", "sxc", "sxs"),
        "BLOCK_C": "constexpr",
        "BLOCK_S": "constexpr",
    }
    forward = {
        "inner_ptr": "*bf16",
        "r_ptr": "*fp32",
        "inv_k_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "bias_ptr": "*fp32",
        "out_ptr": "*fp32",
        **i32("C", "P", "S", "G", "sin_n", "sin_c", "sin_s", "so_n", "so_c", "so_s"),
        "OP": "constexpr",
        "HAS_BIAS": "constexpr",
        "BLOCK_C": "constexpr",
        "BLOCK_S": "constexpr",
    }
    backward = {
        "grad_ptr": "*fp32",
        "inner_ptr": "*bf16",
        "r_ptr": "*fp32",
        "inv_k_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "coef_ptr": "*fp32",
        "d_inner_ptr": "*bf16",
        "d_sq_ptr": "*fp32",
        "part_bias_ptr": "*fp32",
        "part_k_ptr": "*fp32",
        **i32("C", "P", "S", "G", "NUM_SB"),
        "ACOS_FLOOR": "fp32",
        "ACOS_CAP": "fp32",
        **i32("sg_n", "sg_c", "sg_s", "sin_n", "sin_c", "sin_s", "sd_n", "sd_c", "sd_s"),
        "OP": "constexpr",
        "SAVED_IS_COS": "constexpr",
        "NEED_BIAS": "constexpr",
        "NEED_K": "constexpr",
        "BLOCK_C": "constexpr",
        "BLOCK_S": "constexpr",
    }
    blocks = {"BLOCK_C": 16, "BLOCK_S": 128}
    cases = [(_triton._sq_sum_kernel, square_sum, blocks)]
    for op in sorted(set(_triton.OPERATOR_CODES.values())):
        cases.append((_triton._forward_kernel, forward, {"OP": op, "HAS_BIAS": op == 2, **blocks}))
        cases.append(
            (
                _triton._backward_kernel,
                backward,
                {"OP": op, "SAVED_IS_COS": op != 2, "NEED_BIAS": op != 1, "NEED_K": op == 2, **blocks},
            )
        )
    assert len(cases) == 7
    for kernel, signature, constants in cases:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constants),
            target=target,
            options={"enable_fp_fusion": _triton.FP_FUSION},
        )
        assert ".target sm_90" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0, (kernel, constants)


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
@pytest.mark.parametrize("groups", [1, 2])
def test_output_accepts_in_place_ops_like_relu_inplace(operator, groups):
    torch.manual_seed(0)
    layer = SphereConv2d(4, 6, 3, groups=groups, operator=operator).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(torch.relu(layer(x)).sum(), x)[0]
    out = layer(x)
    out.relu_()  # raised "is a view and is being modified inplace" before outputs were detached aliases
    got = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(got, expected)
