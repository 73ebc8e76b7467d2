"""SphereConv layers (Liu et al. 2017, Sec. 2.1) as drop-in subclasses of ``torch.nn`` layers.

``SphereConv1d/2d/3d`` subclass ``nn.Conv1d/2d/3d`` and ``SphereLinear`` subclasses ``nn.Linear``;
they keep the parent's parameters, initialisation and state-dict keys (a plain convolution's state
dict loads into them) and override only the forward computation. The learnable-sigmoid operator
adds one parameter, ``sigmoid_k_raw`` (one per output channel, effective k = |raw| + 0.05, as in
the reference code); it is optional when loading a state dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn.common_types import _size_1_t, _size_2_t, _size_3_t

from . import functional as SF
from .angular import (
    DEFAULT_EPS,
    DEFAULT_SIGMOID_K,
    LEARNABLE_K_INIT,
    SPHERE_OPERATORS,
    canonical_operator,
    check_positive,
    learnable_k,
)

# Where a layer's parameters live, as ``torch.nn`` layers accept it.
Device = torch.device | str | int | None
# How a convolution pads its input, as ``torch.nn`` layers accept it.
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]

if TYPE_CHECKING:  # the mixins are mixed into torch layers, whose attributes they use
    from torch.nn.modules.conv import _ConvNd

    _LayerMixinBase = nn.Module
    _ConvMixinBase = _ConvNd
else:
    _LayerMixinBase = _ConvMixinBase = object


class _SphereMixin(_LayerMixinBase):
    """Operator bookkeeping shared by every SphereConv layer."""

    operator: str
    sigmoid_k: float
    eps: float
    weight: Tensor
    sigmoid_k_raw: nn.Parameter | None

    def _init_sphere(self, operator: str, sigmoid_k: float, eps: float, out_channels: int) -> None:
        self.operator = canonical_operator(operator, SPHERE_OPERATORS)
        self.eps = check_positive("eps", eps)
        self.sigmoid_k = check_positive("sigmoid_k", sigmoid_k)
        if self.operator == "learnable_sigmoid":
            weight = self.weight
            self.sigmoid_k_raw = nn.Parameter(
                torch.full((out_channels,), LEARNABLE_K_INIT, dtype=weight.dtype, device=weight.device)
            )
        else:
            self.register_parameter("sigmoid_k_raw", None)

    def _reset_sphere(self) -> None:
        """A learnable k back to its initial value (after the torch layer's reset of weight and bias)."""
        raw = getattr(self, "sigmoid_k_raw", None)  # absent while the torch layer's __init__ runs
        if raw is not None:
            with torch.no_grad():
                raw.fill_(LEARNABLE_K_INIT)

    def effective_k(self) -> Tensor | float:
        """The sigmoid k actually used: the fixed float, or |raw| + 0.05 per output channel."""
        if self.sigmoid_k_raw is not None:
            return learnable_k(self.sigmoid_k_raw)
        return self.sigmoid_k

    def _sphere_extra_repr(self) -> str:
        s = f", operator={self.operator}"
        if self.operator == "sigmoid":
            s += f", sigmoid_k={self.sigmoid_k}"
        return s + (f", eps={self.eps}" if self.eps != DEFAULT_EPS else "")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A plain convolution's state dict has no learnable k: keep the initial value.
        key = prefix + "sigmoid_k_raw"
        if key in missing_keys:
            missing_keys.remove(key)


class _SphereConvNd(_SphereMixin, _ConvMixinBase):
    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        padding: str | tuple[int, ...] | int = self.padding
        if self.padding_mode != "zeros":
            # Check the input first: F.pad's error for a wrong-rank input does not say what is allowed.
            SF._check_conv_args(input, weight, self.groups, weight.dim() - 2)
            # Pad once and use the same padded tensor for the inner product and the patch norm.
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return SF.sphere_convnd(
            input,
            weight,
            bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            operator=self.operator,
            sigmoid_k=self.effective_k(),
            eps=self.eps,
        )

    def reset_parameters(self) -> None:
        """``nn.ConvNd``'s initialisation of weight and bias; a learnable k goes back to its initial value."""
        super().reset_parameters()
        self._reset_sphere()

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_extra_repr()


class SphereConv1d(_SphereConvNd, nn.Conv1d):
    """1-d SphereConv: ``g(theta) (+ bias)``, theta the angle between filter and input window."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_1_t,
        stride: _size_1_t = 1,
        padding: _size_1_t | str = 0,
        dilation: _size_1_t = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: PaddingMode = "zeros",
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        eps: float = DEFAULT_EPS,
    ) -> None:
        nn.Conv1d.__init__(
            self,
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
        )
        self._init_sphere(operator, sigmoid_k, eps, out_channels)


class SphereConv2d(_SphereConvNd, nn.Conv2d):
    """2-d SphereConv (Liu et al. 2017, Sec. 2.1), a drop-in subclass of ``nn.Conv2d``.

    ``out = g(theta) (+ bias)``, ``cos(theta) = <w, x> / (|w|_e |x|_e)`` for each
    filter w and input patch x. Operators: ``linear`` (1 - 2 theta/pi), ``cosine`` (cos theta),
    ``sigmoid`` (tanh((pi/2 - theta)/2k) / tanh(pi/4k)) and ``learnable_sigmoid`` (k per output
    channel, learnt). ``|v|_e = sqrt(sum v^2 + eps m_v^2)`` with ``m_v`` the largest |v| (see
    :mod:`sphereconv.nn.functional`), so the output is exactly invariant to positive rescaling of w and x.
    """

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
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        eps: float = DEFAULT_EPS,
    ) -> None:
        nn.Conv2d.__init__(
            self,
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
        )
        self._init_sphere(operator, sigmoid_k, eps, out_channels)


class SphereConv3d(_SphereConvNd, nn.Conv3d):
    """3-d SphereConv: ``g(theta) (+ bias)``, theta the angle between filter and input volume patch."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_3_t,
        stride: _size_3_t = 1,
        padding: _size_3_t | str = 0,
        dilation: _size_3_t = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: PaddingMode = "zeros",
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        eps: float = DEFAULT_EPS,
    ) -> None:
        nn.Conv3d.__init__(
            self,
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
        )
        self._init_sphere(operator, sigmoid_k, eps, out_channels)


class SphereLinear(_SphereMixin, nn.Linear):
    """Hyperspherical fully connected layer: ``out_j = g(theta_j) (+ bias_j)`` with theta_j the angle
    between the input vector and weight row j (Liu et al. 2017, Sec. 2.1). Subclass of ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        eps: float = DEFAULT_EPS,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_sphere(operator, sigmoid_k, eps, out_features)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of weight and bias; a learnable k goes back to its initial value."""
        super().reset_parameters()
        self._reset_sphere()

    def forward(self, input: Tensor) -> Tensor:
        k = self.effective_k()
        return SF.sphere_linear(input, self.weight, self.bias, operator=self.operator, sigmoid_k=k, eps=self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_extra_repr()


SPHERE_CONV_TYPES = (SphereConv1d, SphereConv2d, SphereConv3d)
