"""The GA-Softmax margin function psi and SphereFace's annealing schedule."""

from __future__ import annotations

import math

import pytest
import torch
from losses_reference_formulas import g_of_angle, psi_of_angle

from sphereconv.losses import ASoftmaxLoss, GASoftmaxLoss
from sphereconv.losses.margin import (
    SPHEREFACE_ITERATIONS,
    a_softmax_margin_function,
    annealing_lambda,
    chebyshev_cos_multiple,
    extended_margin_function,
)

MARGINS = [1.0, 1.5, 2.0, 2.7, 4.0]
OPERATORS = [("linear", 0.3), ("cosine", 0.3), ("sigmoid", 0.3), ("sigmoid", 0.1), ("square_cosine", 0.3)]
GRID = torch.linspace(0.0, math.pi, 100_001, dtype=torch.float64)


@pytest.mark.parametrize("operator,k", OPERATORS)
@pytest.mark.parametrize("m", MARGINS)
def test_psi_is_monotone_decreasing_and_continuous(m, operator, k):
    psi = extended_margin_function(GRID, m, operator, k)
    steps = psi.diff()
    assert float(steps.max()) <= 1e-12, "psi increases somewhere"
    # Continuity: no step larger than the steepest slope of g (times m) allows on this grid.
    g = extended_margin_function(GRID, 1.0, operator, k)
    max_slope = float((g.diff().abs() / GRID.diff()).max())
    assert float(steps.abs().max()) <= 1.01 * m * max_slope * float(GRID[1] - GRID[0])
    # At every junction m theta = n pi both sides meet.
    for n in range(1, math.floor(m) + 1):
        junction = n * math.pi / m
        if junction >= math.pi:
            continue
        sides = extended_margin_function(
            torch.tensor([junction - 1e-9, junction + 1e-9], dtype=torch.float64), m, operator, k
        )
        assert abs(float(sides[0] - sides[1])) < 1e-6
        assert float(sides[0]) == pytest.approx(-1.0 - 2.0 * (n - 1), abs=1e-6)


