"""Orthogonality penalty on SphereConv filters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sphereconv.losses import SoftmaxLoss, orthogonality_penalty
from sphereconv.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear


def _direct(weight: torch.Tensor) -> float:
    """||W^T W - I||_F^2 with W's columns the flattened filters, by explicit double loop."""
    filters = [f.flatten().tolist() for f in weight.detach().double()]
    total = 0.0
    for i, a in enumerate(filters):
        for j, b in enumerate(filters):
            total += (sum(p * q for p, q in zip(a, b)) - (1.0 if i == j else 0.0)) ** 2
    return total


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = SphereConv2d(3, 4, 3, padding=1)
        self.plain = nn.Conv2d(4, 4, 3)
        self.block = nn.Sequential(SphereConv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1d = SphereConv1d(2, 3, 5)
        self.conv3d = SphereConv3d(2, 2, 2)
        self.fc = nn.Linear(6, 10)
        self.sphere_fc = SphereLinear(6, 5)
        self.head = SoftmaxLoss(6, 10)


def test_penalty_equals_direct_sum_over_sphere_layers_only():
    torch.manual_seed(0)
    net = _Net()
    # SphereLinear is the same operator on whole vectors: penalised like SphereConv.
    sphere_weights = [net.conv1.weight, net.block[0].weight, net.conv1d.weight, net.conv3d.weight, net.sphere_fc.weight]
    expected = 1e-4 * sum(_direct(w) for w in sphere_weights)
    value = orthogonality_penalty(net)
    assert value.dim() == 0
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(orthogonality_penalty(net, coefficient=0.5).detach()) == pytest.approx(expected / 1e-4 * 0.5, rel=1e-5)
    # Same number from an explicit list of the SphereConv weights; gradients reach only those.
    assert float(orthogonality_penalty(sphere_weights).detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in sphere_weights)
    for ignored in (net.plain.weight, net.fc.weight, net.head.weight):
        assert ignored.grad is None


def test_penalty_gradient_matches_formula():
    torch.manual_seed(1)
    weight = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    orthogonality_penalty(weight, coefficient=1.0).backward()
    w = weight.detach().reshape(5, -1).t()  # columns = filters
    # d ||W^T W - I||^2 / dW = 4 W (W^T W - I)
    expected = (4.0 * w @ (w.t() @ w - torch.eye(5, dtype=torch.float64))).t().reshape(5, 2, 3, 3)
    torch.testing.assert_close(weight.grad, expected)


def test_orthonormal_filters_and_no_sphere_convs_give_zero():
    torch.manual_seed(2)
    conv = SphereConv2d(4, 8, 3, bias=False)
    q, _ = torch.linalg.qr(torch.randn(36, 8))  # 8 orthonormal columns in R^36
    with torch.no_grad():
        conv.weight.copy_(q.t().reshape(8, 4, 3, 3))
    assert float(orthogonality_penalty(conv).detach()) == pytest.approx(0.0, abs=1e-9)
    assert float(orthogonality_penalty(conv.weight * 2.0).detach()) > 1e-4
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    zero = orthogonality_penalty(plain)
    assert zero.dim() == 0 and float(zero) == 0.0 and zero.device == plain[0].weight.device
    assert float(orthogonality_penalty([])) == 0.0


def test_penalty_rejects_bad_arguments():
    with pytest.raises(ValueError, match="coefficient"):
        orthogonality_penalty(nn.Linear(2, 2), coefficient=-1.0)
    with pytest.raises(TypeError, match="module, a weight tensor or an iterable"):
        orthogonality_penalty(3.0)
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(4,\)"):
        orthogonality_penalty([torch.ones(4)])
    with pytest.raises(TypeError, match="weight tensor"):
        orthogonality_penalty(["conv.weight"])
