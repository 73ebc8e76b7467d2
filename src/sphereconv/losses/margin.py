"""Angular margin functions and the SphereFace annealing schedule.

Generalised angular softmax (GA-Softmax) of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
arXiv:1711.03189), Sec. 2.2 (loss functions), which generalises A-Softmax of Liu et al.,
"SphereFace" (CVPR 2017, arXiv:1704.08063), Sec. 3.2, from cos to any angular function g.

The target class of a sample sees ``psi(theta) = g(m theta)`` instead of ``g(theta)``. For
``m theta > pi`` the value ``g(m theta)`` is not defined (g lives on [0, pi]) and the periodic
continuation of cos would turn back up, so SphereFace continues it downwards. Writing
``n = floor(m theta / pi)`` and ``u = m theta - n pi`` (so u lies in [0, pi)):

    psi(theta) = g(u) - 2n.

Derivation. For g = cos: ``cos(u) = cos(m theta - n pi) = (-1)^n cos(m theta)``, so this is exactly
SphereFace's ``(-1)^n cos(m theta) - 2n`` on ``[n pi/m, (n+1) pi/m]``. For any g that decreases
from ``g(0) = 1`` to ``g(pi) = -1`` (linear, cosine, sigmoid, square cosine):

* inside one piece psi is ``g`` shifted down by 2n, hence decreasing;
* at a junction ``m theta = (n+1) pi`` the left piece ends at ``g(pi) - 2n = -1 - 2n`` and the next
  begins at ``g(0) - 2(n+1) = -1 - 2n``: psi is continuous, hence decreasing on all of [0, pi];
* ``psi(theta) <= g(theta)`` for m >= 1 (``g(m theta) <= g(theta)`` on the first piece because g
  decreases; every later piece lies below ``1 - 2n <= -1 <= g``), so the margin never helps the
  target class;
* each of those g satisfies ``g(pi - t) = -g(t)``, so ``g'(0) = g'(pi)`` and psi is even C^1.
  For linear g the pieces join into the single line ``1 - 2 m theta / pi``.

For integer m and cosine g, ``cos(m theta)`` is the Chebyshev polynomial ``T_m(cos theta)``, which
needs no arccos; :func:`chebyshev_cos_multiple` evaluates it (SphereFace's own implementation
does the same with explicit polynomials for m = 1..4).

SphereFace trains with a blend of the plain and the margin logit for the target class,

    f_y = (lambda * g(theta_y) + psi(theta_y)) / (1 + lambda),
    lambda = max(lambda_min, base * (1 + gamma * t) ^ -power),

where t counts training iterations; :func:`annealing_lambda` computes lambda. SphereFace's
constants belong to its 28k-iteration run (lambda reaches its floor 5 after ~1.7k iterations, 6%
of the run); :func:`scaled_gamma` stretches gamma to another run length T (``gamma * 28000 / T``),
so that a run of 500 iterations also reaches the floor after 6% of it instead of never. A loss
built without ``anneal_iterations`` anneals over :data:`DEFAULT_ANNEAL_ITERATIONS` (1,000), the
scale of a first short run, not over SphereFace's 28k, after which a run of a few hundred steps
would still be at lambda ~ 30 (the margin carrying 3% of the target logit).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..nn.angular import DEFAULT_SIGMOID_K, angle_to_g

# SphereFace's annealing defaults (margin_inner_product layer of the SphereFace reference code,
# sphereface_train.prototxt): lambda starts at `base`, decays as base / (1 + gamma t)^power and is
# floored at lambda_min.
LAMBDA_BASE = 1000.0
LAMBDA_GAMMA = 0.12
LAMBDA_POWER = 1.0
LAMBDA_MIN = 5.0
# Length of the run those constants were made for: max_iter 28000 in SphereFace's
# sphereface_solver.prototxt (CASIA-WebFace, batch 256).
SPHEREFACE_ITERATIONS = 28000
# Run length a margin loss anneals over when none is given (the training engine always gives the
# run's own): lambda reaches its floor after 60 iterations, so a first run of a few hundred steps
# trains with the margin. A long run passes its length (SPHEREFACE_ITERATIONS for SphereFace's).
DEFAULT_ANNEAL_ITERATIONS = 1000


def margin_index(theta: Tensor, margin: float) -> Tensor:
    """``n = floor(m theta / pi)``, the piece of the downward continuation ``theta`` falls in.

    Piecewise constant, so it carries no gradient; returned in ``theta``'s dtype, floored at 0.
    """
    with torch.no_grad():
        return torch.floor(theta.detach() * (margin / math.pi)).clamp_min(0.0)


def extended_margin_function(
    theta: Tensor,
    margin: float,
    operator: str = "cosine",
    sigmoid_k: float = DEFAULT_SIGMOID_K,
) -> Tensor:
    """GA-Softmax target function ``psi(theta) = g(m theta - n pi) - 2n``, ``n = floor(m theta / pi)``.

    ``theta`` holds angles in [0, pi]; ``margin`` is the real margin m >= 1; ``operator`` names g
    (``linear``, ``cosine``, ``sigmoid``, ``square_cosine``). psi is continuous, monotonically
    decreasing, equals ``g(m theta)`` for ``m theta <= pi`` and ``(-1)^n cos(m theta) - 2n`` for the
    cosine (see the module docstring for the derivation).
    """
    n = margin_index(theta, margin)
    reduced = margin * theta - math.pi * n
    return angle_to_g(reduced, operator, sigmoid_k) - 2.0 * n


def chebyshev_cos_multiple(cos_theta: Tensor, multiple: int) -> Tensor:
    """``cos(m theta)`` from ``cos(theta)`` for a positive integer m, as the Chebyshev polynomial
    ``T_m(c)``: ``T_0 = 1, T_1 = c, T_{k+1} = 2 c T_k - T_{k-1}``. Polynomial in c, so its
    gradient is finite everywhere, including ``|c| = 1``.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer; got {multiple!r}")
    previous, current = torch.ones_like(cos_theta), cos_theta
    for _ in range(multiple - 1):
        previous, current = current, 2.0 * cos_theta * current - previous
    return current