@pytest.mark.parametrize("operator,k", OPERATORS)
@pytest.mark.parametrize("m", MARGINS)
def test_psi_matches_direct_formula_and_never_exceeds_g(m, operator, k):
    thetas = torch.linspace(0.0, math.pi, 301, dtype=torch.float64)
    psi = extended_margin_function(thetas, m, operator, k)
    expected = torch.tensor([psi_of_angle(t, m, operator, k) for t in thetas.tolist()], dtype=torch.float64)
    torch.testing.assert_close(psi, expected, rtol=0, atol=1e-12)
    g = torch.tensor([g_of_angle(t, operator, k) for t in thetas.tolist()], dtype=torch.float64)
    assert bool((psi <= g + 1e-12).all())
    assert float(psi[0]) == pytest.approx(1.0, abs=1e-12)
    first_piece = m * thetas <= math.pi
    torch.testing.assert_close(
        psi[first_piece],
        torch.tensor([g_of_angle(m * t, operator, k) for t in thetas[first_piece].tolist()], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


def test_linear_psi_is_a_single_line():
    for m in MARGINS:
        torch.testing.assert_close(extended_margin_function(GRID, m, "linear"), 1.0 - 2.0 * m * GRID / math.pi)


@pytest.mark.parametrize("m", range(1, 7))
def test_chebyshev_a_softmax_equals_angle_form(m):
    cos = torch.cat(
        [torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)]
    )
    via_angle = extended_margin_function(torch.acos(cos), float(m), "cosine")
    torch.testing.assert_close(a_softmax_margin_function(cos, m), via_angle, rtol=0, atol=1e-10)
    theta = torch.acos(cos)
    torch.testing.assert_close(chebyshev_cos_multiple(cos, m), torch.cos(m * theta), rtol=0, atol=1e-10)


def test_chebyshev_gradient_is_finite_at_the_poles():
    cos = torch.tensor([-1.0, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
    a_softmax_margin_function(cos, 4).sum().backward()
    assert torch.isfinite(cos.grad).all()
    # d/dc T_4(c) = 32 c^3 - 16 c: at c = 1 with n = 0 the slope is 16.
    assert float(cos.grad[1]) == pytest.approx(16.0)


def test_annealing_lambda_schedule_values():
    # SphereFace defaults: base 1000, gamma 0.12, power 1, floor 5.
    assert annealing_lambda(0) == 1000.0
    assert annealing_lambda(1) == pytest.approx(1000.0 / 1.12)
    assert annealing_lambda(100) == pytest.approx(1000.0 / 13.0)
    assert annealing_lambda(1000) == pytest.approx(1000.0 / 121.0)
    assert annealing_lambda(1659) == 5.0  # 1000 / (1 + 0.12 * 1659) < 5
    assert annealing_lambda(10**6) == 5.0
    assert annealing_lambda(10, base=100.0, gamma=0.5, power=2.0, minimum=0.0) == pytest.approx(100.0 / 36.0)
    as_tensor = annealing_lambda(torch.tensor([0, 1, 100, 10**6]))
    torch.testing.assert_close(
        as_tensor, torch.tensor([1000.0, 1000.0 / 1.12, 1000.0 / 13.0, 5.0], dtype=torch.float64)
    )
    assert annealing_lambda(torch.tensor(100), dtype=torch.float32).dtype == torch.float32


def test_module_advances_iteration_only_in_training_and_uses_it():
    torch.manual_seed(0)
    loss = GASoftmaxLoss(6, 4, margin=3.0, anneal_iterations=SPHEREFACE_ITERATIONS)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    assert int(loss.iteration) == 0 and loss.current_lambda == 1000.0
    loss(x, y)
    loss(x, y)
    assert int(loss.iteration) == 2
    assert loss.current_lambda == pytest.approx(1000.0 / 1.24)
    with pytest.raises(ValueError):
        loss(x, y + 10)
    assert int(loss.iteration) == 2, "a rejected batch must not advance the schedule"
    loss.eval()
    loss(x, y)
    assert int(loss.iteration) == 2
    state = loss.state_dict()
    assert int(state["iteration"]) == 2
    restored = GASoftmaxLoss(6, 4, margin=3.0, anneal_iterations=SPHEREFACE_ITERATIONS)
    restored.load_state_dict(state)
    assert restored.current_lambda == loss.current_lambda
    # Annealed target sits between the plain and the margin logit, approaching psi as lambda -> floor.
    restored.iteration.fill_(10**6)
    restored.eval()
    with torch.no_grad():
        late = float(restored(x, y))
    no_anneal = GASoftmaxLoss(6, 4, margin=3.0, anneal=False)
    no_anneal.load_state_dict(state)
    no_anneal.eval()
    plain = GASoftmaxLoss(6, 4, margin=1.0)
    plain.load_state_dict(state)
    with torch.no_grad():
        assert float(plain(x, y)) <= late <= float(no_anneal(x, y))
    assert no_anneal.current_lambda == 0.0


@pytest.mark.parametrize("loss_class", [GASoftmaxLoss, ASoftmaxLoss])
def test_default_annealing_gives_a_short_run_its_margin(loss_class):
    # Built without anneal_iterations (no trainer to set the run's length), a margin loss must
    # reach lambda's floor within a first run of a few hundred steps; SphereFace's 28k schedule
    # would leave lambda near 30 there, the margin carrying 3% of the target logit.
    loss = loss_class(6, 4)
    loss.iteration.fill_(100)
    assert loss.current_lambda == 5.0
    sphereface = loss_class(6, 4, anneal_iterations=SPHEREFACE_ITERATIONS)
    sphereface.iteration.fill_(300)
    assert sphereface.current_lambda > 25
