"""SphereNorm (Liu et al. 2017, hyperspherical learning as a normalisation).

No batch statistics, reduces to the plain convolution, loads plain convolution weights, trains with
and without BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sphereconv.nn import SphereNorm1d, SphereNorm2d, SphereNorm3d

F64 = torch.float64


def _randomise_extras(layer):
    with torch.no_grad():
        layer.gamma.copy_(1 + 0.5 * torch.randn_like(layer.gamma))
        layer.beta.copy_(torch.randn_like(layer.beta))
        if layer.magnitude_logit is not None:
            layer.magnitude_logit.copy_(torch.randn_like(layer.magnitude_logit))


@pytest.mark.parametrize("operator", ["cosine", "linear", "learnable_sigmoid"])
def test_output_of_a_sample_does_not_depend_on_batch_or_mode(operator):
    torch.manual_seed(0)
    layer = SphereNorm2d(3, 8, 3, padding=1, operator=operator, dtype=F64)
    _randomise_extras(layer)
    x = torch.randn(64, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        in_batch = layer.train()(x)
        for i in (0, 17, 63):
            torch.testing.assert_close(layer.train()(x[i : i + 1]), in_batch[i : i + 1], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(layer.eval()(x[i : i + 1]), in_batch[i : i + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.eval()(x), in_batch, rtol=1e-12, atol=1e-12)
        # BatchNorm in training mode is the contrast: the same sample changes with its batch.
        bn = nn.BatchNorm2d(8, dtype=F64).train()
        assert not torch.allclose(bn(in_batch)[:2], bn(in_batch[:2]))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("bias", [False, True])
def test_full_magnitude_mix_with_cosine_is_the_plain_convolution(mode, bias):
    torch.manual_seed(1)
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias, padding_mode=mode, dtype=F64)
    layer = SphereNorm2d(
        4, 6, 3, stride=2, padding=1, groups=2, bias=bias, padding_mode=mode, operator="cosine", dtype=F64
    )
    layer.load_state_dict(plain.state_dict())  # plain weights; gamma = 1, beta = 0 from init
    with torch.no_grad():
        layer.magnitude_logit.fill_(float("inf"))  # s = sigmoid(inf) = 1 exactly
    assert torch.equal(layer.magnitude_mix(), torch.ones(6, dtype=F64))
    x = torch.randn(3, 4, 9, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "cls,conv,shape", [(SphereNorm1d, F.conv1d, (2, 3, 9)), (SphereNorm3d, F.conv3d, (2, 3, 4, 5, 4))]
)
def test_1d_and_3d_variants_reduce_to_plain_convolution(cls, conv, shape):
    torch.manual_seed(2)
    layer = cls(3, 5, 3, padding=1, dtype=F64)
    with torch.no_grad():
        layer.magnitude_logit.fill_(float("inf"))
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x, layer.weight, padding=1), rtol=1e-10, atol=1e-12)


def test_without_magnitude_the_output_is_bounded_and_scale_invariant():
    torch.manual_seed(3)
    layer = SphereNorm2d(3, 4, 3, learn_magnitude=False, dtype=F64)
    assert layer.magnitude_logit is None and layer.magnitude_mix() is None
    _randomise_extras(layer)
    x = 1e6 * torch.randn(2, 3, 6, 6, dtype=F64)
    with torch.no_grad():
        out = layer(x)
        bound = (layer.gamma.abs() + layer.beta.abs()).reshape(-1, 1, 1)
        assert (out.abs() <= bound + 1e-12).all()
        torch.testing.assert_close(layer(1e-3 * x), out, rtol=1e-9, atol=1e-9)


def test_initial_state_is_close_to_pure_hyperspherical_normalisation():
    layer = SphereNorm2d(3, 4, 3)
    torch.testing.assert_close(layer.magnitude_mix(), torch.full((4,), 0.02))
    assert torch.equal(layer.gamma.detach(), torch.ones(4)) and torch.equal(layer.beta.detach(), torch.zeros(4))


def test_every_extra_parameter_receives_a_gradient():
    torch.manual_seed(4)
    layer = SphereNorm2d(3, 4, 3, padding=1, operator="learnable_sigmoid")
    layer(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("with_bn", [False, True])
def test_trains_with_and_without_batch_norm(with_bn):
    # A two-layer net fits a fixed random regression target: the loss must fall clearly.
    torch.manual_seed(5)
    layers = [SphereNorm2d(3, 8, 3, padding=1)]
    if with_bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), SphereNorm2d(8, 2, 3, padding=1)]
    net = nn.Sequential(*layers)
    x, target = torch.randn(16, 3, 6, 6), torch.randn(16, 2, 6, 6)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]
