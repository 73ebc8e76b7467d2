"""Angular functions g(theta) of hyperspherical convolution.

Implements the SphereConv operators of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
arXiv:1711.03189), Section 2.1 (linear, cosine, sigmoid and learnable sigmoid SphereConv) and the
square-cosine angular function of the follow-up "Decoupled Networks" (CVPR 2018, arXiv:1804.08071),
Section 3.2.

Every g here is monotonically decreasing on [0, pi] with g(0) = 1, g(pi/2) = 0 and g(pi) = -1. All
functions take the (already clamped) cosine ``cos_theta`` because two of them (cosine and
square-cosine) never need the angle itself; the others call :func:`safe_acos`.
"""

from __future__ import annotations

import math
from typing import overload

import torch
from torch import Tensor

from .._validation import check_choice, check_float, fail

# The one set of operator names shared by layers, models, losses, the config and the CLI:
# every angular function g (decoupled layers and the functional API accept all of them) ...
ANGULAR_OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid", "square_cosine")
# ... the SphereConv operators of the 2017 paper (square_cosine belongs to decoupled networks),
# which SphereConv layers and every model accept ...
SPHERE_OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
# ... plus the plain convolution of the CNN baselines: a model's (and a config's) ``operator``.
PLAIN_OPERATOR = "none"
MODEL_OPERATORS = (PLAIN_OPERATOR,) + SPHERE_OPERATORS
# The fixed angular functions a classifier head can use (the learnable sigmoid has one k per
# output channel of a convolution and is not one of them).
CLASSIFIER_OPERATORS = ("linear", "cosine", "sigmoid", "square_cosine")
OPERATOR_ALIASES = {"lr_sigmoid": "learnable_sigmoid", "sq_cosine": "square_cosine"}
# Attribute marking a tensor that is positive by construction (see :func:`learnable_k`), so that
# :func:`check_positive` need not read its values back from the device at every forward.
_POSITIVE_MARK = "_sphereconv_positive"

# Reference defaults (wy1iu/SphereNet): sigmoid steepness k and the epsilon inside both norms.
DEFAULT_SIGMOID_K = 0.3
DEFAULT_EPS = 1e-4
# Learnable sigmoid (reference code): raw parameter initialised to 0.7, effective k = |raw| + 0.05
# so that k stays bounded away from zero.
LEARNABLE_K_INIT = 0.7
LEARNABLE_K_FLOOR = 0.05


def canonical_operator(name: str, allowed: tuple[str, ...] = ANGULAR_OPERATORS, *, argument: str = "operator") -> str:
    """The canonical spelling of the operator ``name``, one of ``allowed`` (aliases accepted).

    ``argument`` names the setting in the error: ``TypeError`` for a non-string, ``ValueError``
    listing ``allowed`` otherwise.
    """
    if isinstance(name, str) and name in allowed:  # already canonical: no alias table to build
        return name
    aliases = {alias: target for alias, target in OPERATOR_ALIASES.items() if target in allowed}
    return check_choice(argument, name, allowed, aliases=aliases)


@overload
def check_positive(name: str, value: Tensor) -> Tensor: ...
@overload
def check_positive(name: str, value: float) -> float: ...
def check_positive(name: str, value: float | Tensor) -> float | Tensor:
    """``value`` if it is a positive finite number (or a tensor of them), else ``ValueError``/``TypeError``.

    Numbers come back as ``float``; a tensor is returned as is, checked on the host unless it is
    positive by construction (:func:`learnable_k`).
    """
    if isinstance(value, Tensor):
        if getattr(value, _POSITIVE_MARK, False):
            return value  # |raw| + floor: positive by construction, no device-to-host read needed
        if value.numel() == 0 or not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
            raise fail(name, value.detach().flatten()[:8].tolist(), "positive finite values everywhere")
        return value
    return check_float(name, value, low=0.0, low_open=True)


def acos_derivative_bound(dtype: torch.dtype) -> float:
    """Bound on |d arccos(c)/dc| = 1/sqrt(1-c^2) used in the backward pass.

    The true derivative is infinite at |c| = 1. We evaluate it at 1 - c^2 >= eps(dtype), the
    machine epsilon of the computation dtype (float32: about 2.9e3; float64: about 6.7e7). Anything
    steeper is indistinguishable from rounding noise in that dtype anyway.
    """
    return 1.0 / math.sqrt(torch.finfo(dtype).eps)


