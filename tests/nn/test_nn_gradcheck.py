"""``torch.autograd.gradcheck`` (float64) for every operator, layer and learnable parameter."""

from __future__ import annotations

import nn_reference as ref
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from sphereconv.nn import (
    MAGNITUDES,
    DecoupledConv2d,
    SphereConv1d,
    SphereConv2d,
    SphereConv3d,
    SphereLinear,
    SphereNorm2d,
    decoupled_conv2d,
)
from sphereconv.nn import (
    functional as SF,
)

F64 = torch.float64


def module_gradcheck(module, x):
    """gradcheck w.r.t. the input and every parameter of ``module``."""
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]

    def run(inp, *ps):
        return functional_call(module, dict(zip(names, ps)), (inp,))

    assert gradcheck(run, (x.requires_grad_(), *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
def test_functional_sphere_conv2d_gradcheck(operator, impl):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 3, dtype=F64, requires_grad=True)
    w = torch.randn(4, 2, 2, 2, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True)

    def fn(x, w, b):
        return SF.sphere_conv2d(
            x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), groups=2, operator=operator, sigmoid_k=0.4
        )

    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_functional_per_channel_k_gradcheck(impl):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 4, 4, dtype=F64, requires_grad=True)
    w = torch.randn(3, 3, 2, 2, dtype=F64, requires_grad=True)
    k = torch.tensor([0.2, 0.5, 1.1], dtype=F64, requires_grad=True)
    assert gradcheck(
        lambda x, w, k: SF.sphere_conv2d(x, w, operator="sigmoid", sigmoid_k=k), (x, w, k), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "operator,mode",
    [
        ("linear", "zeros"),
        ("cosine", "zeros"),
        ("sigmoid", "zeros"),
        ("learnable_sigmoid", "zeros"),
        ("linear", "reflect"),
        ("learnable_sigmoid", "circular"),
    ],
)
def test_sphere_conv2d_layer_gradcheck(operator, mode, impl):
    torch.manual_seed(2)
    layer = SphereConv2d(2, 3, 2, padding=1, padding_mode=mode, bias=True, operator=operator, dtype=F64)
    module_gradcheck(layer, torch.randn(2, 2, 3, 3, dtype=F64))


def test_learnable_k_gets_a_gradient_through_c_k(impl):
    # k enters both the tanh argument and c_k = 1/tanh(pi/4k); the analytic derivative must match.
    torch.manual_seed(3)
    layer = SphereConv2d(2, 2, 2, operator="learnable_sigmoid", dtype=F64)
    x = torch.randn(1, 2, 3, 3, dtype=F64)
    raw = layer.sigmoid_k_raw.detach().clone().requires_grad_()
    ref_out = lambda r: ref.sphere_conv_reference(x, layer.weight.detach(), "sigmoid", r.abs() + 0.05)  # noqa: E731
    (expected,) = torch.autograd.grad(ref_out(raw).sum(), raw)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.sigmoid_k_raw.grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls,shape", [(SphereConv1d, (2, 2, 6)), (SphereConv3d, (1, 2, 3, 4, 3))])
@pytest.mark.parametrize("operator", ["linear", "learnable_sigmoid"])
def test_sphere_conv1d_3d_gradcheck(cls, shape, operator, impl):
    torch.manual_seed(4)
    layer = cls(2, 2, 2, padding=1, operator=operator, dtype=F64)
    module_gradcheck(layer, torch.randn(shape, dtype=F64))


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
def test_sphere_linear_gradcheck(operator, impl):
    torch.manual_seed(5)
    layer = SphereLinear(5, 3, bias=True, operator=operator, dtype=F64)
    module_gradcheck(layer, torch.randn(4, 5, dtype=F64))


@pytest.mark.parametrize("operator", ["cosine", "linear", "learnable_sigmoid"])
@pytest.mark.parametrize("learn_magnitude", [True, False])
def test_sphere_norm2d_gradcheck(operator, learn_magnitude):
    torch.manual_seed(6)
    layer = SphereNorm2d(2, 3, 2, padding=1, bias=True, operator=operator, learn_magnitude=learn_magnitude, dtype=F64)
    with torch.no_grad():
        for p in layer.parameters():
            if p is not layer.weight:
                p.add_(0.3 * torch.randn_like(p))
    module_gradcheck(layer, torch.randn(2, 2, 3, 3, dtype=F64))


def _radius_between_norms(x, w, **conv):
    """A radius halfway between two neighbouring patch norms: no norm sits on the kink of ball/seg."""
    _, xn, _ = ref.patch_cosines(x.detach(), w.detach(), **conv)
    values = xn.flatten().unique().sort().values
    mid = len(values) // 2
    return float(values[mid - 1] + values[mid]) / 2


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "square_cosine"])
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_decoupled_functional_gradcheck(magnitude, operator, weighted):
    torch.manual_seed(7)
    x = torch.randn(1, 2, 4, 3, dtype=F64, requires_grad=True)
    w = torch.randn(2, 2, 2, 2, dtype=F64, requires_grad=True)
    alpha = torch.tensor([0.7, 1.6], dtype=F64, requires_grad=True)
    beta = torch.tensor([0.4, -0.2], dtype=F64, requires_grad=True)
    rho = _radius_between_norms(x, w, padding=1)

    def fn(x, w, a, b):
        return decoupled_conv2d(
            x, w, padding=1, magnitude=magnitude, operator=operator, weighted=weighted, alpha=a, beta=b, rho=rho
        )

    # fast_mode checks a random projection of the Jacobian: 56 combinations stay within budget.
    assert gradcheck(fn, (x, w, alpha, beta), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("magnitude", ["ball", "tanh", "seg", "mix"])
@pytest.mark.parametrize("training", [True, False])
def test_decoupled_learnable_radius_gradcheck(magnitude, training):
    torch.manual_seed(8)
    layer = DecoupledConv2d(
        2, 3, 2, padding=1, magnitude=magnitude, operator="learnable_sigmoid", weighted=True, learnable=True, dtype=F64
    )
    x = torch.randn(2, 2, 2, 3, dtype=F64)
    layer.train()(x)  # fill the running average
    layer.train(training)
    with torch.no_grad():
        if layer.radius is not None:
            # Keep every patch norm off the ball/seg kink |x| = rho.
            _, xn, _ = ref.patch_cosines(x, layer.weight.detach(), padding=1)
            mean = xn.mean(dim=(0, 2, 3)) if training else layer.x_norm_estimate()
            for o in range(3):
                values = (xn[:, o] / mean[o]).flatten().sort().values
                target = float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
                layer.radius[o] = (target - 1e-4) ** 0.5
    module_gradcheck(layer, x)
