"""The C++ CPU kernels of the fused path against its ATen path, their switch and their fallback.

Every operator, float32 and float64, forward and every gradient (input, weight, bias, learnable k),
with groups, stride, dilation and inputs that need the power-of-two rescaling; the kernels must be
built (a C++ compiler is present where these tests run) or the tests say why they are skipped.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import sphereconv.nn as snn
from sphereconv.nn import SphereConv2d, _cpu_kernels, _fused
from sphereconv.nn import functional as SF

OPERATORS = ["cosine", "linear", "sigmoid", "learnable_sigmoid"]
# Largest difference relative to the largest value: float32: the kernels' arcsine and exponential
# are float32-accurate polynomials (2.5e-7 relative) and their sums run in another order; float64
# uses the C library: rounding differences only.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}

# Without a C++ compiler there is nothing to test; with one, the kernels must build (test below).
pytestmark = pytest.mark.skipif(_cpu_kernels._compiler() is None, reason="no C++ compiler")


def test_the_kernels_build_and_load_where_a_compiler_is_present():
    assert _cpu_kernels.load() is not None, _cpu_kernels.load_error()


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    snn.set_kernel_backend(None)


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    got, expected = got.detach(), expected.detach()
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = float(expected.abs().max())
    error = float((got - expected).abs().max())
    assert error <= TOL[expected.dtype] * scale, (error, scale)


def _run(backend: str, fn, inputs):
    snn.set_kernel_backend(backend)
    out = fn()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


GEOMETRIES = {
    "plain": dict(stride=1, padding=1, dilation=1, groups=1),
    "groups-stride": dict(stride=2, padding=1, dilation=1, groups=2),
    "dilated": dict(stride=1, padding=2, dilation=2, groups=1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("operator", OPERATORS)
def test_cpp_kernels_match_the_aten_path_forward_and_backward(operator, geometry, dtype):
    torch.manual_seed(0)
    args = GEOMETRIES[geometry]
    x = torch.randn(3, 4, 9, 7, dtype=dtype).relu_().requires_grad_()  # peaks of one sign, as behind a ReLU
    w = torch.randn(6, 4 // args["groups"], 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    k = torch.rand(6, dtype=dtype).add_(0.2).requires_grad_() if operator == "learnable_sigmoid" else 0.3
    inputs = [x, w, b] + ([k] if operator == "learnable_sigmoid" else [])

    def fn():
        return SF.sphere_conv2d(x, w, b, operator=operator, sigmoid_k=k, impl="fused", **args)

    out_c, grads_c = _run("cpp", fn, inputs)
    out_a, grads_a = _run("aten", fn, inputs)
    _assert_close(out_c, out_a)
    for got, expected in zip(grads_c, grads_a):
        _assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("operator", ["linear", "sigmoid", "learnable_sigmoid"])
def test_cpp_arcsine_blocks_match_the_aten_epilogue(operator, dtype):
    # Blocks of cosines all within 1/2 take the arcsine's short branch: one all-small block, one with
    # a single large cosine, one with 1/2 exactly, -1 exactly and values beyond +-1 (clamped)
    block = _cpu_kernels.KERNEL_ARCSINE_BLOCK
    assert f"kArcsineBlock = {block};" in _cpu_kernels.source()
    cos = torch.linspace(-0.45, 0.45, 3 * block + 17, dtype=dtype)
    cos[block + 5] = 0.93
    cos[2 * block + 1 : 2 * block + 5] = torch.tensor([0.5, -1.0, 1.5, -1.2], dtype=dtype)
    cos = cos.reshape(1, 1, 1, -1)
    r = torch.full_like(cos, 0.5)
    grad = torch.randn(cos.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    learnable = operator == "learnable_sigmoid"
    k = torch.tensor([0.35], dtype=dtype) if learnable else 0.3
    inner = cos / r
    out, extra, _ = _cpu_kernels.forward_epilogue(inner, r, 1, operator, k, None)
    expected, expected_extra = _fused.forward_epilogue(cos.unsqueeze(1), operator, k, None, keep_angle=learnable)
    _assert_close(inner, cos)
    _assert_close(out, expected.reshape(out.shape))
    eps = torch.finfo(dtype).eps
    cap = _fused._acos_derivative_cap(dtype)
    d_inner, d_sq, d_k, _ = _cpu_kernels.backward_epilogue(
        grad, inner, extra, r, 1, operator, k, learnable, False, eps, cap
    )
    d_c, scale, d_k_elem, d_k_scale = _fused.backward_epilogue(
        grad.unsqueeze(1), cos.unsqueeze(1), expected_extra, operator, k, learnable
    )
    _assert_close(d_inner, (d_c * scale).reshape(cos.shape) * r)
    if learnable:
        _assert_close(d_k, (d_k_elem.sum() * d_k_scale).reshape(1))


@pytest.mark.parametrize("k", [0.3, 0.01], ids=["k=0.3", "k=0.01"])
def test_cpp_sigmoid_matches_the_aten_epilogue_where_the_exponential_saturates(k):
    # k = 0.01: 2u = asin(c)/k reaches +-157, beyond the float exponential's range (the kernel clamps
    # it); k = 0.3 stays within it (the kernel skips the clamp)
    cos = torch.linspace(-1.0, 1.0, 301).reshape(1, 1, 1, -1)
    r = torch.ones_like(cos)
    out, _, _ = _cpu_kernels.forward_epilogue(cos.clone(), r, 1, "sigmoid", k, None)
    expected, _ = _fused.forward_epilogue(cos.unsqueeze(1), "sigmoid", k, None)
    assert torch.isfinite(out).all()
    _assert_close(out, expected.reshape(out.shape))


@pytest.mark.parametrize("k", [0.262, 0.3, 2.0, 0.25])
def test_cpp_sigmoid_of_small_cosines_is_float32_accurate(k):
    # Blocks of |c| <= 1/2 take tanh's polynomial for k >= pi/12 (|u| <= 1; k = 0.262 reaches
    # |u| = 0.9992 at c = +-1/2), the exponential below (k = 0.25); both within a few float32
    # roundings of the float64 formula: s_k tanh(asin(c) / 2k), and sigmoid(2u) for the backward.
    block = _cpu_kernels.KERNEL_ARCSINE_BLOCK
    cos = torch.linspace(-0.5, 0.5, 16 * block, dtype=torch.float64).reshape(1, 1, 1, -1)
    u = torch.asin(cos) / (2 * k)
    scale = 1 / math.tanh(math.pi / (4 * k))  # s_k
    out, extra, _ = _cpu_kernels.forward_epilogue(cos.float(), torch.ones_like(cos).float(), 1, "sigmoid", k, None)
    assert float((out.double() - scale * torch.tanh(u)).abs().max()) <= 4e-7 * scale
    assert float((extra.double() - torch.sigmoid(2 * u)).abs().max()) <= 2e-7


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("operator", ["cosine", "sigmoid"])
def test_cpp_kernels_match_the_aten_path_in_1d_and_3d(operator, dims):
    # the windows of the patch norms and their transpose: strided, padded, dilated, grouped
    torch.manual_seed(3)
    conv = SF.sphere_conv1d if dims == 1 else SF.sphere_conv3d
    x = torch.randn(2, 4, *([7] * dims)).relu_().requires_grad_()
    w = torch.randn(6, 2, *([3] * dims), requires_grad=True)
    inputs = [x, w]

    def fn():
        return conv(x, w, None, stride=2, padding=2, dilation=2, groups=2, operator=operator, impl="fused")

    out_c, grads_c = _run("cpp", fn, inputs)
    out_a, grads_a = _run("aten", fn, inputs)
    _assert_close(out_c, out_a)
    for got, expected in zip(grads_c, grads_a):
        _assert_close(got, expected)


@pytest.mark.parametrize("operator", OPERATORS)
def test_cpp_kernels_match_with_rescaled_inputs_and_filters_and_signed_peaks(operator):
    # largest values outside [2^-40, 2^40] (rescaled by powers of two), negative largest elements,
    # an all-zero sample: the C++ peak gradients must land where the ATen ones do
    torch.manual_seed(1)
    x = torch.randn(4, 4, 6, 6)
    x[0] *= 1e-20
    x[1] *= 1e20
    x[2] = 0.0
    x[3, 1, 2, 3] = -40.0
    x.requires_grad_()
    w = torch.randn(5, 4, 3, 3)
    w[0] *= 1e-30
    w[1, 2, 1, 1] = -9.0
    w.requires_grad_()
    inputs = [x, w]

    def fn():
        return SF.sphere_conv2d(x, w, padding=1, operator=operator, impl="fused")

    out_c, grads_c = _run("cpp", fn, inputs)
    out_a, grads_a = _run("aten", fn, inputs)
    _assert_close(out_c, out_a)
    for got, expected in zip(grads_c, grads_a):
        _assert_close(got, expected)


def test_cpp_kernels_with_two_threads_match_the_aten_path():
    torch.manual_seed(2)
    layer = SphereConv2d(8, 8, 3, padding=1, operator="learnable_sigmoid")
    x = torch.randn(6, 8, 32, 32, requires_grad=True)  # above the kernels' one-thread size (_GRAIN_SIZE)
    assert x.numel() >= _cpu_kernels._GRAIN_SIZE
    inputs = [x, *layer.parameters()]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out_c, grads_c = _run("cpp", lambda: layer(x), inputs)
        out_a, grads_a = _run("aten", lambda: layer(x), inputs)
    finally:
        torch.set_num_threads(threads)
    _assert_close(out_c, out_a)
    for got, expected in zip(grads_c, grads_a):
        _assert_close(got, expected)


def _count_calls(monkeypatch, names: list[str]) -> dict[str, int]:
    """Count the calls of these functions of _cpu_kernels (the fused path looks them up at each call),
    after the process's self-check of the kernels (whose calls are not counted)."""
    _fused._cpp_selected(torch.zeros(1, 1, 1, 1), torch.float32)
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(_cpu_kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_cpu_kernels, name, counted)
    return calls


