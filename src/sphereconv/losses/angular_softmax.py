"""Weight-normalised softmax, GA-Softmax and A-Softmax.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, arXiv:1711.03189), Sec. 2.2 (loss
functions):

* weight-normalised softmax: classifier rows normalised, no bias, ``logit_j = |x| g(theta_j)``;
* generalised angular softmax (GA-Softmax):

      L = -log( e^{|x| psi(theta_y)} / (e^{|x| psi(theta_y)} + sum_{j != y} e^{|x| g(theta_j)}) ),

  ``psi(theta) = g(m theta)`` continued monotonically downwards (see :mod:`.margin`), real m >= 1;

and A-Softmax of "SphereFace" (Liu et al., CVPR 2017, arXiv:1704.08063, Sec. 3.2), GA-Softmax
with cosine g and integer m, trained with SphereFace's annealed target logit
``(lambda g(theta_y) + psi(theta_y)) / (1 + lambda)``.

Both default to SphereFace's margin m = 4 (m = 1 would be the weight-normalised softmax), and
the annealing schedule is stretched to the length of the run (``anneal_iterations``, which the
training engine sets to the run's total iterations; SphereFace's constants are the 28k case; a
loss built directly anneals over 1,000 iterations unless told otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_bool, check_float, check_int
from ..nn.angular import (
    CLASSIFIER_OPERATORS,
    DEFAULT_EPS,
    DEFAULT_SIGMOID_K,
    angular_function,
    canonical_operator,
    check_positive,
    safe_acos,
)
from ..nn.conv import Device
from .base import AngularSoftmaxLoss
from .margin import (
    DEFAULT_ANNEAL_ITERATIONS,
    LAMBDA_BASE,
    LAMBDA_GAMMA,
    LAMBDA_MIN,
    LAMBDA_POWER,
    a_softmax_margin_function,
    annealing_lambda,
    extended_margin_function,
    scaled_gamma,
)

# Angular functions g usable in a classifier: fixed, decreasing from g(0) = 1 to g(pi) = -1. The
# learnable sigmoid is a convolution operator (one k per output channel) and is not offered here.
LOSS_OPERATORS = CLASSIFIER_OPERATORS
# SphereFace's margin (SphereFace Sec. 4.1 and its reference prototxt: m = 4, the value its
# experiments use throughout), the default of A-Softmax and of GA-Softmax alike.
A_SOFTMAX_MARGIN = 4
GA_SOFTMAX_MARGIN = A_SOFTMAX_MARGIN
# Largest angular margin: the papers use 1-4. psi's last piece is -2n with n up to m, so the true
# class's logit reaches -(2m + 1)|x| and the loss grows like m; A-Softmax's T_m costs O(m) per call
# (64 ms at m = 1024 for a batch of 64 on a CPU) and a margin beyond float32's range gives NaN.
MAX_ANGULAR_MARGIN = 64
# What A-Softmax's margin error lists as allowed.
A_SOFTMAX_MARGIN_RANGE = (
    f"an integer from 1 to {MAX_ANGULAR_MARGIN} (GASoftmaxLoss takes a real-valued margin in that range)"
)


class WeightNormalizedSoftmaxLoss(AngularSoftmaxLoss):
    """Weight-normalised softmax (Liu et al. 2017, Sec. 2.2): ``logit_j = |x| g(theta_j)``.

    ``theta_j`` is the angle between the feature x and classifier row w_j (normalised, no bias);
    ``|x|`` is the feature norm ``sqrt(sum x^2 + eps m_x^2)`` (``m_x`` its largest |x|). With cosine g the logits are
    ``<x, w_j / |w_j|>``. ``operator`` is one of ``linear``, ``cosine``, ``sigmoid`` (steepness
    ``sigmoid_k``), ``square_cosine``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        label_smoothing: float = 0.0,
        eps: float = DEFAULT_EPS,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, num_classes, label_smoothing=label_smoothing, eps=eps, device=device, dtype=dtype)
        self.operator = canonical_operator(operator, LOSS_OPERATORS)
        self.sigmoid_k = check_positive("sigmoid_k", sigmoid_k)

    def angular_score(self, cos_theta: Tensor) -> Tensor:
        """``g(theta_j)`` for the configured operator."""
        return angular_function(cos_theta, self.operator, self.sigmoid_k)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", operator={self.operator}"
        return s + (f", sigmoid_k={self.sigmoid_k}" if self.operator == "sigmoid" else "")


