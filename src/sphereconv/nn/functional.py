"""Functional hyperspherical convolutions (``sphereconv.nn.functional``).

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Section 2.1: for a filter ``w`` and the
input patch ``x`` it sees,

    cos(theta) = <w, x> / (|w|_e |x|_e),   SphereConv(w, x) = g(theta) (+ bias),
    |x|_e = sqrt(sum_patch x^2 + eps m_x^2),   |w|_e = sqrt(sum w^2 + eps m_w^2).

The paper's ``|v|_e = sqrt(sum v^2 + eps)`` (eps = 1e-4, reference code) keeps a zero patch finite
but makes the output depend on the scale of x and w: at small scales eps dominates, and in floating
point ``sum x^2`` overflows (float32 from |x| ~ 1e19) or underflows. Here eps is relative: ``m_x``
is the largest |x| of the sample over the input channels of the filter's group (all positions, after
padding), ``m_w`` the largest |w| of the filter, each replaced by 1 when it is 0 (an all-zero
sample or filter: then eps is the paper's absolute eps and a zero patch gives cos = 0 with finite
gradients). For inputs with values near 1, as behind BatchNorm, this is the paper's formula; in
general the output satisfies ``out(c x, d w) = out(x, w)`` exactly for all c, d > 0, forward and
backward (the gradient w.r.t. x scales as 1/c). The maxima are differentiated like ``torch.amax``
(the gradient of ``m`` goes to the largest element, shared among ties).

Evaluation is scale-free in every dtype: each sample-group and each filter is first multiplied by the
power of two ``s = 2^-floor(log2 m)`` (exact in floating point), so that its largest value lies in
[1, 2); sums of squares and inner products then neither overflow nor underflow, and
``eps m^2`` becomes ``eps (m s)^2``. The norms :func:`sphere_cosine` returns are ``|x'|_e / s``. (The
fused path on CPU uses inputs and filters whose largest values lie in [2^-40, 2^40] as they are:
the rescaled evaluation would give the same bits there.)

The patch norms are computed cheaply: ``sum x^2`` is summed over the input channels of each group
first, and the resulting one-channel-per-group map is box-filtered with the layer's own stride,
padding and dilation (a convolution with an all-ones kernel). Norms, the cosine and g are always
computed in float32 (or float64 for float64 inputs), also under ``torch.autocast`` and TF32, where
the inner product itself may be computed in lower precision.

Two implementations compute the same function:

- ``"fused"`` (the default): one autograd node per layer (:mod:`sphereconv.nn._fused`) that keeps
  the backend's convolution, computes the patch norm from a channel sum and a one-channel box
  filter, and runs normalisation, clamp and g (and their backward) as one epilogue that saves the
  cosine and the inverse patch norm (the sigmoids one more output-sized tensor); Triton kernels on
  CUDA when Triton is installed. ``torch.compile`` and ``torch.export`` trace through it.
- ``"reference"``: the obvious composition of ATen ops below, differentiated by autograd. It
  supports double backward (the fused path is once-differentiable) and is what the fused path is
  tested against.

Choose per call with ``impl="auto" | "fused" | "reference"`` or, for every ``"auto"`` call inside a
block, with the context manager :func:`use_reference_impl`. ``"auto"`` means fused unless a
:func:`use_reference_impl` block is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _fused
from ._fused import power_of_two_scale
from .angular import (
    DEFAULT_EPS,
    DEFAULT_SIGMOID_K,
    SPHERE_OPERATORS,
    angular_function,
    canonical_operator,
    check_positive,
)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _empty_fan_in(plain_op, input: Tensor, weight: Tensor, bias: Tensor | None, out_dtype, *geometry) -> Tensor:
    """The output of a layer with no inputs per output (``in_features`` or ``in_channels`` 0, which
    torch's layers accept): an empty vector has no direction, so every cosine is 0, as for an
    all-zero input, and g(0) = 0 for every operator; the output is the bias (zeros without one),
    which the plain op computes with the right shape, dtype and autograd graph."""
    dtype = out_dtype or input.dtype
    return plain_op(input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), *geometry)


# Implementation switch (see module docstring).
IMPLEMENTATIONS = ("auto", "fused", "reference")
_reference_by_default = False


@contextlib.contextmanager
def use_reference_impl(enabled: bool = True) -> Iterator[None]:
    """Inside the block, calls with ``impl="auto"`` take the reference path (``enabled=False``: fused).

    The switch is process-wide (not per thread); blocks nest and restore the previous setting.
    """
    global _reference_by_default
    previous = _reference_by_default
    _reference_by_default = bool(enabled)
    try:
        yield
    finally:
        _reference_by_default = previous


def _traced_tensor(value) -> bool:
    """True for a tensor seen while torch.compile/export traces: its values cannot be checked
    without a graph break (a learnable k = |raw| + 0.05 is positive by construction)."""
    return isinstance(value, Tensor) and torch.compiler.is_compiling()


def _use_fused(impl: str) -> bool:
    if impl == "auto":
        return not _reference_by_default
    if impl in ("fused", "reference"):
        return impl == "fused"
    raise ValueError(f"impl must be one of {', '.join(IMPLEMENTATIONS)}; got {impl!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the norms, cosine and g are computed in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensors(input: Tensor, weight: Tensor) -> None:
    """Both floating-point tensors: torch's errors for integer or complex ones name a cast deep inside."""
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"input and weight must be tensors; got {type(input).__name__} and {type(weight).__name__}")
    if not input.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"input and weight must be floating-point tensors; got {input.dtype} and {weight.dtype}")


