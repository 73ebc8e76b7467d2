"""Decoupled convolution operators (Liu et al., "Decoupled Networks", CVPR 2018, arXiv:1804.08071).

Section 3 of that paper rewrites the inner product ``<w, x> = |w| |x| cos(theta)`` as a product of a
magnitude function and an angular function and generalises both:

    f(w, x) = h(|w|, |x|) * g(theta)

The angular functions g are those of SphereConv (``linear``, ``cosine``, ``sigmoid``,
``learnable_sigmoid``) plus the square cosine ``sign(cos) cos^2`` (Sec. 3.2). The magnitude functions
h (Sec. 3.1; ``x`` below is the patch norm ``|x|_e = sqrt(sum x^2 + eps m_x^2)`` of SphereConv):

    sphere  h = alpha                                   (SphereConv when alpha = 1)
    ball    h = alpha * min(x, rho) / rho               (BallConv)
    tanh    h = alpha * tanh(x / rho)                   (TanhConv)
    linear  h = alpha * x                               (LinearConv; cosine g gives <w/|w|, x>)
    seg     h = alpha * x                 if x <= rho   (SegConv)
              beta * x + (alpha - beta) * rho  otherwise
    log     h = alpha * log(1 + x)                      (LogConv)
    mix     h = alpha * x + beta * log(1 + x)           (MixConv)

Weighted variants (Sec. 3.3) multiply h by the filter norm ``|w|_e``. Learnable variants (Sec. 3.4)
learn alpha (and beta) per output channel and, for the magnitudes with a radius, learn rho in the
reference parameterisation (wy1iu/DCNets): ``rho = (r^2 + 1e-4) * mean(|x|)`` with ``r`` a per-channel
parameter initialised to 1 and ``mean(|x|)`` the batch mean of the patch norms in training and its
running average at evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.common_types import _size_2_t

from .._validation import check_bool, check_choice, check_float, fail
from . import functional as SF
from .angular import (
    ANGULAR_OPERATORS,
    DEFAULT_EPS,
    DEFAULT_SIGMOID_K,
    LEARNABLE_K_INIT,
    angular_function,
    canonical_operator,
    check_positive,
    learnable_k,
)
from .conv import Device, PaddingMode

MAGNITUDES = ("sphere", "ball", "tanh", "linear", "seg", "log", "mix")
"""Names of the magnitude functions h (Decoupled Networks Sec. 3.1)."""
# Magnitudes whose formula has a radius rho (the ones a learnable radius applies to).
RADIUS_MAGNITUDES = ("ball", "tanh", "seg")
# Magnitudes whose formula has a second coefficient beta.
BETA_MAGNITUDES = ("seg", "mix")
# Default beta per magnitude: SegConv's slope past the radius is 0.5 in the reference code
# (wy1iu/DCNets, dcnet_cifar100/seg_cos: 0.5 * |x| + 0.5 * rho); the paper gives no value for
# MixConv, where beta = 1 weights the logarithmic term like the linear one.
DEFAULT_BETA = {"seg": 0.5, "mix": 1.0}
# Learnable radius (reference code): rho = (r^2 + 1e-4) * mean|x|, r initialised to 1.
RADIUS_INIT = 1.0
RADIUS_FLOOR = 1e-4
# The reference keeps the average of mean|x| with an exponential moving average of decay 0.999,
# i.e. a momentum of 1e-3 in torch.nn.BatchNorm's convention.
DEFAULT_MOMENTUM = 1e-3


def canonical_magnitude(name: str) -> str:
    """The canonical spelling of the magnitude ``name``, one of :data:`MAGNITUDES`."""
    return check_choice("magnitude", name, MAGNITUDES)


def _check_coefficient(name: str, value: float | Tensor, *, positive: bool) -> None:
    """Validate alpha / beta / rho given as a number or a tensor of per-channel values."""
    if positive:
        check_positive(name, value)
    elif not isinstance(value, Tensor):
        check_float(name, value)
    elif value.numel() == 0 or not bool(torch.isfinite(value).all()):
        raise fail(name, value.detach().flatten()[:8].tolist(), "finite values everywhere")


def _per_channel(value, name: str, out_channels: int, dims: int):
    """Reshape a per-output-channel tensor to broadcast over ``(N, C_out, *spatial)``."""
    if isinstance(value, Tensor) and value.numel() > 1:
        if value.numel() != out_channels:
            raise ValueError(f"{name} has {value.numel()} values; expected 1 or out_channels = {out_channels}")
        return value.reshape(out_channels, *([1] * dims))
    return value


def magnitude_function(
    x_norm: Tensor,
    magnitude: str,
    *,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor | None = None,
    rho: float | Tensor = 1.0,
) -> Tensor:
    """The magnitude function h(|x|) of a decoupled operator (Decoupled Networks Sec. 3.1).

    ``sphere``: alpha; ``ball``: alpha min(x, rho)/rho; ``tanh``: alpha tanh(x/rho); ``linear``:
    alpha x; ``seg``: alpha x for x <= rho else beta x + (alpha - beta) rho; ``log``:
    alpha log(1 + x); ``mix``: alpha x + beta log(1 + x). ``alpha``, ``beta`` and ``rho`` are numbers
    or tensors broadcastable to ``x_norm``; ``beta=None`` takes :data:`DEFAULT_BETA`.
    """
    magnitude = canonical_magnitude(magnitude)
    if beta is None:
        beta = DEFAULT_BETA.get(magnitude, 0.0)
    if magnitude == "sphere":
        return torch.ones_like(x_norm) * alpha
    if magnitude == "ball":
        return alpha * torch.minimum(x_norm, torch.as_tensor(rho, dtype=x_norm.dtype, device=x_norm.device)) / rho
    if magnitude == "tanh":
        return alpha * torch.tanh(x_norm / rho)
    if magnitude == "linear":
        return alpha * x_norm
    if magnitude == "seg":
        inside = alpha * x_norm
        outside = beta * x_norm + (alpha - beta) * rho
        return torch.where(x_norm <= rho, inside, outside)
    if magnitude == "log":
        return alpha * torch.log1p(x_norm)
    return alpha * x_norm + beta * torch.log1p(x_norm)


def decoupled_from_cosine(
    cos_theta: Tensor,
    x_norm: Tensor,
    w_norm: Tensor,
    *,
    magnitude: str = "sphere",
    operator: str = "cosine",
    weighted: bool = False,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor | None = None,
    rho: float | Tensor = 1.0,
    sigmoid_k: float | Tensor = DEFAULT_SIGMOID_K,
) -> Tensor:
    """Combine the pieces of :func:`sphereconv.nn.functional.sphere_cosine` into a decoupled output.

    ``f = [|w|_e] * h(|x|_e) * g(theta)`` (Decoupled Networks Sec. 3), with the ``|w|_e`` factor only
    when ``weighted``. ``cos_theta`` and ``x_norm`` have the output's shape ``(N, C_out, *spatial)``,
    ``w_norm`` has shape ``(C_out,)``; ``alpha``, ``beta``, ``rho`` and ``sigmoid_k`` are numbers or
    per-output-channel tensors.
    """
    dims = cos_theta.dim() - 2
    out_channels = cos_theta.shape[1]
    k = _per_channel(sigmoid_k, "sigmoid_k", out_channels, dims)
    g = angular_function(cos_theta, operator, k)
    h = magnitude_function(
        x_norm,
        magnitude,
        alpha=_per_channel(alpha, "alpha", out_channels, dims),
        beta=_per_channel(beta, "beta", out_channels, dims),
        rho=_per_channel(rho, "rho", out_channels, dims),
    )
    if weighted:
        h = h * w_norm.reshape(out_channels, *([1] * dims))
    return h * g


def _decoupled_forward(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    *,
    magnitude: str,
    operator: str,
    weighted: bool,
    alpha,
    beta,
    rho: Callable[[Tensor], Tensor | float],
    sigmoid_k,
    eps: float,
) -> Tensor:
    """Shared body of the functional and module forms; ``rho`` maps the patch norms to the radius."""
    dims = weight.dim() - 2
    SF._check_conv_args(input, weight, groups, dims)
    SF._check_bias(bias, weight, input)
    unbatched = input.dim() == dims + 1
    if unbatched:
        input = input.unsqueeze(0)
    out_dtype = None if torch.is_autocast_enabled(input.device.type) else torch.promote_types(input.dtype, weight.dtype)
    cos_theta, x_norm, w_norm = SF.sphere_cosine(input, weight, stride, padding, dilation, groups, eps)
    out = decoupled_from_cosine(
        cos_theta,
        x_norm,
        w_norm,
        magnitude=magnitude,
        operator=operator,
        weighted=weighted,
        alpha=alpha,
        beta=beta,
        rho=rho(x_norm),
        sigmoid_k=sigmoid_k,
    )
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(-1, *([1] * dims))
    if out_dtype is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.squeeze(0) if unbatched else out


def decoupled_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _size_2_t = 1,
    padding: _size_2_t | str = 0,
    dilation: _size_2_t = 1,
    groups: int = 1,
    *,
    magnitude: str = "sphere",
    operator: str = "cosine",
    weighted: bool = False,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor | None = None,
    rho: float | Tensor = 1.0,
    sigmoid_k: float | Tensor = DEFAULT_SIGMOID_K,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """2-d decoupled convolution (Decoupled Networks Sec. 3).

    ``out[n, o, i, j] = [|w_o|_e] * h(|x|_e) * g(theta) (+ bias[o])`` with ``cos(theta) = <w_o, x> /
    (|w_o|_e |x|_e)`` over every input patch x, ``|v|_e = sqrt(sum v^2 + eps m_v^2)`` as in SphereConv; ``h`` is the
    ``magnitude`` function (one of :data:`MAGNITUDES`, see :func:`magnitude_function`), ``g`` the
    angular ``operator`` (``linear``, ``cosine``, ``sigmoid``, ``learnable_sigmoid``,
    ``square_cosine``), and the ``|w_o|_e`` factor is present when ``weighted``. Arguments mirror
    :func:`torch.nn.functional.conv2d`; ``alpha``, ``beta``, ``rho`` and ``sigmoid_k`` are numbers or
    per-output-channel tensors (``rho`` and ``sigmoid_k`` must be positive).
    """
    magnitude = canonical_magnitude(magnitude)
    operator = canonical_operator(operator, ANGULAR_OPERATORS)
    check_bool("weighted", weighted)
    check_positive("eps", eps)
    if operator in ("sigmoid", "learnable_sigmoid"):
        check_positive("sigmoid_k", sigmoid_k)
    _check_coefficient("alpha", alpha, positive=False)
    if beta is not None:
        _check_coefficient("beta", beta, positive=False)
    if magnitude in RADIUS_MAGNITUDES:
        _check_coefficient("rho", rho, positive=True)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must have 4 dimensions (out, in/groups, kH, kW) for decoupled_conv2d; got {shape}")
    return _decoupled_forward(
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        magnitude=magnitude,
        operator=operator,
        weighted=weighted,
        alpha=alpha,
        beta=beta,
        rho=lambda _x_norm: rho,
        sigmoid_k=sigmoid_k,
        eps=eps,
    )


class DecoupledConv2d(nn.Conv2d):
    """Decoupled convolution layer (Decoupled Networks Sec. 3), a subclass of ``nn.Conv2d``.

    ``out = [|w|_e] * h(|x|_e) * g(theta) (+ bias)``, see :func:`decoupled_conv2d` for the magnitude
    functions h and angular functions g. The weight, bias and their state-dict keys are those of
    ``nn.Conv2d``, so a plain convolution's state dict loads (the extra parameters keep their
    initial values).

    With ``learnable=True`` (Sec. 3.4) alpha, and beta for ``seg``/``mix``, become per-output-channel
    parameters initialised to the given values, and the radius of ``ball``/``tanh``/``seg`` follows
    the reference parameterisation

        rho_o = (r_o^2 + 1e-4) * mean(|x|_e),   r_o initialised to 1,

    where ``mean(|x|_e)`` is the mean patch norm of the batch in training mode (gradients flow through
    it, as in the reference) and, in evaluation mode, its running average kept in the buffer
    ``running_x_norm`` with momentum ``momentum`` (bias-corrected by ``1 - (1 - momentum)^t`` after t
    updates; 1.0 before the first training batch; an empty training batch uses and keeps it). With
    ``learnable=False`` alpha, beta and rho are the fixed numbers given. ``operator="learnable_sigmoid"``
    learns one sigmoid k per output channel (k = |raw| + 0.05, raw initialised to 0.7, as for
    SphereConv). ``reset_parameters()`` re-initialises the weight and bias as ``nn.Conv2d`` does, puts
    every learnt extra back to its initial value and clears the running average
    (``reset_running_stats()`` clears only the latter).
    """

    radius: nn.Parameter | None
    running_x_norm: Tensor | None
    num_batches_tracked: Tensor | None
    sigmoid_k_raw: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: PaddingMode = "zeros",
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        magnitude: str = "sphere",
        operator: str = "cosine",
        weighted: bool = False,
        learnable: bool = False,
        alpha: float = 1.0,
        beta: float | None = None,
        rho: float = 1.0,
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        eps: float = DEFAULT_EPS,
        momentum: float = DEFAULT_MOMENTUM,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.magnitude = canonical_magnitude(magnitude)
        self.operator = canonical_operator(operator, ANGULAR_OPERATORS)
        self.weighted = check_bool("weighted", weighted)
        self.learnable = check_bool("learnable", learnable)
        self.eps = check_positive("eps", eps)
        self.sigmoid_k = check_positive("sigmoid_k", sigmoid_k)
        self.rho = check_positive("rho", rho)
        self.momentum = check_float("momentum", momentum, low=0.0, high=1.0, low_open=True)
        alpha = check_float("alpha", alpha)
        beta = check_float("beta", DEFAULT_BETA.get(self.magnitude, 0.0) if beta is None else beta)
        # the initial values reset_parameters() restores
        self.alpha_init, self.beta_init = alpha, beta
        factory: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        if learnable:
            self.alpha: Tensor | float = nn.Parameter(torch.full((out_channels,), alpha, **factory))
            if self.magnitude in BETA_MAGNITUDES:
                self.beta: Tensor | float = nn.Parameter(torch.full((out_channels,), beta, **factory))
            else:
                self.beta = beta
        else:
            self.alpha = alpha
            self.beta = beta
        if learnable and self.magnitude in RADIUS_MAGNITUDES:
            self.radius = nn.Parameter(torch.full((out_channels,), RADIUS_INIT, **factory))
            self.register_buffer("running_x_norm", torch.zeros(out_channels, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=self.weight.device))
        else:
            self.register_parameter("radius", None)
            self.register_buffer("running_x_norm", None)
            self.register_buffer("num_batches_tracked", None)
        if self.operator == "learnable_sigmoid":
            self.sigmoid_k_raw = nn.Parameter(torch.full((out_channels,), LEARNABLE_K_INIT, **factory))
        else:
            self.register_parameter("sigmoid_k_raw", None)

    def reset_running_stats(self) -> None:
        """Forget the running mean of |x| (as ``nn.BatchNorm2d.reset_running_stats``); no-op without one."""
        running = getattr(self, "running_x_norm", None)
        if running is not None:
            assert self.num_batches_tracked is not None  # registered together with running_x_norm
            running.zero_()
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation of weight and bias, the extras' initial values, no running mean."""
        super().reset_parameters()
        if not hasattr(self, "alpha_init"):
            return  # called from nn.Conv2d.__init__, before the extras exist
        self.reset_running_stats()
        with torch.no_grad():
            if isinstance(self.alpha, Tensor):
                self.alpha.fill_(self.alpha_init)
            if isinstance(self.beta, Tensor):
                self.beta.fill_(self.beta_init)
            if self.radius is not None:
                self.radius.fill_(RADIUS_INIT)
            if self.sigmoid_k_raw is not None:
                self.sigmoid_k_raw.fill_(LEARNABLE_K_INIT)

    def effective_k(self) -> Tensor | float:
        """The sigmoid k actually used: the fixed float, or |raw| + 0.05 per output channel."""
        return learnable_k(self.sigmoid_k_raw) if self.sigmoid_k_raw is not None else self.sigmoid_k

    def x_norm_estimate(self) -> Tensor:
        """Bias-corrected running mean of the patch norms: ``running / (1 - (1 - momentum)^t)``.

        Computed in the compute dtype (float32, or float64 for a float64 layer): in bfloat16
        ``1 - momentum`` rounds to 1 and the correction to 0; in float16 it is off by about 2%.
        """
        if self.running_x_norm is None:
            raise RuntimeError(
                "this layer keeps no running mean of |x| (it needs learnable=True and a "
                f"magnitude with a radius, one of {RADIUS_MAGNITUDES})"
            )
        running, tracked = self.running_x_norm, self.num_batches_tracked
        assert tracked is not None  # registered together with running_x_norm
        cdtype = SF.compute_dtype(running.dtype)
        correction = 1.0 - (1.0 - self.momentum) ** tracked.to(cdtype)
        estimate = running.to(cdtype) / correction.clamp_min(torch.finfo(cdtype).tiny)
        return torch.where(tracked > 0, estimate, torch.ones_like(estimate))

    def _radius(self, x_norm: Tensor) -> Tensor | float:
        """rho: the fixed number, or (r^2 + 1e-4) * mean|x| per output channel when learnable."""
        if self.radius is None:
            return self.rho
        if self.training and x_norm.numel() > 0:
            mean = x_norm.mean(dim=[d for d in range(x_norm.dim()) if d != 1])
            running, tracked = self.running_x_norm, self.num_batches_tracked
            assert running is not None and tracked is not None  # registered together with the radius
            with torch.no_grad():
                tracked.add_(1)
                running.lerp_(mean.detach().to(running.dtype), self.momentum)
        else:  # evaluation, or an empty batch, whose mean (NaN) would poison the average and the gradients
            mean = self.x_norm_estimate().to(x_norm.dtype)
        return (self.radius.to(x_norm.dtype).square() + RADIUS_FLOOR) * mean

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        padding: str | tuple[int, ...] | int = self.padding
        if self.padding_mode != "zeros":
            SF._check_conv_args(input, weight, self.groups, 2)  # before F.pad, whose errors say less
            # Pad once: the inner product and the patch norm must see the same padded tensor.
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _decoupled_forward(
            input,
            weight,
            bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            magnitude=self.magnitude,
            operator=self.operator,
            weighted=self.weighted,
            alpha=self.alpha,
            beta=self.beta,
            rho=self._radius,
            sigmoid_k=self.effective_k(),
            eps=self.eps,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A plain nn.Conv2d state dict has none of the decoupled extras: they keep their initial values.
        for name in ("alpha", "beta", "radius", "sigmoid_k_raw", "running_x_norm", "num_batches_tracked"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", magnitude={self.magnitude}, operator={self.operator}"
        if self.weighted:
            s += ", weighted=True"
        if self.learnable:
            s += ", learnable=True"
        # the coefficients the magnitude uses, where they differ from the defaults (a layer pickled
        # whole before the initial values were kept shows its fixed ones)
        alpha = getattr(self, "alpha_init", self.alpha)
        beta = getattr(self, "beta_init", self.beta)
        if isinstance(alpha, float) and alpha != 1.0:
            s += f", alpha={alpha}"
        if self.magnitude in BETA_MAGNITUDES and isinstance(beta, float) and beta != DEFAULT_BETA[self.magnitude]:
            s += f", beta={beta}"
        if self.magnitude in RADIUS_MAGNITUDES:
            if self.radius is None and self.rho != 1.0:
                s += f", rho={self.rho}"
            if self.radius is not None and self.momentum != DEFAULT_MOMENTUM:
                s += f", momentum={self.momentum}"
        if self.operator == "sigmoid":
            s += f", sigmoid_k={self.sigmoid_k}"
        return s + (f", eps={self.eps}" if self.eps != DEFAULT_EPS else "")


__all__ = [
    "MAGNITUDES",
    "canonical_magnitude",
    "magnitude_function",
    "decoupled_from_cosine",
    "decoupled_conv2d",
    "DecoupledConv2d",
]