class _SafeAcos(torch.autograd.Function):
    """arccos with its input clamped to [-1, 1] and a bounded, finite derivative."""

    @staticmethod
    def forward(cos_theta: Tensor) -> Tensor:
        return torch.acos(cos_theta.clamp(-1.0, 1.0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (cos_theta,) = ctx.saved_tensors
        floor = torch.finfo(cos_theta.dtype).eps
        one_minus_sq = (1.0 - cos_theta.clamp(-1.0, 1.0).square()).clamp_min(floor)
        return -grad_output * one_minus_sq.rsqrt()


def safe_acos(cos_theta: Tensor) -> Tensor:
    """``arccos(clamp(c, -1, 1))`` whose gradient is bounded by :func:`acos_derivative_bound`."""
    return _SafeAcos.apply(cos_theta)


def sigmoid_scale(k: Tensor | float) -> Tensor | float:
    """1 / tanh(pi / (4k)): the constant c_k that makes the sigmoid operator hit g(0) = 1."""
    if isinstance(k, Tensor):
        return 1.0 / torch.tanh(math.pi / (4.0 * k))
    return 1.0 / math.tanh(math.pi / (4.0 * k))


def sigmoid_of_angle(theta: Tensor, k: Tensor | float) -> Tensor:
    """Sigmoid SphereConv: c_k (1 - e^{theta/k - pi/2k}) / (1 + e^{theta/k - pi/2k}).

    Evaluated as tanh((pi/2 - theta) / 2k) / tanh(pi / 4k), the identical closed form that cannot
    overflow for small k or in low precision (paper Sec. 2.1, eq. for the sigmoid SphereConv).
    """
    return torch.tanh((0.5 * math.pi - theta) / (2.0 * k)) * sigmoid_scale(k)


def linear_of_angle(theta: Tensor) -> Tensor:
    """Linear SphereConv: g(theta) = 1 - 2 theta / pi (paper Sec. 2.1)."""
    return 1.0 - (2.0 / math.pi) * theta


def angular_function(cos_theta: Tensor, operator: str, sigmoid_k: Tensor | float = DEFAULT_SIGMOID_K) -> Tensor:
    """Apply g to a cosine: ``g(arccos(cos_theta))`` for the named operator.

    ``cos_theta`` is clamped to [-1, 1] first. ``sigmoid_k`` is a float or a tensor broadcastable
    to ``cos_theta`` (one k per output channel for the learnable sigmoid).
    """
    operator = canonical_operator(operator)
    cos_theta = cos_theta.clamp(-1.0, 1.0)
    if operator == "cosine":
        return cos_theta
    if operator == "square_cosine":
        # Decoupled Networks Sec. 3.2: sign(cos) * cos^2.
        return cos_theta * cos_theta.abs()
    theta = safe_acos(cos_theta)
    if operator == "linear":
        return linear_of_angle(theta)
    return sigmoid_of_angle(theta, sigmoid_k)


def angle_to_g(theta: Tensor, operator: str, sigmoid_k: Tensor | float = DEFAULT_SIGMOID_K) -> Tensor:
    """g evaluated at an explicit angle ``theta`` in [0, pi] (used by the margin losses)."""
    operator = canonical_operator(operator)
    if operator == "cosine":
        return torch.cos(theta)
    if operator == "square_cosine":
        c = torch.cos(theta)
        return c * c.abs()
    if operator == "linear":
        return linear_of_angle(theta)
    return sigmoid_of_angle(theta, sigmoid_k)


def learnable_k(raw: Tensor) -> Tensor:
    """Effective sigmoid k from the raw learnable parameter: |raw| + 0.05 (reference code).

    The result is positive by construction (for finite raw values) and marked so, so that
    :func:`check_positive` accepts it without a device-to-host synchronisation at every forward.
    """
    k = raw.abs() + LEARNABLE_K_FLOOR
    if not torch.compiler.is_compiling():
        setattr(k, _POSITIVE_MARK, True)
    return k
