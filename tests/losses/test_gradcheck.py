"""torch.autograd.gradcheck for every loss, in float64, w.r.t. features and classifier weight."""

from __future__ import annotations

import pytest
import torch

from sphereconv.losses import (
    ArcFaceLoss,
    ASoftmaxLoss,
    CosFaceLoss,
    GASoftmaxLoss,
    SoftmaxLoss,
    WeightNormalizedSoftmaxLoss,
)

CASES = [
    (SoftmaxLoss, {"bias": True, "label_smoothing": 0.1}),
    (WeightNormalizedSoftmaxLoss, {"operator": "cosine"}),
    (WeightNormalizedSoftmaxLoss, {"operator": "linear"}),
    (WeightNormalizedSoftmaxLoss, {"operator": "sigmoid", "sigmoid_k": 0.5}),
    (GASoftmaxLoss, {"margin": 2.7, "operator": "cosine"}),
    (GASoftmaxLoss, {"margin": 1.5, "operator": "linear", "anneal": False}),
    (GASoftmaxLoss, {"margin": 3.3, "operator": "sigmoid", "label_smoothing": 0.05}),
    (GASoftmaxLoss, {"margin": 2.0, "operator": "square_cosine", "anneal": False}),
    (ASoftmaxLoss, {"margin": 4}),
    (ASoftmaxLoss, {"margin": 3, "anneal": False}),
    (CosFaceLoss, {"scale": 4.0}),
    (ArcFaceLoss, {"scale": 4.0}),
]


@pytest.mark.parametrize("cls,kwargs", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_gradcheck(cls, kwargs):
    torch.manual_seed(0)
    loss = cls(4, 3, **kwargs).double().eval()  # eval: the annealing lambda stays fixed between calls
    if hasattr(loss, "iteration"):
        loss.iteration.fill_(300)
    features = (torch.randn(5, 4, dtype=torch.float64) * 2.0).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 1, 0])
    weight = loss.weight.detach().clone().requires_grad_(True)

    def fn(x, w):
        return torch.func.functional_call(loss, {"weight": w}, (x, labels))

    assert torch.autograd.gradcheck(fn, (features, weight), eps=1e-6, atol=1e-6)