def test_cpp_kernels_take_the_cpu_calls_and_the_switch_turns_them_off(monkeypatch):
    calls = _count_calls(monkeypatch, ["sphere_conv"])
    layer = SphereConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    for backend, expected in (("auto", 1), ("cpp", 1), ("aten", 0), ("triton", 0)):
        calls.update(sphere_conv=0)
        snn.set_kernel_backend(backend)
        out = layer(x)
        out.sum().backward()
        assert calls == {"sphere_conv": expected}, backend
        assert (out.grad_fn.name() == _cpu_kernels.AUTOGRAD_NODE) == (expected == 1), backend
    # channels-last outputs and float16/bfloat16 inputs stay on the ATen epilogue
    calls.update(sphere_conv=0)
    snn.set_kernel_backend("auto")
    layer(x.detach().to(memory_format=torch.channels_last)).sum().backward()
    layer.to(torch.bfloat16)(x.detach().bfloat16()).float().sum().backward()
    assert calls == {"sphere_conv": 0}


def test_values_that_need_rescaling_take_the_python_node_with_the_cpp_epilogue(monkeypatch):
    # a sample whose largest |x| lies outside the direct range: the operator declines (None) and the
    # autograd function rescales, its epilogue still the C++ kernels
    calls = _count_calls(monkeypatch, ["sphere_conv", "forward_epilogue", "backward_epilogue"])
    torch.manual_seed(0)
    layer = SphereConv2d(3, 4, 3, padding=1, operator="sigmoid", bias=True).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    x[1] *= 2.0**60
    x.requires_grad_(True)
    out = layer(x)
    grads = torch.autograd.grad(out, [x, layer.weight, layer.bias], torch.ones_like(out))
    assert calls == {"sphere_conv": 1, "forward_epilogue": 1, "backward_epilogue": 1}
    assert out.grad_fn.name() == "_FusedSphereConvFnBackward"
    with SF.use_reference_impl():
        expected = layer(x)
        expected_grads = torch.autograd.grad(expected, [x, layer.weight, layer.bias], torch.ones_like(expected))
    _assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        _assert_close(got, want)