def _check_conv_args(input: Tensor, weight: Tensor, groups: int, dims: int) -> None:
    _check_tensors(input, weight)
    if weight.dim() != dims + 2:
        raise ValueError(
            f"weight must have {dims + 2} dimensions (out, in/groups, kernel...) for a {dims}-d SphereConv; "
            f"got shape {tuple(weight.shape)}"
        )
    # Two comparisons, not ``in (dims + 1, dims + 2)``: under torch.compile(dynamic=True) ``dims`` can be a
    # symbolic int, and Dynamo evaluates ``int in (symbol, ...)`` as False.
    if input.dim() != dims + 1 and input.dim() != dims + 2:
        raise ValueError(
            f"input must have {dims + 2} dimensions (N, C, {'spatial...' if dims > 1 else 'L'}) or {dims + 1} "
            f"without batch for a {dims}-d SphereConv; got shape {tuple(input.shape)}"
        )
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    channels = input.shape[-dims - 1]
    if channels != weight.shape[1] * groups:
        raise ValueError(
            f"input has {channels} channels but weight expects in_channels = {weight.shape[1]} x groups {groups} "
            f"= {weight.shape[1] * groups}"
        )
    if weight.shape[0] % groups:
        raise ValueError(f"out_channels {weight.shape[0]} must be divisible by groups {groups}")


