"""SphereNorm (Liu et al. 2017, "Hyperspherical learning as a normalization method").

The paper observes that SphereConv normalises every filter and every input patch onto the unit
hypersphere, so it is a normalisation that, unlike BatchNorm, uses no batch statistics: a sample's
output is the same at any batch size, in training and at test time. Equipped with learnable
rescaling factors it can reduce to the original convolution, and it can be used with or without
BatchNorm. This module implements that reading with per-output-channel parameters
``gamma``, ``beta`` and a magnitude mix ``s`` in (0, 1):

    out = gamma * (s * |w|_e |x|_e + (1 - s)) * g(theta) + beta (+ bias)

with ``cos(theta) = <w, x> / (|w|_e |x|_e)`` and ``|v|_e = sqrt(sum v^2 + eps m_v^2)`` as in SphereConv
(``m_v`` the largest |v|; see :mod:`sphereconv.nn.functional`).
For s -> 0 the output is the pure hyperspherical ``gamma * g(theta) + beta`` (bounded by |gamma| +
|beta|, scale invariant); for s = 1, cosine g, gamma = 1 and beta = 0 it is exactly the plain
convolution ``<w, x>``, since ``|w|_e |x|_e cos(theta) = <w, x>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.common_types import _size_any_t

from .._validation import check_bool, check_float
from . import functional as SF
from .angular import DEFAULT_EPS, DEFAULT_SIGMOID_K, angular_function
from .conv import Device, PaddingMode, SphereConv1d, SphereConv2d, SphereConv3d, _SphereConvNd

# Initial magnitude mix s (not given in the paper; a choice of this library): small, so that a new
# layer starts close to the pure hyperspherical normalisation gamma * g + beta, while the sigmoid
# that keeps s in (0, 1) still passes a useful gradient (ds/dlogit = s (1 - s)).
DEFAULT_MAGNITUDE_INIT = 0.02


class _SphereNormMixin(_SphereConvNd):
    """SphereNorm parameters and forward pass shared by the 1-d, 2-d and 3-d layers.

    Mixed in before a ``SphereConvNd`` class, whose attributes it reads.
    """

    gamma: nn.Parameter
    beta: nn.Parameter
    magnitude_logit: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_any_t,
        stride: _size_any_t = 1,
        padding: _size_any_t | str = 0,
        dilation: _size_any_t = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: PaddingMode = "zeros",
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        eps: float = DEFAULT_EPS,
        learn_magnitude: bool = True,
        magnitude_init: float = DEFAULT_MAGNITUDE_INIT,
    ) -> None:
        # The SphereConv{1,2,3}d that follows this mixin in the method resolution order (typed as
        # a plain callable: statically, super() is the _ConvNd below it).
        sphere_conv_init: Callable[..., None] = super().__init__
        sphere_conv_init(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
            operator=operator,
            sigmoid_k=sigmoid_k,
            eps=eps,
        )
        check_bool("learn_magnitude", learn_magnitude)
        magnitude_init = check_float("magnitude_init", magnitude_init, low=0.0, high=1.0, low_open=True, high_open=True)
        self.magnitude_init = magnitude_init
        factory: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.gamma = nn.Parameter(torch.ones(out_channels, **factory))
        self.beta = nn.Parameter(torch.zeros(out_channels, **factory))
        if learn_magnitude:
            logit = math.log(magnitude_init / (1.0 - magnitude_init))
            self.magnitude_logit = nn.Parameter(torch.full((out_channels,), logit, **factory))
        else:
            self.register_parameter("magnitude_logit", None)

    def reset_parameters(self) -> None:
        """SphereConv's initialisation, then gamma = 1, beta = 0 and the mix s = ``magnitude_init``."""
        super().reset_parameters()
        if getattr(self, "gamma", None) is None:
            return  # called from the torch layer's __init__, before the rescaling factors exist
        s = getattr(self, "magnitude_init", DEFAULT_MAGNITUDE_INIT)  # absent in layers pickled by older versions
        with torch.no_grad():
            self.gamma.fill_(1.0)
            self.beta.zero_()
            if self.magnitude_logit is not None:
                self.magnitude_logit.fill_(math.log(s / (1.0 - s)))

    def magnitude_mix(self) -> Tensor | None:
        """The per-channel mix s = sigmoid(magnitude_logit), or None when the magnitude is not learnt."""
        return None if self.magnitude_logit is None else torch.sigmoid(self.magnitude_logit)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dims = weight.dim() - 2
        SF._check_conv_args(input, weight, self.groups, dims)
        padding: str | tuple[int, ...] | int = self.padding
        if self.padding_mode != "zeros":
            # Pad once: the inner product and the patch norm must see the same padded tensor.
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        unbatched = input.dim() == dims + 1
        if unbatched:
            input = input.unsqueeze(0)
        out_dtype = (
            None if torch.is_autocast_enabled(input.device.type) else torch.promote_types(input.dtype, weight.dtype)
        )
        cos_theta, x_norm, w_norm = SF.sphere_cosine(
            input, weight, self.stride, padding, self.dilation, self.groups, self.eps
        )
        channel_shape = (-1, *([1] * dims))
        k = self.effective_k()
        g = angular_function(cos_theta, self.operator, k.reshape(channel_shape) if isinstance(k, Tensor) else k)
        scale = self.gamma.to(g.dtype).reshape(channel_shape)
        mix = self.magnitude_mix()
        if mix is not None:
            mix = mix.to(g.dtype).reshape(channel_shape)
            scale = scale * (mix * (w_norm.reshape(channel_shape) * x_norm) + (1.0 - mix))
        out = scale * g + self.beta.to(g.dtype).reshape(channel_shape)
        if bias is not None:
            out = out + bias.to(out.dtype).reshape(channel_shape)
        if out_dtype is not None and out.dtype != out_dtype:
            out = out.to(out_dtype)
        return out.squeeze(0) if unbatched else out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A plain convolution's state dict has no rescaling factors: they keep their initial values.
        for name in ("gamma", "beta", "magnitude_logit"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", learn_magnitude={self.magnitude_logit is not None}"
        magnitude_init = getattr(self, "magnitude_init", DEFAULT_MAGNITUDE_INIT)  # absent in older pickles
        if self.magnitude_logit is not None and magnitude_init != DEFAULT_MAGNITUDE_INIT:
            s += f", magnitude_init={magnitude_init}"
        return s


_NORM_DOC = """{dims}-d SphereNorm (Liu et al. 2017, SphereConv Sec. 2.1 used as a normalisation).

    A subclass of ``SphereConv{dims}d``.

    ``out = gamma * (s * |w|_e |x|_e + (1 - s)) * g(theta) + beta (+ bias)`` per output channel, with
    ``s = sigmoid(magnitude_logit)`` (initialised to ``magnitude_init``), ``gamma = 1`` and
    ``beta = 0`` at initialisation, theta the angle between filter and input patch and g the
    ``operator`` (as in SphereConv). ``learn_magnitude=False`` drops the magnitude term:
    ``out = gamma * g(theta) + beta``. No batch statistics are used, so a sample's output does not
    depend on its batch or on train/eval mode. With s = 1, cosine g, gamma = 1 and beta = 0 the layer
    is the plain convolution ``<w, x>``; a plain ``nn.Conv{dims}d`` state dict loads into it (gamma,
    beta and the mix keep their initial values).
    """


class SphereNorm1d(_SphereNormMixin, SphereConv1d):
    __doc__ = _NORM_DOC.format(dims=1)


class SphereNorm2d(_SphereNormMixin, SphereConv2d):
    __doc__ = _NORM_DOC.format(dims=2)


class SphereNorm3d(_SphereNormMixin, SphereConv3d):
    __doc__ = _NORM_DOC.format(dims=3)


SPHERE_NORM_TYPES = (SphereNorm1d, SphereNorm2d, SphereNorm3d)
"""The SphereNorm layer classes (each also an instance of the matching SphereConv class)."""

__all__ = ["SphereNorm1d", "SphereNorm2d", "SphereNorm3d", "SPHERE_NORM_TYPES", "DEFAULT_MAGNITUDE_INIT"]