def test_kernel_status_reports_the_cpu_kernels():
    _fused.reset_kernel_status()
    snn.set_kernel_backend("auto")
    assert snn.kernel_status()["cpu_kernels"] == "undecided"
    SphereConv2d(3, 4, 3)(torch.randn(1, 3, 5, 5)).sum().backward()
    status = snn.kernel_status()
    assert status["cpu_kernels"] == "cpp" and status["cpu_note"] and status["cases"] == []
    snn.set_kernel_backend("aten")
    assert snn.kernel_status()["cpu_kernels"] == "aten"


def test_a_failed_build_warns_once_and_falls_back_to_aten(monkeypatch):
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    monkeypatch.setattr(_cpu_kernels, "_tried", False)
    monkeypatch.setattr(_cpu_kernels, "_load_error", None)
    monkeypatch.setattr(_cpu_kernels, "_compiler", lambda: None)  # as on a machine without g++
    _fused.reset_kernel_status()
    snn.set_kernel_backend("auto")
    torch.manual_seed(3)
    layer = SphereConv2d(3, 4, 3, padding=1, operator="linear")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    try:
        with pytest.warns(RuntimeWarning, match="C\\+\\+ epilogue kernels could not be built"):
            out = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            out.sum().backward()
            layer(x)
        status = snn.kernel_status()
        assert status["cpu_kernels"] == "aten" and "no C++ compiler" in status["cpu_note"]
        with SF.use_reference_impl():
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
    finally:
        _fused.reset_kernel_status()


def test_a_self_check_mismatch_falls_back_to_aten(monkeypatch):
    original = _cpu_kernels.forward_epilogue

    def wrong(*args, **kwargs):
        out, extra, r = original(*args, **kwargs)
        return out.add_(1e-2), extra, r

    monkeypatch.setattr(_cpu_kernels, "forward_epilogue", wrong)
    _fused.reset_kernel_status()
    snn.set_kernel_backend("auto")
    try:
        with pytest.warns(RuntimeWarning, match="disagree with the ATen epilogue"):
            SphereConv2d(3, 4, 3)(torch.randn(1, 3, 5, 5))
        assert snn.kernel_status()["cpu_kernels"] == "aten"
    finally:
        _fused.reset_kernel_status()


