"""Angular losses at any feature scale (Liu et al. 2017, Sec. 2.2: ``logit_j = |x| g(theta_j)``).

The angular part depends only on directions, so at every finite scale c of the features (and d of
the classifier rows) it must be exact: ``cos theta(c x, d W) == cos theta(x, W)``. The losses that
scale by the feature norm have logits proportional to it, ``logits(c x) == c logits(x)`` (the
norm ``sqrt(sum x^2 + eps m^2)`` with eps relative to the row's largest value is exactly
homogeneous), so their predictions never change; the fixed-scale ones (CosFace, ArcFace) have
invariant logits, losses and gradients. The loss itself legitimately grows with |x|: it must be
finite, and equal to the float64 loss of the same features; so must the gradients wherever their
true value fits in the dtype (dL/dW of a norm-scaled loss is of order c/d). Before, ``sum x^2``
overflowed float32 from features of ~1e19 and GA-Softmax, weight-normalised softmax and A-Softmax
gave NaN.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphereconv.losses import ArcFaceLoss, ASoftmaxLoss, CosFaceLoss, GASoftmaxLoss, WeightNormalizedSoftmaxLoss

FEATURES, CLASSES = 8, 5
LOSSES = {
    "weight_normalized-sigmoid": lambda: WeightNormalizedSoftmaxLoss(FEATURES, CLASSES, operator="sigmoid"),
    "weight_normalized-linear": lambda: WeightNormalizedSoftmaxLoss(FEATURES, CLASSES, operator="linear"),
    "ga_softmax-cosine-1.5": lambda: GASoftmaxLoss(FEATURES, CLASSES, margin=1.5, anneal=False),
    "ga_softmax-square_cosine-2.5": lambda: GASoftmaxLoss(FEATURES, CLASSES, margin=2.5, operator="square_cosine"),
    "a_softmax": lambda: ASoftmaxLoss(FEATURES, CLASSES),
    "cosface": lambda: CosFaceLoss(FEATURES, CLASSES),
    "arcface": lambda: ArcFaceLoss(FEATURES, CLASSES),
}
FIXED_SCALE = ("cosface", "arcface")
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}
LOG_SCALES = {torch.float32: (-30.0, 37.0), torch.float64: (-300.0, 300.0)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _setup(name: str, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    loss = LOSSES[name]().double().eval()  # eval: the annealing counter stays put
    features = torch.randn(6, FEATURES, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (6,))
    return loss, features, labels


def _loss_and_grads(loss, features, labels):
    features = features.detach().requires_grad_()
    value = loss(features, labels)
    return value.detach(), torch.autograd.grad(value, [features, loss.weight])


def check_loss_at_scale(name: str, dtype: torch.dtype, c: float, d: float, seed: int) -> None:
    loss64, x, labels = _setup(name, dtype, seed)
    loss = copy.deepcopy(loss64).to(dtype)
    w = loss64.weight.detach().clone()
    tol = TOLERANCE[dtype]
    with torch.no_grad():
        cos, _ = loss.cosine(x.to(dtype))
        logits = loss.logits(x.to(dtype))
        loss.weight.copy_(d * w)
        cos_s, _ = loss.cosine((c * x).to(dtype))
        logits_s = loss.logits((c * x).to(dtype))
    assert _rel(cos_s, cos) < tol  # the angular part: exact at any scale
    factor = 1.0 if name in FIXED_SCALE else c
    assert _rel(logits_s.double() / factor, logits) < tol
    value, grads = _loss_and_grads(loss, (c * x).to(dtype), labels)
    assert value.dtype == dtype and torch.isfinite(value)
    # the same features (as stored in dtype) in float64: the loss grows with |x|, exactly
    with torch.no_grad():
        loss64.weight.copy_(loss.weight.double())
    value64, grads64 = _loss_and_grads(loss64, (c * x).to(dtype).double(), labels)
    assert abs(float(value) - float(value64)) <= tol * max(abs(float(value64)), 1.0)
    # dL/dx is of order 1 (|x|-scaled) or 1/c (fixed scale); dL/dW of order c/d or 1/d: finite and
    # compared where that fits in the dtype with room to spare (beyond, the true gradient itself
    # is not representable and overflows)
    headroom = math.log10(torch.finfo(dtype).max) - 3
    w_order = (0.0 if name in FIXED_SCALE else math.log10(c)) - math.log10(d)
    for g, g64, order in zip(grads, grads64, (-math.log10(c) if name in FIXED_SCALE else 0.0, w_order)):
        if abs(order) < headroom:
            assert _rel(g, g64) < (1e-4 if dtype == torch.float32 else tol)
    if name in FIXED_SCALE and max(abs(math.log10(c)), abs(math.log10(d))) < headroom:
        # invariant loss: gradients scale as 1/c and 1/d
        with torch.no_grad():
            loss.weight.copy_(w)
        value_1, grads_1 = _loss_and_grads(loss, x.to(dtype), labels)
        assert abs(float(value) - float(value_1)) <= tol * abs(float(value_1))
        assert _rel(grads[0].double() * c, grads_1[0]) < 1e-4 and _rel(grads[1].double() * d, grads_1[1]) < 1e-4


def _scales(dtype):
    low, high = LOG_SCALES[dtype]
    return st.floats(low, high).map(lambda e: 10.0**e)


@pytest.mark.parametrize("name", list(LOSSES))
@settings(max_examples=8, deadline=None)
@given(c=_scales(torch.float32), d=_scales(torch.float32), seed=st.integers(0, 2**16))
def test_float32_losses_from_1e_minus_30_to_1e37(name, c, d, seed):
    check_loss_at_scale(name, torch.float32, c, d, seed)


@pytest.mark.parametrize("name", list(LOSSES))
@settings(max_examples=5, deadline=None)
@given(c=_scales(torch.float64), d=_scales(torch.float64), seed=st.integers(0, 2**16))
def test_float64_losses_from_1e_minus_300_to_1e300(name, c, d, seed):
    check_loss_at_scale(name, torch.float64, c, d, seed)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_features_and_autocast_keep_the_cosine_in_float32(name):
    loss, x, labels = _setup(name, torch.float32, 0)
    loss = loss.float()
    with torch.no_grad():
        cos, _ = loss.cosine(x.float())
        for scale in (1e-30, 1e30):
            cos_s, _ = loss.cosine((scale * x).to(torch.bfloat16))
            assert cos_s.dtype == torch.float32 and _rel(cos_s, cos) < 2e-2  # bf16 rounds the features
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert _rel(loss.cosine((scale * x).float())[0], cos) < 1e-5
    value = loss((1e30 * x).to(torch.bfloat16), labels)
    assert torch.isfinite(value)


@pytest.mark.parametrize("name", ["ga_softmax-cosine-1.5", "weight_normalized-sigmoid", "a_softmax", "arcface"])
@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37], ids=["1e19", "1e30", "1e37"])
def test_float32_features_of_1e19_and_more_give_finite_exact_losses(name, scale):
    # was NaN (GA-Softmax, weight-normalised softmax, A-Softmax): sum x^2 overflowed float32
    check_loss_at_scale(name, torch.float32, scale, 1.0, seed=5)


def test_zero_feature_gives_cos_zero_and_finite_gradients():
    for name in LOSSES:
        loss, x, labels = _setup(name, torch.float64, 1)
        x[2] = 0.0
        cos, norm = loss.cosine(x)
        assert (cos[2] == 0).all() and float(norm[2]) == pytest.approx(math.sqrt(loss.eps))
        value, grads = _loss_and_grads(loss, x, labels)
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads), name
