"""The plain linear classifier + cross-entropy (CNN baseline)."""

from __future__ import annotations

import math

import pytest
import torch
from losses_reference_formulas import cross_entropy_of

from sphereconv.losses import SoftmaxLoss


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_loss_equals_direct_formula(bias, smoothing):
    torch.manual_seed(0)
    loss = SoftmaxLoss(5, 4, bias=bias, label_smoothing=smoothing).double()
    if bias:
        loss.bias.data.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0]))
    features = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    rows = features @ loss.weight.detach().t() + (loss.bias.detach() if bias else 0.0)
    torch.testing.assert_close(loss.logits(features).detach(), rows)
    expected = 0.0
    for logits, y in zip(rows.tolist(), labels.tolist()):
        nll = [cross_entropy_of(logits, j) for j in range(4)]
        expected += (1.0 - smoothing) * nll[y] + smoothing / 4 * sum(nll)
    assert float(loss(features, labels).detach()) == pytest.approx(expected / 6, rel=1e-12)


def test_softmax_defaults_and_init():
    torch.manual_seed(1)
    loss = SoftmaxLoss(512, 10)
    assert loss.bias is None and loss.label_smoothing == 0.0
    # He-normal: std sqrt(2 / fan_in).
    assert float(loss.weight.detach().std()) == pytest.approx(math.sqrt(2.0 / 512), rel=0.05)
