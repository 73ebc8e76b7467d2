"""Weight-normalised softmax, GA-Softmax and A-Softmax against direct formulas and each other."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from losses_reference_formulas import ga_softmax_loss

from sphereconv.losses import ASoftmaxLoss, GASoftmaxLoss, WeightNormalizedSoftmaxLoss
from sphereconv.losses.margin import SPHEREFACE_ITERATIONS

OPERATORS = ["linear", "cosine", "sigmoid", "square_cosine"]


def _data(n=7, d=5, c=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen, dtype=dtype) * 3.0
    labels = torch.randint(0, c, (n,), generator=gen)
    return features, labels


def _loss_and_grads(loss, features, labels):
    features = features.clone().requires_grad_(True)
    value = loss(features, labels)
    grad_x, grad_w = torch.autograd.grad(value, (features, loss.weight))
    return value.detach(), grad_x, grad_w


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("m", [1.0, 1.5, 2.0, 2.7, 4.0])
def test_ga_softmax_equals_direct_per_sample_formula(operator, m):
    torch.manual_seed(1)
    features, labels = _data(seed=int(m * 10))
    loss = GASoftmaxLoss(5, 4, margin=m, operator=operator, sigmoid_k=0.3, anneal=False).double()
    expected = ga_softmax_loss(features, labels, loss.weight.detach(), m, operator, k=0.3)
    with torch.no_grad():
        assert float(loss(features, labels).detach()) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_ga_softmax_with_annealing_equals_direct_formula():
    torch.manual_seed(2)
    features, labels = _data()
    loss = GASoftmaxLoss(5, 4, margin=2.5, operator="sigmoid", anneal_iterations=SPHEREFACE_ITERATIONS).double()
    loss.iteration.fill_(40)  # the next training step is iteration 41
    value = float(loss(features, labels).detach())
    lam = max(5.0, 1000.0 / (1.0 + 0.12 * 41))
    expected = ga_softmax_loss(features, labels, loss.weight.detach(), 2.5, "sigmoid", lam=lam)
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("anneal", [False, True])
def test_ga_softmax_with_cosine_equals_a_softmax_for_integer_margin(m, anneal):
    torch.manual_seed(3)
    features, labels = _data(n=16, seed=m)
    ga = GASoftmaxLoss(5, 4, margin=float(m), operator="cosine", anneal=anneal, anneal_iterations=SPHEREFACE_ITERATIONS)
    a = ASoftmaxLoss(5, 4, margin=m, anneal=anneal, anneal_iterations=SPHEREFACE_ITERATIONS)
    ga, a = ga.double(), a.double()
    a.load_state_dict(ga.state_dict())
    for _ in range(2):  # two training steps: the annealing counters advance together
        value_ga, gx_ga, gw_ga = _loss_and_grads(ga, features, labels)
        value_a, gx_a, gw_a = _loss_and_grads(a, features, labels)
        torch.testing.assert_close(value_ga, value_a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx_ga, gx_a, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(gw_ga, gw_a, rtol=1e-7, atol=1e-9)
    expected = ga_softmax_loss(
        features, labels, a.weight.detach(), m, "cosine", lam=max(5.0, 1000.0 / (1.0 + 0.12 * 3)) if anneal else 0.0
    )
    assert float(a(features, labels).detach()) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("operator", OPERATORS)
def test_margin_one_is_the_weight_normalized_softmax(operator):
    torch.manual_seed(4)
    features, labels = _data(seed=5)
    wn = WeightNormalizedSoftmaxLoss(5, 4, operator=operator).double()
    ga = GASoftmaxLoss(5, 4, margin=1.0, operator=operator).double()
    ga.load_state_dict({**wn.state_dict(), "iteration": torch.tensor(0), "anneal_iterations": torch.tensor(500)})
    for a, b in zip(_loss_and_grads(wn, features, labels), _loss_and_grads(ga, features, labels)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    expected = ga_softmax_loss(features, labels, wn.weight.detach(), 1.0, operator)
    assert float(wn(features, labels).detach()) == pytest.approx(expected, rel=1e-10)


def test_weight_normalized_cosine_logits_are_inner_products_with_unit_rows():
    torch.manual_seed(5)
    features, _ = _data()
    loss = WeightNormalizedSoftmaxLoss(5, 4, eps=1e-30).double()
    unit_rows = loss.weight / loss.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(loss.logits(features), features @ unit_rows.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "cls,kwargs", [(GASoftmaxLoss, {"margin": 2.7, "operator": "linear"}), (ASoftmaxLoss, {"margin": 4})]
)
def test_prediction_logits_carry_no_margin(cls, kwargs):
    torch.manual_seed(6)
    features, labels = _data()
    margin_loss = cls(5, 4, **kwargs).double()
    plain = WeightNormalizedSoftmaxLoss(5, 4, operator=margin_loss.operator).double()
    plain.weight.data.copy_(margin_loss.weight.data)
    torch.testing.assert_close(margin_loss.logits(features), plain.logits(features))
    training = margin_loss.margin_logits(features, labels)
    off_target = torch.ones_like(training, dtype=torch.bool).scatter(1, labels[:, None], False)
    torch.testing.assert_close(training[off_target], plain.logits(features)[off_target])
    assert bool((training.gather(1, labels[:, None]) < plain.logits(features).gather(1, labels[:, None])).all())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    c=st.integers(2, 6),
    m=st.floats(1.0, 6.0),
    feature_scale=st.floats(1e-3, 30.0),
    operator=st.sampled_from(OPERATORS),
    anneal_iteration=st.one_of(st.none(), st.integers(0, 5000)),
)
def test_margin_loss_is_never_below_margin_free_loss(seed, n, c, m, feature_scale, operator, anneal_iteration):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 3, generator=gen, dtype=torch.float64) * feature_scale
    labels = torch.randint(0, c, (n,), generator=gen)
    margin_loss = GASoftmaxLoss(3, c, margin=m, operator=operator, anneal=anneal_iteration is not None).double().eval()
    if anneal_iteration is not None:
        margin_loss.iteration.fill_(anneal_iteration)
    plain = WeightNormalizedSoftmaxLoss(3, c, operator=operator).double()
    plain.weight.data.copy_(margin_loss.weight.data)
    with torch.no_grad():
        assert float(margin_loss(features, labels).detach()) >= float(plain(features, labels).detach()) - 1e-12


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (GASoftmaxLoss, {"margin": 2.7, "operator": "sigmoid"}),
        (ASoftmaxLoss, {"margin": 4}),
        (WeightNormalizedSoftmaxLoss, {"operator": "linear"}),
    ],
)
def test_autocast_bfloat16_computes_in_float32(cls, kwargs):
    torch.manual_seed(7)
    loss = cls(16, 5, **kwargs)
    features = torch.randn(8, 16)
    labels = torch.randint(0, 5, (8,))
    reference = loss(features, labels)
    features_bf16 = features.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(features_bf16, labels)
        logits = loss.logits(features_bf16)
    assert value.dtype == torch.float32 and logits.dtype == torch.float32
    value.backward()
    assert torch.isfinite(features_bf16.grad.float()).all() and torch.isfinite(loss.weight.grad).all()
    assert float(value.detach()) == pytest.approx(float(reference.detach()), rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (GASoftmaxLoss, {"margin": 2.7, "operator": "linear", "anneal": False}),
        (GASoftmaxLoss, {"margin": 1.5, "operator": "sigmoid", "anneal": False}),
        (ASoftmaxLoss, {"margin": 4, "anneal": False}),
    ],
)
def test_zero_and_collinear_features_give_finite_gradients(cls, kwargs, dtype):
    torch.manual_seed(8)
    loss = cls(4, 3, **kwargs).to(dtype)
    w = loss.weight.detach()
    features = torch.stack([torch.zeros(4, dtype=dtype), 2.5 * w[1], -3.0 * w[2], w[0] * (1 + 1e-7)]).requires_grad_(
        True
    )
    labels = torch.tensor([0, 1, 2, 0])
    value = loss(features, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(features.grad).all() and torch.isfinite(loss.weight.grad).all()
    assert float(value.detach()) > 0 and math.isfinite(float(value.detach()))
