"""A-Softmax against pytorch-metric-learning's SphereFaceLoss (optional dev dependency).

Conventions matched explicitly: its weight ``W`` is ``(embedding_size, num_classes)`` (ours is the
transpose); it normalises with plain L2 norms (ours have eps inside the square roots, so eps is set
negligible here); it has no annealing (``anneal=False`` here); its logit scale defaults to 1
(the feature norm alone, as ours); both average over the batch.
"""

from __future__ import annotations

import pytest
import torch

from sphereconv.losses import ASoftmaxLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
# Its margin setup calls scipy.special.binom on torch scalars, which NumPy 2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_a_softmax_matches_pytorch_metric_learning_sphereface(margin):
    torch.manual_seed(margin)
    ours = ASoftmaxLoss(6, 5, margin=margin, anneal=False, eps=1e-300).double()
    theirs = pml_losses.SphereFaceLoss(num_classes=5, embedding_size=6, margin=margin, scale=1).double()
    with torch.no_grad():
        theirs.W.copy_(ours.weight.t())
    features = torch.randn(32, 6, dtype=torch.float64) * 4.0
    labels = torch.randint(0, 5, (32,))
    x_ours = features.clone().requires_grad_(True)
    x_theirs = features.clone().requires_grad_(True)
    value_ours = ours(x_ours, labels)
    value_theirs = theirs(x_theirs, labels)
    torch.testing.assert_close(value_ours, value_theirs, rtol=1e-9, atol=1e-12)
    value_ours.backward()
    value_theirs.backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-6, atol=1e-9)