@pytest.mark.parametrize("part", ["output", "gradient"])
def test_a_wrong_layer_operator_fails_the_self_check_and_the_layer_stays_on_aten(monkeypatch, part):
    original = _cpu_kernels.sphere_conv

    class _WrongGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            return out.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    def wrong(*args, **kwargs):
        out = original(*args, **kwargs)
        return out + 1e-2 if part == "output" else _WrongGradient.apply(out)

    monkeypatch.setattr(_cpu_kernels, "sphere_conv", wrong)
    _fused.reset_kernel_status()
    snn.set_kernel_backend("auto")
    try:
        with pytest.warns(RuntimeWarning, match=r"disagree with the ATen epilogue \((layer output|input gradient)"):
            out = SphereConv2d(3, 4, 3)(torch.randn(1, 3, 5, 5))
        assert snn.kernel_status()["cpu_kernels"] == "aten"
        assert out.grad_fn.name() == "_FusedSphereConvFnBackward"
    finally:
        _fused.reset_kernel_status()


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "saved_tensor_hooks"])
def test_the_self_check_is_independent_of_the_callers_autograd_state(context):
    # the first layer call of a process may come under no_grad or inference mode (an evaluation) or
    # inside saved-tensor hooks: the check's own autograd must neither fail there nor reach the hooks
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    contexts = {
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
        "saved_tensor_hooks": lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    }
    _fused.reset_kernel_status()
    snn.set_kernel_backend("auto")
    x = torch.randn(2, 3, 5, 5, requires_grad=context == "saved_tensor_hooks")
    layer = SphereConv2d(3, 4, 3, padding=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed check would warn
            with contexts[context]():
                out = layer(x)
        assert snn.kernel_status()["cpu_kernels"] == "cpp"
        with SF.use_reference_impl():
            _assert_close(out, layer(x))
        if context == "saved_tensor_hooks":  # only the layer's own tensors: no (2, 4, 7, 8) of the check
            assert (2, 3, 5, 5) in packed and (2, 4, 7, 8) not in packed, packed
    finally:
        _fused.reset_kernel_status()


def test_the_layer_operator_takes_an_empty_batch():
    # (its positions per plane were numel / (N C): an integer division by zero, SIGFPE, for N = 0)
    layer = SphereConv2d(3, 4, 3, padding=1, operator="learnable_sigmoid", bias=True)
    x = torch.randn(0, 3, 6, 6, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    assert out.shape == expected.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape
    assert out.grad_fn.name() == _cpu_kernels.AUTOGRAD_NODE
    assert torch.equal(layer.bias.grad, torch.zeros(4)) and torch.equal(x.grad, torch.zeros_like(x))


def test_the_layer_operator_reads_a_strided_bias_and_k_as_their_values():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    bias = torch.randn(8)[::2].requires_grad_()  # views with stride 2
    k = torch.rand(8).add(0.3)[::2].requires_grad_()
    inputs = [x, weight, bias, k]
    out = SF.sphere_conv2d(x, weight, bias, padding=1, operator="learnable_sigmoid", sigmoid_k=k)
    assert out.grad_fn.name() == _cpu_kernels.AUTOGRAD_NODE
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    expected = SF.sphere_conv2d(x, weight, bias, padding=1, operator="learnable_sigmoid", sigmoid_k=k, impl="reference")
    expected_grads = torch.autograd.grad(expected, inputs, torch.ones_like(expected))
    _assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        _assert_close(got, want)


@pytest.mark.parametrize("operator", ["cosine", "linear", "sigmoid", "learnable_sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_python_node_on_the_cpp_kernels_still_matches_the_reference(monkeypatch, operator, dtype):
    # the layer operator covers the usual calls; the autograd function with the same kernels serves
    # the rest (a bias or weight of another dtype, values that need rescaling) and must stay right
    calls = _count_calls(monkeypatch, ["forward_epilogue", "backward_epilogue", "filter_unit", "sample_stats"])
    monkeypatch.setattr(_fused, "_cpp_layer_selected", lambda *args: False)
    torch.manual_seed(0)
    layer = SphereConv2d(4, 6, 3, stride=2, padding=1, groups=2, operator=operator, bias=True).to(dtype)
    x = torch.randn(2, 4, 9, 8, dtype=dtype, requires_grad=True)
    inputs = [x, *layer.parameters()]
    out = layer(x)
    assert out.grad_fn.name() == "_FusedSphereConvFnBackward"
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert calls == dict.fromkeys(calls, 1)
    with SF.use_reference_impl():
        expected = layer(x)
        expected_grads = torch.autograd.grad(expected, inputs, torch.ones_like(expected))
    _assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        _assert_close(got, want)