def _check_bias(bias: Tensor | None, weight: Tensor, input: Tensor) -> None:
    """``bias`` must be None or a 1-d tensor of ``weight.shape[0]`` values on the input's device, as
    for ``torch.nn.functional.conv2d`` / ``linear``: the fused kernels read one value per output
    channel and would otherwise broadcast, ignore or read past a wrong-sized bias."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None; got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"bias must be 1-d with one value per output channel ({weight.shape[0]}); got shape {tuple(bias.shape)}"
        )
    if bias.device != input.device:
        raise ValueError(f"bias is on {bias.device} but the input is on {input.device}")


def patch_sq_norm(
    input: Tensor,
    kernel_size: Sequence[int],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
    """``sum x^2`` over every input patch a convolution sees, one channel per group.

    Returns shape ``(N, groups, *out_spatial)`` in the compute dtype (float32/float64). Equivalent
    to ``conv(x*x, ones)`` restricted to each group's channels, at the cost of one channel sum and a
    one-channel box filter.
    """
    dims = len(kernel_size)
    x = input.to(compute_dtype(input.dtype))
    n, c = x.shape[0], x.shape[1]
    sq = x.square().reshape(n, groups, c // groups, *x.shape[2:]).sum(dim=2)
    ones = torch.ones((groups, 1, *kernel_size), dtype=sq.dtype, device=sq.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _CONV[dims](sq, ones, None, stride, padding, dilation, groups)


def sphere_cosine(
    input: Tensor,
    weight: Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces every hyperspherical convolution shares.

    Returns ``(cos_theta, x_norm, w_norm)``: the cosine between each filter and each patch (not yet
    clamped), the patch norms ``|x|_e`` broadcastable to the output ``(N, C_out, *spatial)``, and the
    filter norms ``|w|_e`` of shape ``(C_out,)``, all in the compute dtype (the norms are
    ``inf`` where they exceed its range; the cosine never is). ``input`` must be batched.
    """
    dims = weight.dim() - 2
    out_channels = weight.shape[0]
    # the fused path's checks, and explicit ints: torch's errors name no value or come from amax
    input, stride, padding, dilation = _fused.check_geometry(input, weight.shape[2:], stride, padding, dilation)
    cdtype = compute_dtype(input.dtype)
    w_unit, w_norm_s, w_scale = _unit_rows(weight.to(cdtype).flatten(1), eps)
    # Normalise the filters before the convolution, as the reference code does: <w/|w|_e, x'> is
    # bounded by |x'|, and no 0 * inf reaches a gradient.
    w_unit = w_unit.reshape(weight.shape).to(weight.dtype)
    n, c_in = input.shape[0], input.shape[1]
    xg = input.to(cdtype).unflatten(1, (groups, c_in // groups))
    x_scale, x_peak = power_of_two_scale(xg.abs().amax(tuple(range(2, xg.dim()))))  # (N, G)
    group_shape = (n, groups) + (1,) * dims
    x_s = (xg * x_scale.reshape(n, groups, 1, *([1] * dims))).flatten(1, 2)  # exact
    inner = _CONV[dims](x_s.to(input.dtype), w_unit, None, stride, padding, dilation, groups).to(cdtype)
    x_sq = patch_sq_norm(x_s, weight.shape[2:], stride, padding, dilation, groups)
    x_norm = (x_sq.clamp_min(0.0) + eps * x_peak.square().reshape(group_shape)).sqrt()  # (N, G, *spatial)
    spatial = inner.shape[2:]
    per_group = out_channels // groups
    inner_g = inner.reshape(n, groups, per_group, *spatial)
    cos_theta = (inner_g / x_norm.unsqueeze(2)).reshape(inner.shape)
    x_norm = x_norm / x_scale.reshape(group_shape)  # |x|_e = |x'|_e / s
    x_norm_out = x_norm.unsqueeze(2).expand(n, groups, per_group, *spatial).reshape(inner.shape)
    return cos_theta, x_norm_out, w_norm_s / w_scale


def _unit_rows(w2: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(w' / |w'|_e, |w'|_e, s)`` for each row of ``w2`` with ``w' = s w`` (see the module docstring)."""
    scale, peak = power_of_two_scale(w2.abs().amax(1))
    w_s = w2 * scale.unsqueeze(1)
    norm = (w_s.square().sum(1) + eps * peak.square()).sqrt()
    return w_s / norm.unsqueeze(1), norm, scale


def _channel_k(sigmoid_k, dims: int, out_channels: int):
    """Reshape a per-channel k tensor to broadcast over ``(N, C_out, *spatial)``."""
    if isinstance(sigmoid_k, Tensor) and sigmoid_k.numel() > 1:
        if sigmoid_k.numel() != out_channels:
            raise ValueError(f"sigmoid_k has {sigmoid_k.numel()} values; expected 1 or out_channels = {out_channels}")
        return sigmoid_k.reshape(out_channels, *([1] * dims))
    return sigmoid_k


def sphere_convnd(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    operator: str = "cosine",
    sigmoid_k: float | Tensor = DEFAULT_SIGMOID_K,
    eps: float = DEFAULT_EPS,
    impl: str = "auto",
) -> Tensor:
    """SphereConv of any spatial rank (inferred from ``weight``); see :func:`sphere_conv2d`.

    ``impl`` picks the implementation: ``"auto"`` (fused unless inside :func:`use_reference_impl`),
    ``"fused"`` or ``"reference"``.
    """
    _check_tensors(input, weight)
    dims = weight.dim() - 2
    if dims not in _CONV:
        raise ValueError(f"weight must have 3, 4 or 5 dimensions; got shape {tuple(weight.shape)}")
    operator = canonical_operator(operator, SPHERE_OPERATORS)
    check_positive("eps", eps)
    if operator in ("sigmoid", "learnable_sigmoid") and not _traced_tensor(sigmoid_k):
        check_positive("sigmoid_k", sigmoid_k)
    _check_conv_args(input, weight, groups, dims)
    _check_bias(bias, weight, input)
    unbatched = input.dim() == dims + 1
    if unbatched:
        input = input.unsqueeze(0)
    out_dtype = (
        torch.promote_types(input.dtype, weight.dtype) if not torch.is_autocast_enabled(input.device.type) else None
    )
    if weight.shape[1] == 0:
        out = _empty_fan_in(_CONV[dims], input, weight, bias, out_dtype, stride, padding, dilation, groups)
        return out.squeeze(0) if unbatched else out
    if _use_fused(impl):
        out = _fused.fused_sphere_convnd(
            input, weight, bias, stride, padding, dilation, groups, operator, sigmoid_k, eps, out_dtype
        )
        return out.squeeze(0) if unbatched else out
    cos_theta, _, _ = sphere_cosine(input, weight, stride, padding, dilation, groups, eps)
    out = angular_function(cos_theta, operator, _channel_k(sigmoid_k, dims, weight.shape[0]))
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(-1, *([1] * dims))
    if out_dtype is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.squeeze(0) if unbatched else out


def sphere_conv1d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    operator="cosine",
    sigmoid_k=DEFAULT_SIGMOID_K,
    eps=DEFAULT_EPS,
    impl="auto",
) -> Tensor:
    """1-d SphereConv: ``g(theta) (+ bias)`` for every filter and input window (paper Sec. 2.1)."""
    return sphere_convnd(
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        operator=operator,
        sigmoid_k=sigmoid_k,
        eps=eps,
        impl=impl,
    )


def sphere_conv2d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    operator="cosine",
    sigmoid_k=DEFAULT_SIGMOID_K,
    eps=DEFAULT_EPS,
    impl="auto",
) -> Tensor:
    """2-d SphereConv (Liu et al. 2017, Sec. 2.1).

    ``out[n, o, i, j] = g(theta) (+ bias[o])`` with ``cos(theta) = <w_o, x_patch> / (|w_o|_e |x_patch|_e)``,
    ``|v|_e = sqrt(sum v^2 + eps m_v^2)`` (``m_v`` the largest |v|; see the module docstring). Arguments
    mirror :func:`torch.nn.functional.conv2d`;
    ``operator`` is one of ``linear``, ``cosine``, ``sigmoid``, ``learnable_sigmoid`` (``lr_sigmoid``);
    ``sigmoid_k`` is a float or a per-output-channel tensor of k values; ``impl`` is ``"auto"``,
    ``"fused"`` or ``"reference"`` (see the module docstring).
    """
    return sphere_convnd(
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        operator=operator,
        sigmoid_k=sigmoid_k,
        eps=eps,
        impl=impl,
    )


def sphere_conv3d(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    operator="cosine",
    sigmoid_k=DEFAULT_SIGMOID_K,
    eps=DEFAULT_EPS,
    impl="auto",
) -> Tensor:
    """3-d SphereConv: ``g(theta) (+ bias)`` for every filter and input volume patch (paper Sec. 2.1)."""
    return sphere_convnd(
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        operator=operator,
        sigmoid_k=sigmoid_k,
        eps=eps,
        impl=impl,
    )


def sphere_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    operator: str = "cosine",
    sigmoid_k=DEFAULT_SIGMOID_K,
    eps: float = DEFAULT_EPS,
    impl: str = "auto",
) -> Tensor:
    """Hyperspherical fully connected layer: ``g(theta_j) (+ bias_j)`` with theta_j the angle
    between the input vector and row j of ``weight`` (paper Sec. 2.1, SphereConv on whole vectors).
    ``impl``: ``"auto"``, ``"fused"`` or ``"reference"`` (see the module docstring).
    """
    operator = canonical_operator(operator, SPHERE_OPERATORS)
    check_positive("eps", eps)
    if operator in ("sigmoid", "learnable_sigmoid") and not _traced_tensor(sigmoid_k):
        check_positive("sigmoid_k", sigmoid_k)
    _check_tensors(input, weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d (out_features, in_features); got shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input's last dimension must be in_features = {weight.shape[1]}; got shape {tuple(input.shape)}"
        )
    _check_bias(bias, weight, input)
    cdtype = compute_dtype(input.dtype)
    out_dtype = (
        torch.promote_types(input.dtype, weight.dtype) if not torch.is_autocast_enabled(input.device.type) else None
    )
    if weight.shape[1] == 0:
        return _empty_fan_in(F.linear, input, weight, bias, out_dtype)
    if _use_fused(impl):
        return _fused.fused_sphere_linear(input, weight, bias, operator, sigmoid_k, eps, out_dtype)
    w_unit, _, _ = _unit_rows(weight.to(cdtype), eps)
    # Filters normalised first and inputs rescaled (see sphere_cosine): nothing overflows.
    x = input.to(cdtype)
    x_scale, x_peak = power_of_two_scale(x.abs().amax(-1, keepdim=True))
    x_s = x * x_scale
    inner = F.linear(x_s.to(input.dtype), w_unit.to(weight.dtype)).to(cdtype)
    cos_theta = inner / (x_s.square().sum(-1, keepdim=True) + eps * x_peak.square()).sqrt()
    out = angular_function(cos_theta, operator, sigmoid_k)
    if bias is not None:
        out = out + bias.to(out.dtype)
    if out_dtype is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out


__all__ = [
    "sphere_conv1d",
    "sphere_conv2d",
    "sphere_conv3d",
    "sphere_convnd",
    "sphere_linear",
    "sphere_cosine",
    "patch_sq_norm",
    "power_of_two_scale",
    "compute_dtype",
    "use_reference_impl",
    "IMPLEMENTATIONS",
]
