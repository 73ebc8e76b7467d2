"""The self-check of the Triton epilogue kernels at first use, and the switches that force a path.

On CPU the kernels are replaced by stand-ins (``_fused._triton_on_cpu`` routes CPU tensors to them):
correct ones built on the ATen epilogue, one that returns a wrong result and one whose launch
fails. The real kernels pass the same check under ``TRITON_INTERPRET=1`` in
``test_fused.py::test_triton_kernels_under_the_interpreter_match_reference``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import sphereconv.nn as snn
from sphereconv.nn import SphereConv2d, _fused, _triton
from sphereconv.nn import functional as SF

OPERATORS = ["cosine", "linear", "sigmoid", "learnable_sigmoid"]


def _chan(t: torch.Tensor, groups: int) -> tuple[int, ...]:
    return (groups, t.shape[1] // groups) + (1,) * (t.dim() - 2)


def _k_view(k, shape):
    return k.reshape(shape) if isinstance(k, torch.Tensor) and k.numel() > 1 else k


def aten_forward(inner, r, groups, operator, k, bias, out_dtype):
    """A correct stand-in for ``_triton.forward_epilogue``."""
    chan = _chan(inner, groups)
    c = inner.float().unflatten(1, chan[:2]) * r.unsqueeze(2)
    out, _ = _fused.forward_epilogue(c, operator, _k_view(k, chan), None if bias is None else bias.reshape(chan))
    return out.reshape(inner.shape).to(out_dtype)


def aten_backward(grad_out, saved, r, groups, operator, k, need_k, need_bias, d_inner_dtype, **_):
    """A correct stand-in for ``_triton.backward_epilogue``."""
    chan = _chan(saved, groups)
    need_k = need_k and operator in ("sigmoid", "learnable_sigmoid")
    c = saved.float().unflatten(1, chan[:2]) * r.unsqueeze(2)
    _, extra = _fused.forward_epilogue(c, operator, _k_view(k, chan), None, keep_angle=need_k)
    d_c, scale, dk, dk_scale = _fused.backward_epilogue(
        grad_out.float().unflatten(1, chan[:2]), c, extra, operator, _k_view(k, chan), need_k
    )
    d_c = d_c * scale
    d_k = None
    if need_k:
        d_k = (dk.sum_to_size(chan) * dk_scale).reshape(-1)
        d_k = d_k.sum().reshape(k.shape) if k.numel() == 1 else d_k
    d_bias = grad_out.float().sum([0, *range(2, grad_out.dim())]) if need_bias else None
    d_inner = (d_c * r.unsqueeze(2)).reshape(saved.shape).to(d_inner_dtype)
    return d_inner, (d_c * c).sum(2) * r.square() * -0.5, d_k, d_bias


def aten_sq_sum(x, groups):
    return x.float().square().unflatten(1, (groups, -1)).sum(2)


@pytest.fixture
def kernels(monkeypatch):
    """Route CPU tensors to stand-in kernels, counting their calls; 'auto' backend, no decisions yet."""
    calls = {"forward": 0, "backward": 0, "sq_sum": 0}
    impls = {"forward": aten_forward, "backward": aten_backward, "sq_sum": aten_sq_sum}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return impls[name](*args, **kwargs)

        return call

    monkeypatch.setattr(_fused, "_triton_on_cpu", True)
    monkeypatch.setattr(_triton, "forward_epilogue", counted("forward"))
    monkeypatch.setattr(_triton, "backward_epilogue", counted("backward"))
    monkeypatch.setattr(_triton, "channel_sq_sum", counted("sq_sum"))
    monkeypatch.delenv(_fused.KERNELS_ENV, raising=False)
    _fused.set_kernel_backend(None)
    _fused.reset_kernel_status()
    yield impls, calls
    _fused.set_kernel_backend(None)
    _fused.reset_kernel_status()


def _layer_and_grads(operator, seed=0):
    """Fused output and gradients of a grouped layer with bias, and the reference path's."""
    torch.manual_seed(seed)
    layer = SphereConv2d(4, 6, 3, padding=1, groups=2, bias=True, operator=operator)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    params = [x, *layer.parameters()]
    grad_out = torch.randn(2, 6, 6, 5)
    out = layer(x)
    fused = (out, *torch.autograd.grad(out, params, grad_out))
    with SF.use_reference_impl():
        out = layer(x)
        reference = (out, *torch.autograd.grad(out, params, grad_out))
    return fused, reference


def _assert_matches(fused, reference):
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _run_recording(operator, times=2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(times):
            _assert_matches(*_layer_and_grads(operator, seed))
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and "Triton" in str(w.message)]


def _case(operator):
    return next(c for c in _fused.kernel_status()["cases"] if c["operator"] == operator)