class GASoftmaxLoss(WeightNormalizedSoftmaxLoss):
    """Generalised angular softmax (Liu et al. 2017, Sec. 2.2), real margin m >= 1.

    Training logits: ``|x| g(theta_j)`` for j != y and, for the true class y,

        f_y = |x| (lambda g(theta_y) + psi(theta_y)) / (1 + lambda),
        psi(theta) = g(m theta - n pi) - 2n,  n = floor(m theta / pi),

    (continuous and decreasing on [0, pi]; for cosine g this is SphereFace's
    ``(-1)^n cos(m theta) - 2n``); default m = 4 (SphereFace's). With ``anneal=True`` (SphereFace's
    schedule), ``lambda = max(lambda_min, lambda_base (1 + gamma t)^-lambda_power)`` with
    ``gamma = lambda_gamma * 28000 / anneal_iterations`` (SphereFace's ``lambda_gamma`` belongs to
    its 28k-iteration run; the trainer sets ``anneal_iterations`` to the run's length, the default
    is :data:`~.margin.DEFAULT_ANNEAL_ITERATIONS` = 1,000 for a first short run) and t the
    ``iteration`` buffer, advanced by one at every forward call in training mode (before lambda is
    computed, as SphereFace's layer does). Both counters are buffers, saved in the state dict.
    ``anneal=False`` uses lambda = 0, i.e. the pure margin. m = 1 is the weight-normalised softmax.
    ``logits`` (prediction) use no margin.
    """

    iteration: Tensor
    anneal_iterations: Tensor

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        margin: float = GA_SOFTMAX_MARGIN,
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        anneal: bool = True,
        anneal_iterations: int = DEFAULT_ANNEAL_ITERATIONS,
        lambda_base: float = LAMBDA_BASE,
        lambda_gamma: float = LAMBDA_GAMMA,
        lambda_power: float = LAMBDA_POWER,
        lambda_min: float = LAMBDA_MIN,
        label_smoothing: float = 0.0,
        eps: float = DEFAULT_EPS,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            operator=operator,
            sigmoid_k=sigmoid_k,
            label_smoothing=label_smoothing,
            eps=eps,
            device=device,
            dtype=dtype,
        )
        self.margin = margin
        self.anneal = check_bool("anneal", anneal)
        self.lambda_base = check_float("lambda_base", lambda_base, low=0.0)
        self.lambda_gamma = check_float("lambda_gamma", lambda_gamma, low=0.0)
        self.lambda_power = check_float("lambda_power", lambda_power, low=0.0)
        self.lambda_min = check_float("lambda_min", lambda_min, low=0.0)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=device))
        anneal_iterations = check_int("anneal_iterations", anneal_iterations, minimum=1)
        self.register_buffer("anneal_iterations", torch.tensor(anneal_iterations, dtype=torch.long, device=device))

    @property
    def margin(self) -> float:
        """The angular margin m in [1, MAX_ANGULAR_MARGIN]; it may be reassigned (checked) after construction."""
        return self._margin

    @margin.setter
    def margin(self, value: float) -> None:
        self._margin = self.check_margin(value)

    def check_margin(self, value: float) -> float:
        """``value`` as a valid margin (a real number in [1, MAX_ANGULAR_MARGIN]), else ``ValueError``/``TypeError``."""
        return check_float("margin", value, low=1.0, high=MAX_ANGULAR_MARGIN)

    def margin_function(self, cos_theta: Tensor) -> Tensor:
        """``psi(theta)`` of the true class from its cosine (see :func:`.margin.extended_margin_function`)."""
        return extended_margin_function(safe_acos(cos_theta), self.margin, self.operator, self.sigmoid_k)

    def annealing_weight(self, dtype: torch.dtype = torch.float64) -> Tensor | float:
        """The lambda used now: SphereFace's schedule at ``iteration`` (a ``dtype`` tensor), or 0.0
        without annealing."""
        if not self.anneal:
            return 0.0
        gamma = scaled_gamma(self.lambda_gamma, self.anneal_iterations.to(dtype))
        return annealing_lambda(
            self.iteration, self.lambda_base, gamma, self.lambda_power, self.lambda_min, dtype=dtype
        )

    @property
    def current_lambda(self) -> float:
        """The annealing lambda as a Python float (for logging)."""
        return float(self.annealing_weight())

    def target_logit(self, cos_target: Tensor, score_target: Tensor) -> Tensor:
        """``(lambda g(theta_y) + psi(theta_y)) / (1 + lambda)`` (just ``psi`` when lambda = 0)."""
        psi = self.margin_function(cos_target)
        lam = self.annealing_weight(psi.dtype)
        if not isinstance(lam, Tensor):
            return psi
        return (lam * score_target + psi) / (1.0 + lam)

    def on_training_step(self) -> None:
        """Advance the annealing counter ``iteration`` (once per training forward)."""
        self.iteration.add_(1)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", margin={self.margin:g}"
        if not self.anneal:
            return s + ", anneal=False"
        return s + (
            f", anneal=(base={self.lambda_base:g}, gamma={self.lambda_gamma:g} at 28k, "
            f"power={self.lambda_power:g}, min={self.lambda_min:g}, "
            f"iterations={int(self.anneal_iterations)})"
        )


