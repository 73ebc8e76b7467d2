"""Assigning ``loss.margin`` after construction (a margin warm-up schedule) is checked and takes
effect everywhere the margin enters: ArcFace's fallback threshold and offset, A-Softmax's integer
Chebyshev degree. Before, ArcFace kept the threshold and offset of its first margin (a wrong,
non-monotone target logit), A-Softmax kept computing with its first margin, and out-of-range
values were accepted silently."""

from __future__ import annotations

import math

import pytest
import torch
from losses_reference_formulas import arcface_loss

from sphereconv.losses import ArcFaceLoss, ASoftmaxLoss, CosFaceLoss, GASoftmaxLoss


def _data(seed, n=64, d=6, c=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, c, (n,), generator=gen)


@pytest.mark.parametrize("first,second", [(0.5, 0.1), (0.1, 0.5), (0.3, math.pi / 2)])
def test_arcface_margin_assignment_equals_a_fresh_loss(first, second):
    torch.manual_seed(0)
    assigned = ArcFaceLoss(6, 5, scale=4.0, margin=first).double()
    assigned.margin = second
    fresh = ArcFaceLoss(6, 5, scale=4.0, margin=second).double()
    fresh.load_state_dict(assigned.state_dict())
    # Features near the opposite of their class row: theta + m crosses pi for both margins.
    features, labels = _data(1)
    features[:16] = -assigned.weight.detach()[labels[:16]] + 0.05 * features[:16]
    with torch.no_grad():
        torch.testing.assert_close(assigned.margin_logits(features, labels), fresh.margin_logits(features, labels))
        expected = arcface_loss(features, labels, assigned.weight.detach(), 4.0, second)
        assert float(assigned(features, labels)) == pytest.approx(expected, rel=1e-10)
    cos_grid = torch.linspace(1.0, -1.0, 20001, dtype=torch.float64)[:, None]
    target = assigned.target_logit(cos_grid, cos_grid).squeeze(1)
    assert float(target.diff().max()) <= 1e-12  # still decreasing in theta


@pytest.mark.parametrize("anneal", [False, True])
def test_a_softmax_margin_assignment_equals_a_fresh_loss(anneal):
    torch.manual_seed(1)
    assigned = ASoftmaxLoss(6, 5, margin=4, anneal=anneal).double()
    assigned.margin = 2
    fresh = ASoftmaxLoss(6, 5, margin=2, anneal=anneal).double()
    fresh.load_state_dict(assigned.state_dict())
    features, labels = _data(2)
    with torch.no_grad():
        torch.testing.assert_close(assigned(features, labels), fresh(features, labels))
    assert assigned.margin == 2 and assigned.margin_int == 2
    assert "margin=2," in repr(assigned)


def test_ga_softmax_margin_assignment_equals_a_fresh_loss():
    torch.manual_seed(2)
    assigned = GASoftmaxLoss(6, 5, margin=4.0, operator="linear", anneal=False).double()
    assigned.margin = 1.5
    fresh = GASoftmaxLoss(6, 5, margin=1.5, operator="linear", anneal=False).double()
    fresh.load_state_dict(assigned.state_dict())
    features, labels = _data(3)
    with torch.no_grad():
        torch.testing.assert_close(assigned(features, labels), fresh(features, labels))


@pytest.mark.parametrize(
    "make,value,error,match",
    [
        (lambda: ArcFaceLoss(4, 3), 2.0, ValueError, r"invalid margin=2.0: expected a number in \[0, 1.5708\]"),
        (lambda: ArcFaceLoss(4, 3), -0.1, ValueError, r"invalid margin=-0.1"),
        (lambda: CosFaceLoss(4, 3), 2.5, ValueError, r"invalid margin=2.5: expected a number in \[0, 2\]"),
        (lambda: GASoftmaxLoss(4, 3), 0.5, ValueError, r"invalid margin=0.5: expected a number in \[1, 64\]"),
        (lambda: GASoftmaxLoss(4, 3), "2", TypeError, r"invalid margin='2': expected a number in \[1, 64\]"),
        (lambda: ASoftmaxLoss(4, 3), 2.5, ValueError, r"invalid margin=2.5: expected an integer from 1 to 64"),
        (lambda: ASoftmaxLoss(4, 3), 0, ValueError, r"invalid margin=0: expected an integer from 1 to 64"),
        # beyond the cap: NaN losses (1e300) or one Chebyshev step per unit of margin at every call
        (lambda: GASoftmaxLoss(4, 3), 1e300, ValueError, r"invalid margin=1e\+300: expected a number in \[1, 64\]"),
        (lambda: ASoftmaxLoss(4, 3), 1024, ValueError, r"invalid margin=1024: expected an integer from 1 to 64"),
    ],
)
def test_bad_margin_assignment_raises_and_keeps_the_old_margin(make, value, error, match):
    loss = make()
    before = loss.margin
    with pytest.raises(error, match=match):
        loss.margin = value
    assert loss.margin == before