@pytest.mark.parametrize("operator", OPERATORS)
def test_correct_kernels_pass_the_check_and_stay_selected(kernels, operator):
    _, calls = kernels
    assert _run_recording(operator) == []
    case = _case(operator)
    assert (case["dtype"], case["device"], case["kernels"], case["note"]) == ("float32", "cpu", "triton", "")
    # one check (one call of each kernel) and then two layer calls, all through the kernels
    assert calls == {"forward": 3, "backward": 3, "sq_sum": 3}


@pytest.mark.parametrize("operator", OPERATORS)
def test_a_wrong_kernel_result_warns_once_and_falls_back_to_aten(kernels, operator):
    impls, calls = kernels
    impls["forward"] = lambda *args: aten_forward(*args) * 1.01  # 1% off: far beyond float32 rounding
    warned = _run_recording(operator, times=3)  # outputs and gradients still match the reference
    assert len(warned) == 1
    message = str(warned[0].message)
    assert f"operator {operator!r}, float32 on cpu" in message and "disagree with the ATen epilogue" in message
    assert "output: relative error 0.01" in message
    case = _case(operator)
    assert case["kernels"] == "aten" and "disagree" in case["note"]
    assert calls["forward"] == 1  # only the check ran the wrong kernel


def test_a_failed_launch_warns_once_and_falls_back_to_aten(kernels):
    impls, calls = kernels

    def launch_failure(*args, **kwargs):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    impls["backward"] = launch_failure
    warned = _run_recording("sigmoid", times=3)
    assert len(warned) == 1
    assert "failed to run (RuntimeError: Triton Error [CUDA]: an illegal memory access" in str(warned[0].message)
    assert _case("sigmoid")["kernels"] == "aten"
    assert calls["forward"] == 1 and calls["backward"] == 1  # the check only: never again
    # every case is checked, and warns, on its own
    warned = _run_recording("cosine")
    assert len(warned) == 1 and "operator 'cosine'" in str(warned[0].message)


@pytest.mark.parametrize("stage", ["forward", "backward", "sq_sum"])
def test_a_kernel_failing_after_the_check_falls_back_within_the_same_step(kernels, stage):
    # A kernel that passed the check fails on a later call (e.g. a shape the check did not have):
    # that call still gives the right output and gradients, and the case switches to ATen for good.
    impls, calls = kernels
    correct = impls[stage]

    def fails_on_big_inputs(*args, **kwargs):
        if args[0].shape[-1] == 5:  # the layer's maps are 6 x 5; the check's are 8 x 16
            raise RuntimeError("out of resources: shared memory")
        return correct(*args, **kwargs)

    impls[stage] = fails_on_big_inputs
    warned = _run_recording("learnable_sigmoid", times=2)
    assert len(warned) == 1 and "out of resources" in str(warned[0].message)
    assert _case("learnable_sigmoid")["kernels"] == "aten"


def test_environment_variable_and_api_force_either_path(kernels, monkeypatch):
    impls, calls = kernels
    impls["forward"] = lambda *args: aten_forward(*args) * 1.01  # used only when forced, unchecked
    monkeypatch.setenv(_fused.KERNELS_ENV, "aten")
    assert snn.kernel_backend() == "aten"
    _assert_matches(*_layer_and_grads("linear"))
    assert calls == {"forward": 0, "backward": 0, "sq_sum": 0} and _fused.kernel_status()["cases"] == []
    monkeypatch.setenv(_fused.KERNELS_ENV, "triton")  # no check: the (wrong) kernel runs
    (out, *_), (expected, *_) = _layer_and_grads("linear")
    torch.testing.assert_close(out, expected * 1.01)
    assert calls["forward"] == 1 and _fused.kernel_status()["cases"] == []
    snn.set_kernel_backend("aten")  # the API overrides the variable
    assert snn.kernel_backend() == "aten"
    _assert_matches(*_layer_and_grads("linear"))
    assert calls["forward"] == 1
    snn.set_kernel_backend(None)
    assert snn.kernel_backend() == "triton"


def test_bad_backend_names_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"kernel backend must be one of auto, triton, cpp, aten or None; got 'fast'"):
        snn.set_kernel_backend("fast")
    monkeypatch.setenv(_fused.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match=r"SPHERECONV_KERNELS must be one of auto, triton, cpp, aten; got 'cuda'"):
        snn.kernel_backend()


def test_kernel_status_without_triton_capable_calls():
    # On CPU (without the test routing) nothing takes the Triton path: no cases are listed.
    _fused.reset_kernel_status()
    SphereConv2d(3, 4, 3)(torch.randn(1, 3, 5, 5)).sum().backward()
    status = snn.kernel_status()
    assert status["cases"] == [] and status["backend"] in ("auto", "triton", "aten")
    assert isinstance(status["triton_installed"], bool)
