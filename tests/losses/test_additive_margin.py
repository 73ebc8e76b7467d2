"""CosFace and ArcFace against their direct per-sample formulas."""

from __future__ import annotations

import math

import pytest
import torch
from losses_reference_formulas import arcface_loss, cosface_loss

from sphereconv.losses import ArcFaceLoss, CosFaceLoss


def _data(seed, n=9, d=6, c=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * 2.0, torch.randint(0, c, (n,), generator=gen)


@pytest.mark.parametrize("scale,margin", [(30.0, 0.35), (10.0, 0.0), (5.0, 1.2)])
def test_cosface_equals_direct_formula(scale, margin):
    torch.manual_seed(0)
    features, labels = _data(1)
    loss = CosFaceLoss(6, 5, scale=scale, margin=margin).double()
    expected = cosface_loss(features, labels, loss.weight.detach(), scale, margin)
    assert float(loss(features, labels).detach()) == pytest.approx(expected, rel=1e-10)
    # Prediction logits: s cos(theta), no margin, independent of the feature norm.
    with torch.no_grad():
        torch.testing.assert_close(
            loss.logits(features), loss.logits(7.0 * features), rtol=1e-4, atol=1e-4
        )  # up to eps


@pytest.mark.parametrize("scale,margin", [(64.0, 0.5), (16.0, 0.1), (8.0, 1.5)])
def test_arcface_equals_direct_formula(scale, margin):
    torch.manual_seed(1)
    features, labels = _data(2)
    loss = ArcFaceLoss(6, 5, scale=scale, margin=margin).double()
    expected = arcface_loss(features, labels, loss.weight.detach(), scale, margin)
    assert float(loss(features, labels).detach()) == pytest.approx(expected, rel=1e-10)


def test_arcface_fallback_beyond_pi_minus_margin():
    torch.manual_seed(2)
    margin = 0.5
    loss = ArcFaceLoss(4, 3, scale=1.0, margin=margin).double()
    w = loss.weight.detach()
    # theta_y close to pi (feature opposite its class row) and small theta_y.
    features = torch.stack([-w[0] + 0.01 * w[1], w[1]])
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        logits = loss.margin_logits(features, labels)
        cos = loss.logits(features)  # scale 1: the cosines
    assert float(torch.acos(cos[0, 0])) + margin > math.pi
    assert float(logits[0, 0]) == pytest.approx(float(cos[0, 0]) - margin * math.sin(margin), rel=1e-10)
    assert float(logits[1, 1]) == pytest.approx(math.cos(float(torch.acos(cos[1, 1])) + margin), rel=1e-8)


@pytest.mark.parametrize("margin", [0.1, 0.5, 1.0, math.pi / 2])
def test_arcface_target_logit_decreases_and_stays_below_cosine(margin):
    loss = ArcFaceLoss(4, 3, margin=margin).double()
    cos_grid = torch.linspace(1.0, -1.0, 20001, dtype=torch.float64)[:, None]
    target = loss.target_logit(cos_grid, cos_grid).squeeze(1)
    assert float(target.diff().max()) <= 1e-12
    assert bool((target <= cos_grid.squeeze(1) + 1e-12).all())


@pytest.mark.parametrize("cls", [CosFaceLoss, ArcFaceLoss])
def test_additive_margin_loss_is_never_below_margin_free_loss(cls):
    for seed in range(20):
        torch.manual_seed(seed)
        features, labels = _data(seed + 100)
        with_margin = cls(6, 5, scale=8.0).double()
        without = cls(6, 5, scale=8.0, margin=0.0).double()
        without.weight.data.copy_(with_margin.weight.data)
        assert float(with_margin(features, labels).detach()) >= float(without(features, labels).detach())
