"""Decoupled operators (Decoupled Networks Sec. 3): special cases that must reduce to known layers,
the magnitude functions' shapes, and the learnable radius's running statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sphereconv.nn import MAGNITUDES, DecoupledConv2d, SphereConv2d, decoupled_conv2d, magnitude_function

F64 = torch.float64


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_weighted_linear_cosine_is_the_plain_convolution(mode):
    # |w|_e * |x|_e * cos(theta) = <w, x> exactly.
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True, padding_mode=mode, dtype=F64)
    layer = DecoupledConv2d(
        4,
        6,
        3,
        stride=2,
        padding=1,
        groups=2,
        bias=True,
        padding_mode=mode,
        magnitude="linear",
        operator="cosine",
        weighted=True,
        dtype=F64,
    )
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer(x[1]), plain(x[1]), rtol=1e-10, atol=1e-12)  # unbatched input


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
def test_sphere_magnitude_with_unit_alpha_is_sphere_conv(operator):
    torch.manual_seed(1)
    sphere = SphereConv2d(3, 5, 3, padding=1, operator=operator, sigmoid_k=0.4, dtype=F64)
    layer = DecoupledConv2d(3, 5, 3, padding=1, magnitude="sphere", operator=operator, sigmoid_k=0.4, dtype=F64)
    layer.load_state_dict(sphere.state_dict())
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), sphere(x), rtol=1e-10, atol=1e-12)


def test_unweighted_linear_cosine_is_convolution_with_unit_filters():
    torch.manual_seed(2)
    x, w = torch.randn(2, 3, 6, 6, dtype=F64), torch.randn(4, 3, 3, 3, dtype=F64)
    w_peak = w.abs().amax(dim=(1, 2, 3), keepdim=True)  # eps is relative to the filter's largest value
    w_unit = w / torch.sqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-4 * w_peak**2)
    torch.testing.assert_close(
        decoupled_conv2d(x, w, magnitude="linear"), nn.functional.conv2d(x, w_unit), rtol=1e-10, atol=1e-12
    )


def test_magnitude_functions_shapes():
    x = torch.linspace(0.0, 6.0, 601, dtype=F64)
    rho, alpha = 2.0, 1.5
    h = {m: magnitude_function(x, m, alpha=alpha, rho=rho) for m in MAGNITUDES}
    assert torch.equal(h["sphere"], torch.full_like(x, alpha))
    torch.testing.assert_close(h["ball"][x >= rho], torch.full_like(x[x >= rho], alpha))  # saturates at rho
    torch.testing.assert_close(h["ball"][x < rho], alpha * x[x < rho] / rho)
    assert float(h["tanh"].max()) < alpha and float(h["tanh"][-1]) > 0.99 * alpha
    torch.testing.assert_close(h["linear"], alpha * x)
    torch.testing.assert_close(h["log"], alpha * torch.log1p(x))
    torch.testing.assert_close(h["mix"], alpha * x + 1.0 * torch.log1p(x))  # default beta 1 for mix
    # SegConv: slope alpha up to rho, then the reference default slope beta = 0.5, continuous at rho.
    slope = h["seg"].diff() / x.diff()
    torch.testing.assert_close(slope[x[1:] <= rho], torch.full_like(slope[x[1:] <= rho], alpha))
    torch.testing.assert_close(slope[x[:-1] >= rho], torch.full_like(slope[x[:-1] >= rho], 0.5))
    for m in MAGNITUDES:  # every h is monotone non-decreasing in |x|
        assert (h[m].diff() >= -1e-15).all(), m


def test_seg_default_beta_follows_reference_and_beta_is_learnt_when_requested():
    layer = DecoupledConv2d(3, 4, 3, magnitude="seg")
    assert layer.beta == 0.5 and layer.alpha == 1.0 and layer.radius is None
    learnt = DecoupledConv2d(3, 4, 3, magnitude="seg", learnable=True, alpha=2.0)
    names = dict(learnt.named_parameters())
    assert set(names) == {"weight", "alpha", "beta", "radius"}
    assert torch.equal(names["alpha"].detach(), torch.full((4,), 2.0))
    assert torch.equal(names["radius"].detach(), torch.ones(4))  # r initialised to 1 (reference)
    assert set(dict(DecoupledConv2d(3, 4, 3, magnitude="linear", learnable=True).named_parameters())) == {
        "weight",
        "alpha",
    }


def test_learnable_parameters_receive_gradients():
    torch.manual_seed(3)
    layer = DecoupledConv2d(
        3, 4, 3, padding=1, magnitude="seg", operator="learnable_sigmoid", learnable=True, weighted=True
    )
    layer(3 * torch.randn(4, 3, 6, 6)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_running_mean_updates_only_in_training_and_is_bias_corrected():
    torch.manual_seed(4)
    layer = DecoupledConv2d(3, 4, 3, magnitude="tanh", learnable=True, momentum=0.1)
    assert torch.equal(layer.x_norm_estimate(), torch.ones(4))  # before any training batch
    batches = [s * torch.randn(8, 3, 6, 6) for s in (1.0, 2.0, 3.0)]
    means = []
    for x in batches:
        layer(x)
        peak = x.abs().amax(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)  # eps relative to each sample's largest value
        xn = torch.sqrt(nn.functional.conv2d(x.square().sum(1, keepdim=True), torch.ones(1, 1, 3, 3)) + 1e-4 * peak**2)
        means.append(xn.mean())
    assert int(layer.num_batches_tracked) == 3
    weights = [0.1 * 0.9**2, 0.1 * 0.9, 0.1]
    expected = sum(w * m for w, m in zip(weights, means)) / (1 - 0.9**3)
    torch.testing.assert_close(layer.x_norm_estimate(), expected.expand(4), rtol=1e-5, atol=0)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(batches[0])
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_eval_output_is_batch_independent_but_training_uses_the_batch_mean():
    torch.manual_seed(5)
    layer = DecoupledConv2d(3, 4, 3, magnitude="ball", learnable=True, dtype=F64)
    x = torch.randn(16, 3, 6, 6, dtype=F64)
    x[8:] *= 10
    with torch.no_grad():
        train_full = layer(x)
        assert not torch.allclose(layer(x[:8]), train_full[:8])  # the reference's batch statistic
        layer.eval()
        torch.testing.assert_close(layer(x[:1]), layer(x)[:1], rtol=1e-12, atol=1e-12)


def test_rho_of_fixed_layers_is_absolute():
    torch.manual_seed(6)
    x, w = torch.randn(1, 3, 5, 5, dtype=F64), torch.randn(2, 3, 3, 3, dtype=F64)
    near_zero = decoupled_conv2d(x, w, magnitude="tanh", rho=1e6)
    assert near_zero.abs().max() < 1e-4  # tanh(|x|/rho) ~ |x|/rho
    huge = decoupled_conv2d(x, w, magnitude="tanh", rho=1e-6)
    torch.testing.assert_close(huge, decoupled_conv2d(x, w, magnitude="sphere"), rtol=1e-10, atol=1e-12)
    assert math.isclose(float(magnitude_function(torch.tensor(2.0), "ball", rho=4.0)), 0.5)


def test_an_empty_training_batch_leaves_the_running_mean_and_gradients_finite():
    # The mean patch norm of an empty batch is NaN: it must neither enter the running average (every
    # later evaluation would be NaN) nor the radius, whose NaN reached alpha's, beta's and r's gradients.
    torch.manual_seed(7)
    layer = DecoupledConv2d(3, 4, 3, magnitude="seg", learnable=True)
    layer(torch.randn(4, 3, 6, 6))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    out = layer(torch.randn(0, 3, 6, 6))
    assert out.shape == (0, 4, 4, 4)
    out.sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for key, value in layer.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
    layer.eval()
    assert torch.isfinite(layer(torch.randn(2, 3, 6, 6))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layer_in_eval_uses_the_running_mean(dtype):
    # In bfloat16, 1 - momentum rounds to 1: the bias correction was 0 and the estimate ~1e36, so
    # rho was huge and tanh(|x| / rho) flattened every output to 0.
    torch.manual_seed(8)
    layer = DecoupledConv2d(3, 4, 3, padding=1, magnitude="tanh", learnable=True)
    x = torch.randn(8, 3, 6, 6)
    for _ in range(3):
        layer(x)
    layer.eval()
    expected = layer(x)
    low = copy.deepcopy(layer).to(dtype)
    torch.testing.assert_close(low.x_norm_estimate(), layer.x_norm_estimate(), rtol=1e-2, atol=0)
    torch.testing.assert_close(low(x.to(dtype)).float(), expected, rtol=0, atol=1e-2)