class ASoftmaxLoss(GASoftmaxLoss):
    """A-Softmax / SphereFace loss (Liu et al., CVPR 2017, Sec. 3.2): GA-Softmax with cosine g and
    integer margin m (default 4).

    True-class logit ``|x| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)`` with
    ``psi(theta) = (-1)^n cos(m theta) - 2n``, ``n = floor(m theta / pi)``; ``cos(m theta)`` is
    evaluated as the Chebyshev polynomial ``T_m(cos theta)``, so no arccos enters the gradient.
    Annealing as in :class:`GASoftmaxLoss` (on by default, SphereFace's schedule stretched to
    ``anneal_iterations``).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        margin: int = A_SOFTMAX_MARGIN,
        anneal: bool = True,
        anneal_iterations: int = DEFAULT_ANNEAL_ITERATIONS,
        lambda_base: float = LAMBDA_BASE,
        lambda_gamma: float = LAMBDA_GAMMA,
        lambda_power: float = LAMBDA_POWER,
        lambda_min: float = LAMBDA_MIN,
        label_smoothing: float = 0.0,
        eps: float = DEFAULT_EPS,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            margin=margin,
            operator="cosine",
            anneal=anneal,
            anneal_iterations=anneal_iterations,
            lambda_base=lambda_base,
            lambda_gamma=lambda_gamma,
            lambda_power=lambda_power,
            lambda_min=lambda_min,
            label_smoothing=label_smoothing,
            eps=eps,
            device=device,
            dtype=dtype,
        )

    def check_margin(self, value: float) -> float:
        """``value`` as a valid margin: an integer from 1 to MAX_ANGULAR_MARGIN (returned as a float)."""
        return float(check_int("margin", value, minimum=1, maximum=MAX_ANGULAR_MARGIN, allowed=A_SOFTMAX_MARGIN_RANGE))

    @property
    def margin_int(self) -> int:
        """The margin m as the integer degree of the Chebyshev polynomial ``T_m``."""
        return int(self._margin)

    def margin_function(self, cos_theta: Tensor) -> Tensor:
        """``(-1)^n T_m(cos theta) - 2n`` (see :func:`.margin.a_softmax_margin_function`)."""
        return a_softmax_margin_function(cos_theta, self.margin_int)


__all__ = [
    "LOSS_OPERATORS",
    "GA_SOFTMAX_MARGIN",
    "A_SOFTMAX_MARGIN",
    "WeightNormalizedSoftmaxLoss",
    "GASoftmaxLoss",
    "ASoftmaxLoss",
]