def a_softmax_margin_function(cos_theta: Tensor, margin: int) -> Tensor:
    """SphereFace's ``psi(theta) = (-1)^n cos(m theta) - 2n`` for integer m, from ``cos(theta)``.

    ``cos(m theta)`` is the Chebyshev polynomial (no arccos in the gradient); only the piecewise
    constant ``n = floor(m theta / pi)`` uses the angle. Equal to
    :func:`extended_margin_function` with cosine g.
    """
    cos_theta = cos_theta.clamp(-1.0, 1.0)
    n = margin_index(torch.acos(cos_theta.detach()), margin)
    sign = 1.0 - 2.0 * torch.remainder(n, 2.0)  # (-1)^n
    return sign * chebyshev_cos_multiple(cos_theta, margin) - 2.0 * n


def scaled_gamma(gamma: float, total_iterations: int | float | torch.Tensor) -> float | torch.Tensor:
    """SphereFace's decay rate ``gamma`` stretched to a run of ``total_iterations``:
    ``gamma * 28000 / total_iterations``, so lambda(t) over that run has the shape it has over
    SphereFace's 28k iterations (identical for ``total_iterations = 28000``)."""
    return gamma * SPHEREFACE_ITERATIONS / total_iterations


def annealing_lambda(
    iteration: Tensor | int,
    base: float = LAMBDA_BASE,
    gamma: float | Tensor = LAMBDA_GAMMA,
    power: float = LAMBDA_POWER,
    minimum: float = LAMBDA_MIN,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor | float:
    """SphereFace's annealing weight ``lambda = max(minimum, base * (1 + gamma * t) ^ -power)``.

    ``iteration`` (t) is an int (returns a float) or a tensor (returns a ``dtype`` tensor on its
    device, without a host synchronisation).
    """
    if isinstance(iteration, Tensor):
        decayed = base * torch.pow(1.0 + gamma * iteration.to(dtype), -power)
        return decayed.clamp_min(minimum)
    return max(minimum, base * (1.0 + gamma * iteration) ** -power)


__all__ = [
    "LAMBDA_BASE",
    "LAMBDA_GAMMA",
    "LAMBDA_POWER",
    "LAMBDA_MIN",
    "SPHEREFACE_ITERATIONS",
    "DEFAULT_ANNEAL_ITERATIONS",
    "scaled_gamma",
    "margin_index",
    "extended_margin_function",
    "chebyshev_cos_multiple",
    "a_softmax_margin_function",
    "annealing_lambda",
]
