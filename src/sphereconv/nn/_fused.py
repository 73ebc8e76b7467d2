"""Fused SphereConv and SphereLinear: one autograd node per layer, minimal saved state.

Implements the operator of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, arXiv:1711.03189),
Section 2.1, with the same numerics as the reference path in :mod:`sphereconv.nn.functional`:

    cos(theta) = <w, x> / (|w|_e |x|_e),   out = g(clamp(cos)) + b,
    |x|_e = sqrt(sum_patch x^2 + eps m_x^2),   |w|_e = sqrt(sum w^2 + eps m_w^2),

with ``m_x`` the largest |x| of the sample over the input channels of the filter's group (all
positions) and ``m_w`` the largest |w| of the filter (1 where all are zero): eps acts relative to
the largest value, so the output is exactly invariant to positive rescaling of x or w (see
:mod:`sphereconv.nn.functional` for the rationale).

Scale-free evaluation: every sample-group (and every filter) is first multiplied by the exact power
of two ``s = 2^-floor(log2 m)`` (:func:`power_of_two_scale`), which brings its largest magnitude
into [1, 2) without any rounding; norms, inner products and their gradients are then computed on
values near 1 (no overflow or underflow, in any dtype), and ``eps m^2`` becomes ``eps (m s)^2``.
On CPU in eager mode an input whose largest values all lie in [2^-40, 2^40] (not for a float16
convolution) is used as it is: rescaling would not change a bit there, and skipping it saves two
elementwise passes (the check reads N x G values back from the device, which costs nothing on CPU).

Forward, per layer:

1. ``w_hat = w' / |w'|_e``, ``w' = s_w w`` (weight-sized, float32/float64);
2. ``x' = s_x x`` and ``inner = conv(x', w_hat)`` from the backend as is (oneDNN/cuDNN; the
   autocast dtype if enabled);
3. ``r = 1 / |x'|_e`` from the channel sum of ``x'^2`` and a one-channel box filter, in float32/
   float64 (average pooling times the window size, or sums of strided slices when dilated: never
   TF32, and a cheap backward), plus ``eps (m_x s_x)^2``;
4. one epilogue ``c = inner * r``, ``out = g(clamp(c, -1, 1)) + b``.

Folding ``1 / |w|_e`` into the weight removes the filter norm from every output-sized pass; its
gradient becomes a weight-sized projection, ``dL/dw' = (dL/dw_hat - w_hat <w_hat, dL/dw_hat>) / |w'|_e``,
plus ``-<w_hat, dL/dw_hat> eps m' sign / |w'|_e^2`` at the filter's largest element (the derivative
of ``m``), and ``dL/dw = s_w dL/dw'``.

Backward:

    dL/dc      = dL/dout * g'(c) * [|c| <= 1]               (clamp passes the gradient on [-1, 1])
    dL/dinner  = dL/dc * r
    dL/dsumsq  = -r^2 / 2 * sum_{output channels of the group} dL/dc * c
    dL/dm'     = 2 eps m' sum_{positions} dL/dsumsq      (m' = m_x s_x; at the largest element)
    dL/dx      = s_x (conv_input_grad(dL/dinner, w_hat) + 2 x' * box_filter^T(dL/dsumsq) + dL/dm' sign)
    dL/dw_hat  = conv_weight_grad(x', dL/dinner)

with g'(c) for the operators (theta = arccos c, rho(c) = 1/sqrt(max(1 - c^2, eps_dtype)), the same
bounded arccos derivative as :func:`sphereconv.nn.angular.acos_derivative_bound`, zero outside
[-1, 1] like the reference path's clamp):

    cosine:  1
    linear:  (2/pi) rho(c)
    sigmoid: s_k sech^2(u) / (2k) * rho(c),   u = (pi/2 - theta)/(2k) = asin(c)/(2k),  s_k = 1/tanh(pi/4k)

and for the learnable sigmoid ``dg/dk = -s_k sech^2(u) u / k + tanh(u) (s_k^2 - 1) a / k`` with
``a = pi/(4k)`` (the gradient flows through ``c_k = s_k`` too).

Saved for backward: the input (``x'`` is recomputed from it, one elementwise pass, rather than
kept: the input is usually held by the layer before anyway) and its scaled low-precision copy under
autocast (which the convolution's weight gradient reads, as a plain autocast convolution keeps it),
``w_hat`` and ``|w'|_e`` (weight-sized), the scales and largest elements (one value per
sample-group and per filter), ``r`` (one channel per group), k, and output-sized: the cosine ``c`` on the ATen
path, plus for the sigmoid operators ``sigmoid(2u)`` (``2u`` for a learnable k), because an arcsine
costs more on a CPU than the memory; the conv output alone on the Triton path, which recomputes
everything else. Nothing is recomputed by a second convolution.

Where it runs: eager CUDA with Triton installed uses the kernels of :mod:`sphereconv.nn._triton`;
eager CPU with contiguous float32/float64 tensors uses the C++ kernels of
:mod:`sphereconv.nn._cpu_kernels` (built at first use, 15-30 s, then cached; checked against the
ATen path once per process, about 20 ms), which also take the filter norm, the input's peaks and
sum of squares and their gradients, each in one pass instead of some 130 small ATen ops per layer,
and where all of them apply the whole layer runs as one C++ operator with its own autograd node
(:func:`_cpp_layer_selected`) rather than through :class:`_FusedSphereConvFn`;
everything else (no compiler, channels-last or low-precision CPU tensors, and any trace) runs the
epilogue as vectorised, mostly in-place ATen ops. The first time a process would run the Triton
kernels for an (operator, dtype, device), it
checks them against the ATen epilogue on a small synthetic case, forward and backward
(:func:`_self_check`); a mismatch beyond the dtype's tolerance, or any exception, gives one warning
naming the case and the ATen epilogue for that case for the rest of the process (an exception in a
later call does the same; a C++ build that fails or disagrees warns once and leaves CPU on ATen).
``SPHERECONV_KERNELS=auto|triton|cpp|aten`` or :func:`set_kernel_backend` force a path (``triton`` and
``cpp`` skip the check); :func:`kernel_status` reports the decisions. ``torch.compile`` traces through
the autograd function (forward and backward; inductor fuses
the epilogue itself) and ``torch.export`` / ONNX export trace its forward as ordinary ATen ops, so
no custom operator needs registering. The backward is once-differentiable: double backward needs
``impl="reference"``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _cpu_kernels
from ._cpu_kernels import as_dtype as _as_dtype

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# Linear operator (paper Sec. 2.1): g = 1 - 2 theta/pi = (2/pi) asin(c).
_LINEAR_SCALE = 2.0 / math.pi
_OPERATORS = ("cosine", "linear", "sigmoid", "learnable_sigmoid")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Cap of the arccos derivative 1/sqrt(max(1 - c^2, eps)): rsqrt(eps) of the compute dtype, with
# eps its machine epsilon as in angular._SafeAcos / angular.acos_derivative_bound, rounded as the
# reference path rounds it (computed once here: nothing is read back from a tensor while
# torch.compile traces the backward).
_ACOS_CAP = {
    dtype: float(torch.tensor(torch.finfo(dtype).eps, dtype=dtype).rsqrt()) for dtype in (torch.float32, torch.float64)
}


def _acos_derivative_cap(dtype: torch.dtype) -> float:
    """Cap of the arccos derivative ``1/sqrt(max(1 - c^2, eps))`` in ``dtype``: ``rsqrt(eps)``."""
    return _ACOS_CAP[dtype]


# --------------------------------------------------------------------------------------------
# Scale-free evaluation: exact power-of-two rescaling by the largest magnitude
# --------------------------------------------------------------------------------------------


def power_of_two_scale(peak: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, m_s)`` for the largest magnitudes ``m = peak`` (>= 0, any shape) of some slices.

    ``s = 2^-floor(log2 m)``, an exact power of two without autograd history, clamped so that it is
    a normal number of the dtype; multiplying a slice by it is exact and brings its largest
    magnitude to ``m_s = m s`` in [1, 2) (clamped ends: [2^-24, 8)), where squares neither overflow
    nor underflow. ``m_s`` keeps the autograd history of ``m``. Where ``m = 0`` (an all-zero slice)
    ``s = m_s = 1``: ``eps`` then stays the absolute eps of the paper and a zero patch gives cos = 0.
    """
    finfo = torch.finfo(peak.dtype)
    m = peak.detach()
    nonzero = m > 0
    one = torch.ones_like(m)
    safe = torch.where(nonzero, m, one).clamp(finfo.tiny, finfo.max / 4)
    scale = torch.exp2(torch.floor(torch.log2(safe)).neg_())
    return scale, torch.where(nonzero, peak * scale, one)


def abs_max(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(m, sign)``: the largest ``|t|`` over the dimensions from ``dim`` on, and the sign of the
    element(s) holding it (+1 or -1; +1 for an all-zero slice). Two fast reductions, no index search."""
    dims: int | tuple[int, ...] = tuple(range(dim, t.dim()))
    if t.dim() - dim > 1 and t.is_contiguous():  # one reduced dimension of a view: the faster kernel
        t, dims = t.flatten(dim), dim
    hi, lo = t.amax(dims), t.amin(dims).neg_()
    return torch.maximum(hi, lo), (hi >= lo).to(t.dtype).mul_(2.0).sub_(1.0)


# Largest magnitudes for which a tensor is used as it is (CPU, eager): with values in
# [2^-40, 2^40], squares and sums over any patch stay far from float32's overflow and underflow,
# and rescaling by a power of two would give the very same bits (every step scales exactly). Set
# _always_rescale to take the rescaled path everywhere (tests).
_DIRECT_RANGE = (2.0**-40, 2.0**40)
_always_rescale = False


def _scale_and_peak(m: Tensor, allow_direct: bool) -> tuple[Tensor | None, Tensor]:
    """``(s, m s)`` from :func:`power_of_two_scale`, or ``(None, m)`` (s = 1: use the tensor as it
    is) when ``allow_direct`` and every ``m`` lies in :data:`_DIRECT_RANGE` (one host read: CPU only)."""
    if allow_direct and not _always_rescale and not torch.compiler.is_compiling():
        if bool((m.clamp(*_DIRECT_RANGE) == m).all()):
            return None, m
    return power_of_two_scale(m)


def _add_at_peaks(grad: Tensor, values: Tensor, signed_peak: Tensor, d_peak: Tensor) -> None:
    """``grad += d_peak / count`` at every element of ``values`` equal to its slice's ``signed_peak``
    (the slices are the leading dimensions of ``signed_peak``; ties share, as for ``torch.amax``)."""
    shape = tuple(signed_peak.shape) + (1,) * (values.dim() - signed_peak.dim())
    hit = values == signed_peak.reshape(shape)
    count = hit.sum(tuple(range(signed_peak.dim(), values.dim()))).clamp_min_(1)
    grad.add_(torch.where(hit, (d_peak / count).reshape(shape).to(grad.dtype), 0.0))


def _add_at_sample_peaks(d_x: Tensor, x_s: Tensor, groups: int, sign: Tensor, d_peak: Tensor) -> None:
    """``d_x[n, c, p] += d_peak[n, g]`` at one largest-magnitude element (c, p) of each sample-group
    of ``x_s`` (N, C, *S) whose sign is ``sign[n, g]`` (ties: one of them).

    Found without a full-size index search: the largest value per position over the group's
    channels (two fast reductions), the best position in that one-channel map, then the channel.
    """
    n, c = x_s.shape[0], x_s.shape[1]
    per_group = c // groups
    xg = x_s.unflatten(1, (groups, per_group)).flatten(3)  # (N, G, Cg, S)
    if x_s.device.type == "cpu" and not torch.compiler.is_compiling() and bool((sign >= 0).all()):
        best = xg.amax(2)  # (N, G, S); the usual case behind a ReLU: no negative largest element
    else:
        best = torch.where((sign > 0).unsqueeze(2), xg.amax(2), xg.amin(2).neg_())
    position = best.argmax(2)  # (N, G)
    column = xg.gather(3, position.reshape(n, groups, 1, 1).expand(n, groups, per_group, 1)).squeeze(3)
    channel = column.mul_(sign.unsqueeze(2)).argmax(2) + torch.arange(0, c, per_group, device=d_x.device)
    batch = torch.arange(n, device=d_x.device).unsqueeze(1).expand(n, groups)
    flat = d_x.flatten(2)
    if not torch.compiler.is_compiling() and (flat is d_x or flat._is_view()):
        flat.index_put_((batch, channel, position), d_peak.to(d_x.dtype), accumulate=True)
    else:  # spatial dimensions that do not flatten into a view (or a trace, which cannot tell)
        d_x.index_put_(
            (batch, channel, *torch.unravel_index(position, d_x.shape[2:])), d_peak.to(d_x.dtype), accumulate=True
        )


# What the filter norm's backward needs, one value per filter: (|w'|_e, s_w or None, signed m_w').
_FilterState = tuple[Tensor, Tensor | None, Tensor]


def _filter_unit(weight: Tensor, cdtype: torch.dtype, eps: float) -> tuple[Tensor, _FilterState]:
    """``w_hat = w' / |w'|_e`` per filter (row of ``weight.flatten(1)``), overflow-free.

    Returns ``w_hat`` (shape of ``weight``, compute dtype) and the state its backward needs:
    ``(|w'|_e, s_w or None, signed m_w')``, one value per filter.
    """
    w2 = weight.detach().to(cdtype).flatten(1)
    m, sign = abs_max(w2, 1)
    scale, peak = _scale_and_peak(m, w2.device.type == "cpu")
    w_s = w2 if scale is None else w2 * scale.unsqueeze(1)
    norm = w_s.square().sum(1).add_(peak.square().mul_(eps)).sqrt_()
    signed_peak = (peak * sign).masked_fill_(m == 0, 0.0)  # an all-zero filter: no gradient through m
    return torch.div(w_s, norm.unsqueeze(1)).reshape(weight.shape), (norm, scale, signed_peak)


def _filter_unit_backward(d_hat: Tensor, w_hat: Tensor, state: _FilterState, eps: float) -> Tensor:
    """``dL/dw`` from ``dL/dw_hat`` (both weight-shaped, compute dtype; ``d_hat`` is overwritten)."""
    norm, scale, signed_peak = state
    d2, w2 = d_hat.flatten(1), w_hat.flatten(1)
    proj = (d2 * w2).sum(1)  # <dL/dw_hat, w_hat>
    grad = d2.sub_(w2 * proj.unsqueeze(1)).div_(norm.unsqueeze(1))
    # d|w'|_e / dm' = eps m' / |w'|_e at the largest element(s), found in w_hat = w' / |w'|_e: the
    # correctly rounded quotient of the largest element is the same number as (signed m') / |w'|_e
    _add_at_peaks(grad, w2, signed_peak / norm, (proj * signed_peak).div_(norm.square()).mul_(-eps))
    return (grad if scale is None else grad.mul_(scale.unsqueeze(1))).reshape(d_hat.shape)


def _sample_scale(
    input: Tensor, groups: int, cdtype: torch.dtype, conv_dtype: torch.dtype
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Per sample and group of an (N, C, *S) input: ``(s_x or None, m_x s_x, sign)``, each (N, G);
    ``None``: use ``x`` as it is (see :func:`_scale_and_peak`; never for a float16 convolution)."""
    m, sign = abs_max(input.detach().unflatten(1, (groups, input.shape[1] // groups)), 2)
    m = m.to(cdtype)
    scale, peak = _scale_and_peak(m, input.device.type == "cpu" and conv_dtype != torch.float16)
    return scale, peak, sign.to(cdtype).masked_fill_(m == 0, 0.0)  # all-zero: no gradient through m


def _scaled_input(input: Tensor, scale: Tensor, groups: int, cdtype: torch.dtype) -> Tensor:
    """``x' = s_x x`` in the compute dtype (exact), in a new tensor of the input's layout."""
    shape = (scale.shape[0], groups, 1) + (1,) * (input.dim() - 2)
    xg = input.unflatten(1, (groups, input.shape[1] // groups))
    return torch.mul(xg, scale.reshape(shape).to(cdtype)).flatten(1, 2)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if (
        isinstance(value, (tuple, list))
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(int(v) for v in value)
    raise TypeError(f"{name} must be an int or a tuple of {n} ints; got {value!r}")


def resolve_padding(input: Tensor, kernel: Sequence[int], stride, padding, dilation) -> tuple[Tensor, tuple[int, ...]]:
    """Turn ``padding`` (ints, tuple, ``'valid'`` or ``'same'``) into explicit symmetric ints.

    ``'same'`` with an odd total padding (an even effective kernel) pads ``input`` by one extra
    element at the end of that dimension, as ``torch.nn.functional.conv2d`` does. Returns the
    (possibly padded) input and the symmetric padding.
    """
    dims = len(kernel)
    stride_t = _tuple(stride, dims, "stride")
    dilation_t = _tuple(dilation, dims, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return input, (0,) * dims
        if padding != "same":
            raise ValueError(f"padding must be an int, a tuple of {dims} ints, 'valid' or 'same'; got {padding!r}")
        if any(s != 1 for s in stride_t):
            raise ValueError(f"padding='same' needs stride 1; got stride {stride!r}")
        total = [d * (k - 1) for d, k in zip(dilation_t, kernel)]
        left = tuple(t // 2 for t in total)
        extra = [t - 2 * lft for t, lft in zip(total, left)]
        if any(extra):
            pad: list[int] = []
            for e in reversed(extra):  # F.pad lists the last dimension first
                pad += [0, e]
            input = F.pad(input, pad)
        return input, left
    padding_t = _tuple(padding, dims, "padding")
    if any(p < 0 for p in padding_t):
        raise ValueError(f"padding must be non-negative; got {padding!r}")
    return input, padding_t


def check_geometry(
    input: Tensor, kernel: Sequence[int], stride, padding, dilation
) -> tuple[Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(input, stride, padding, dilation)`` checked, as ints, the input padded as :func:`resolve_padding`
    does; a ``ValueError``/``TypeError`` naming the value when a convolution cannot take them."""
    dims = len(kernel)
    stride_t = _tuple(stride, dims, "stride")
    dilation_t = _tuple(dilation, dims, "dilation")
    if any(s < 1 for s in stride_t) or any(d < 1 for d in dilation_t):
        raise ValueError(f"stride and dilation must be positive; got stride={stride!r}, dilation={dilation!r}")
    input, padding_t = resolve_padding(input, kernel, stride_t, padding, dilation_t)
    for axis, (length, k, s, p, d) in enumerate(zip(input.shape[2:], kernel, stride_t, padding_t, dilation_t)):
        if _out_len(length, k, s, p, d) < 1:
            raise ValueError(
                f"input spatial size {tuple(input.shape[2:])} (padded by {padding_t}) is smaller than the dilated "
                f"kernel {tuple(kernel)} (dilation {dilation_t}) along spatial dimension {axis}"
            )
    return input, stride_t, padding_t, dilation_t


def _out_len(length: int, k: int, s: int, p: int, d: int) -> int:
    return (length + 2 * p - d * (k - 1) - 1) // s + 1


def _window_slice(ndim: int, axis: int, start: int, count: int, step: int) -> tuple:
    index: list = [slice(None)] * ndim
    index[axis] = slice(start, start + (count - 1) * step + 1, step)
    return tuple(index)


def _pool_geometry(t: Tensor, kernel: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    """Whether average pooling (times the window size) can compute the box filter."""
    return (
        len(kernel) in (1, 2, 3)
        and all(d == 1 for d in dilation)
        and all(2 * p <= k for p, k in zip(padding, kernel))  # avg_pool's padding limit
        and t.dtype in (torch.float32, torch.float64)
    )


def _sum_pool(t: Tensor, kernel, stride, padding) -> Tensor:
    # Average pooling counting the padding, times the window size (not divisor_override=1, which
    # ONNX's AveragePool cannot express): equal to the window sum up to one rounding.
    window = math.prod(kernel)
    if len(kernel) == 1:  # 1-d as 2-d with a height of one
        out = F.avg_pool2d(t.unsqueeze(2), (1, kernel[0]), (1, stride[0]), (0, padding[0]), count_include_pad=True)
        return out.squeeze(2).mul_(window)
    pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
    return pool(t, tuple(kernel), tuple(stride), tuple(padding), count_include_pad=True).mul_(window)


def _sum_pool_transpose(grad: Tensor, like: Tensor, kernel, stride, padding) -> Tensor:
    if len(kernel) == 1:
        out = torch.ops.aten.avg_pool2d_backward(
            grad.unsqueeze(2), like.unsqueeze(2), [1, kernel[0]], [1, stride[0]], [0, padding[0]], False, True, 1
        )
        return out.squeeze(2)
    backward = torch.ops.aten.avg_pool2d_backward if len(kernel) == 2 else torch.ops.aten.avg_pool3d_backward
    return backward(grad, like, list(kernel), list(stride), list(padding), False, True, 1)


def box_sum(
    t: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """Sum of ``t`` (N, G, *spatial) over every window of the convolution geometry.

    Equal to a grouped convolution with an all-ones kernel, but summed in the dtype of ``t`` (no
    TF32, no fast-convolution rounding) and with a cheap backward: average pooling times the window
    size where pooling's limits allow (no dilation, padding at most half the kernel; one extra
    rounding), else one sum of ``k`` strided slices per spatial dimension.
    """
    if _pool_geometry(t, kernel, padding, dilation):
        return _sum_pool(t, kernel, stride, padding)
    if any(padding):
        pad: list[int] = []
        for p in reversed(padding):
            pad += [p, p]
        t = F.pad(t, pad)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        axis = 2 + i
        count = (t.shape[axis] - d * (k - 1) - 1) // s + 1
        acc = t[_window_slice(t.dim(), axis, 0, count, s)]
        if k == 1:
            acc = acc.contiguous() if s != 1 else acc
            t = acc
            continue
        acc = acc.clone(memory_format=torch.contiguous_format)
        for j in range(1, k):
            acc.add_(t[_window_slice(t.dim(), axis, j * d, count, s)])
        t = acc
    return t


def box_sum_transpose(
    grad: Tensor,
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Adjoint of :func:`box_sum`: scatter-add every window's gradient back onto the input grid."""
    if _pool_geometry(grad, kernel, padding, dilation):
        like = grad.new_empty((grad.shape[0], grad.shape[1], *in_spatial))
        return _sum_pool_transpose(grad, like, kernel, stride, padding)
    dims = len(kernel)
    padded = [n + 2 * p for n, p in zip(in_spatial, padding)]
    for i in reversed(range(dims)):
        axis = 2 + i
        k, s, d = kernel[i], stride[i], dilation[i]
        count = grad.shape[axis]
        shape = list(grad.shape)
        shape[axis] = padded[i]
        full = grad.new_zeros(shape)
        for j in range(k):
            full[_window_slice(full.dim(), axis, j * d, count, s)].add_(grad)
        grad = full
    if any(padding):
        index = [slice(None), slice(None)] + [slice(p, p + n) for p, n in zip(padding, in_spatial)]
        grad = grad[tuple(index)]
    return grad


def channel_sq_sum(input: Tensor, groups: int, use_triton: bool = False, use_cpp: bool = False) -> Tensor:
    """``sum x^2`` over the input channels of each group: (N, C, *S) -> (N, G, *S), compute dtype.

    ``use_triton`` / ``use_cpp``: through the Triton or C++ kernel (the caller has decided that it
    may run; the C++ one takes contiguous float32/float64 inputs, others go through ATen).
    """
    if use_triton:
        from . import _triton

        return _triton.channel_sq_sum(input, groups)
    if use_cpp and input.is_contiguous() and input.dtype in (torch.float32, torch.float64):
        return _cpu_kernels.channel_sq_sum(input, groups)
    x = input.to(compute_dtype(input.dtype))
    n, c = x.shape[0], x.shape[1]
    square = torch.mul(x, x)  # x * x: about twice as fast as square() (pow) on CPU
    if groups == 1:
        return square.sum(1, keepdim=True)
    return square.reshape(n, groups, c // groups, *x.shape[2:]).sum(2)


# --------------------------------------------------------------------------------------------
# Epilogue on ATen ops (CPU, and the traced path under torch.compile / export)
# --------------------------------------------------------------------------------------------


def _sigmoid_consts(k):
    """(1/k, s_k = 1/tanh(pi/4k)) for a float or a tensor k."""
    if isinstance(k, Tensor):
        return 1.0 / k, 1.0 / torch.tanh(math.pi / (4.0 * k))
    return 1.0 / k, 1.0 / math.tanh(math.pi / (4.0 * k))


def forward_epilogue(
    c: Tensor, operator: str, k, bias: Tensor | None, keep_angle: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``(out, extra)``: ``out = g(clamp(c, -1, 1)) (+ bias)`` in a new tensor, ``c`` untouched.

    The sigmoid operators evaluate ``g = s_k tanh(u) = s_k (2 sigmoid(2u) - 1)`` with
    ``2u = v = asin(clamp(c)) / k`` through the vectorised logistic function, and return what
    their backward pass needs, cheaper to keep than to recompute with another arcsine:
    ``extra = sigmoid(v)``, or ``extra = v`` when ``keep_angle`` (a learnable k needs the angle).
    Other operators return ``extra = None``. ``k`` (float or tensor broadcastable to ``c``) and
    ``bias`` (broadcastable to ``c``) as in the reference path.
    """
    out = c.clamp(-1.0, 1.0)
    if operator == "cosine":
        return (out.add_(bias) if bias is not None else out), None
    out.asin_()  # asin(c) = pi/2 - theta
    if operator == "linear":
        # 1 - 2 theta/pi = (2/pi) asin(c)
        out.mul_(_LINEAR_SCALE)
        return (out.add_(bias) if bias is not None else out), None
    inv_k, scale = _sigmoid_consts(k)
    offset = scale if bias is None else scale - bias
    if keep_angle:
        v = out.mul_(inv_k)
        return torch.sigmoid(v).mul_(2.0 * scale).sub_(offset), v
    sig = out.mul_(inv_k).sigmoid_()
    return torch.mul(sig, 2.0 * scale).sub_(offset), sig


def backward_epilogue(
    grad: Tensor, c: Tensor, extra: Tensor | None, operator: str, k, need_k: bool
) -> tuple[Tensor, float, Tensor | None, Tensor | float]:
    """``(d, scale, dk, dk_scale)`` with ``dL/dc = d * scale`` for the saved, unclamped cosine ``c``.

    ``d`` is a new tensor, zero where ``|c| > 1`` (the clamp's gradient), with the bounded arccos
    derivative elsewhere; the float ``scale`` is left to the caller to apply on smaller tensors.
    For a learnable k, ``dL/dout * dg/dk = dk * dk_scale``: ``dk`` unreduced (shape of ``c``),
    ``dk_scale`` a per-channel factor to apply after summing to k's shape. ``extra`` is what
    :func:`forward_epilogue` returned (``keep_angle=need_k``).
    """
    if operator == "cosine":
        # clamp's gradient: pass on [-1, 1]; the bounds are the next floats beyond +-1, so the
        # strict comparisons of hardtanh_backward reproduce clamp's inclusive ones exactly.
        bound = 1.0 + torch.finfo(c.dtype).eps
        return torch.ops.aten.hardtanh_backward(grad, c, -bound, bound), 1.0, None, 1.0
    # rho(c) = rsqrt(max(1 - c^2, floor)), zero where |c| > 1 (exactly where 1 - c^2 < 0):
    # rsqrt of a negative number is NaN (zeroed), rsqrt(0) = inf and large values are capped.
    d = torch.addcmul(torch.ones((), dtype=c.dtype, device=c.device), c, c, value=-1.0)
    d.rsqrt_().clamp_(max=_acos_derivative_cap(c.dtype)).nan_to_num_(nan=0.0)
    if operator == "linear":
        return d.mul_(grad), _LINEAR_SCALE, None, 1.0
    assert extra is not None  # forward_epilogue returns it for the sigmoid operators
    inv_k, scale = _sigmoid_consts(k)
    factor = 2.0 * scale * inv_k  # s/(2k) * sech^2(u) = (2s/k) * sig (1 - sig)
    dk = None
    if need_k:
        v = extra
        sig = torch.sigmoid(v)  # tanh(u) = 2 sig - 1, sech^2(u) = 4 sig (1 - sig)
        # dg/dk = (-s sech^2(u) u + tanh(u) (s^2 - 1) pi/(4k)) / k
        #       = (2s/k) [ (2 sig - 1) a - sig (1 - sig) v ],  a = (s^2 - 1) pi / (8 s k)
        a = (scale * scale - 1.0) * (0.125 * math.pi) * inv_k / scale
        dk = torch.mul(sig, 2.0 * a).sub_(a)
        sig.addcmul_(sig, sig, value=-1.0)  # sig (1 - sig) = sech^2(u) / 4
        dk.addcmul_(sig, v, value=-1.0).mul_(grad)
        d.mul_(sig).mul_(grad)
    else:
        # d * sig (1 - sig), in place: (d sig) - (d sig) sig
        d.mul_(extra)
        d.addcmul_(d, extra, value=-1.0).mul_(grad)
    if isinstance(factor, Tensor):
        return d.mul_(factor), 1.0, dk, factor
    return d, factor, dk, factor


# Elements per chunk of channel_dot's scratch buffer (1 MiB of float32: stays in cache and is
# allocated once, instead of a fresh output-sized temporary per call).
_DOT_CHUNK = 1 << 18


def channel_dot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``(a * b).sum(dim)`` without an ``a``-sized temporary (chunks along dim 0 on CPU)."""
    if torch.compiler.is_compiling() or a.device.type != "cpu" or a.numel() <= _DOT_CHUNK or a.dim() < 2:
        return torch.mul(a, b).sum(dim)
    n = a.shape[0]
    per = max(1, _DOT_CHUNK // max(1, a[0].numel()))
    if per >= n:
        return torch.mul(a, b).sum(dim)
    shape = list(torch.broadcast_shapes(a.shape, b.shape))
    out_shape = shape[:dim] + shape[dim + 1 :]
    out = torch.empty(out_shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    scratch = torch.empty([per] + shape[1:], dtype=out.dtype, device=a.device)
    for start in range(0, n, per):
        stop = min(start + per, n)
        prod = torch.mul(a[start:stop], b[start:stop], out=scratch[: stop - start])
        torch.sum(prod, dim, out=out[start:stop])
    return out


# --------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------


def _autocast_dtype(input: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a convolution in, or None when autocast is off / skips it."""
    device = input.device.type
    if not torch.is_autocast_enabled(device):
        return None
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None  # autocast leaves float64 alone
    return torch.get_autocast_dtype(device)


def _autocast_off(device: str) -> contextlib.AbstractContextManager:
    """Autocast disabled inside; a no-op where it is off already (entering torch.autocast costs
    about 20 us, a noticeable part of a small layer's call)."""
    if torch.is_autocast_enabled(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


# Run the Triton kernels on CPU tensors too (only meaningful under TRITON_INTERPRET=1; tests).
_triton_on_cpu = False


def _use_triton(t: Tensor) -> bool:
    """Whether the Triton kernels can run for ``t``: eager mode, float32 compute (not float64), CUDA
    with Triton installed. Whether they *do* run is :func:`_triton_selected`."""
    if t.dtype == torch.float64 or torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda":
        from . import _triton

        return _triton.available()
    return _triton_on_cpu


# --------------------------------------------------------------------------------------------
# Kernel selection and the self-check of the Triton kernels at first use
# --------------------------------------------------------------------------------------------

KERNEL_BACKENDS = ("auto", "triton", "cpp", "aten")
KERNELS_ENV = "SPHERECONV_KERNELS"
_backend_override: str | None = None
# (operator, dtype name, device) -> "triton" or "aten", and why a case fell back
_case_kernels: dict[tuple[str, str, str], str] = {}
_case_notes: dict[tuple[str, str, str], str] = {}
# Tolerances of the self-check, relative to the largest reference value: values computed and
# stored in float32 differ by rounding (the in-kernel arcsine series is float32-accurate, 3e-7);
# d(inner) is stored in the convolution's dtype (bf16 keeps 8 bits: 2^-8 = 0.004; fp16 11 bits).
_CHECK_TOL_FLOAT32 = 1e-4
_CHECK_TOL_FLOAT64 = 1e-10
_CHECK_TOL_STORED = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# k of the fixed-k sigmoid in the self-check (any value in the operator's range would do).
_CHECK_K = 0.3


def set_kernel_backend(backend: str | None) -> None:
    """Choose the fused epilogue's kernels for this process: ``"auto"`` (Triton on CUDA and the C++
    kernels on CPU where they can run and passed their self-check), ``"triton"`` (Triton wherever it
    can run, unchecked; ATen on CPU), ``"cpp"`` (the C++ kernels on CPU wherever they build,
    unchecked; ATen on CUDA), ``"aten"`` (neither), or ``None`` to return to ``$SPHERECONV_KERNELS``
    (default ``auto``).

    Triton runs only on CUDA with Triton installed, the C++ kernels (:mod:`sphereconv.nn._cpu_kernels`)
    only on CPU with a C++ compiler; naming one does not make it run elsewhere.
    """
    global _backend_override
    if backend is not None and backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(KERNEL_BACKENDS)} or None; got {backend!r}")
    _backend_override = backend


def kernel_backend() -> str:
    """The kernel choice in force: :func:`set_kernel_backend`'s, else ``$SPHERECONV_KERNELS``, else ``auto``."""
    if _backend_override is not None:
        return _backend_override
    value = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"{KERNELS_ENV} must be one of {', '.join(KERNEL_BACKENDS)}; got {os.environ[KERNELS_ENV]!r}")
    return value


def kernel_status() -> dict:
    """Which epilogue kernels the fused path uses, for reports such as ``sphereconv selftest``.

    Returns ``{"backend": "auto" | "triton" | "cpp" | "aten", "triton_installed": bool,
    "cpu_kernels": "cpp" | "aten" | "undecided", "cpu_note": str, "cases": [...]}``: ``cpu_kernels``
    is the CPU epilogue of float32/float64 contiguous outputs ("undecided" before the first such
    call under ``auto``/``cpp``), ``cpu_note`` how the C++ kernels were built or why they are not
    used; ``cases`` has one entry per (operator, dtype, device) this process has decided for Triton:
    ``{"operator": str, "dtype": str (e.g. "float32"), "device": str (e.g. "cuda:0"),
    "kernels": "triton" | "aten", "note": str}``, the note saying why a case fell back ("" if not).
    Cases that never took a Triton-capable path (CPU, float64) are not listed: they use ATen.
    """
    from . import _triton

    cases = [
        {
            "operator": op,
            "dtype": dtype,
            "device": device,
            "kernels": kernels,
            "note": _case_notes.get((op, dtype, device), ""),
        }
        for (op, dtype, device), kernels in sorted(_case_kernels.items())
    ]
    backend = kernel_backend()
    if backend in ("triton", "aten"):
        cpu_kernels = "aten"
    else:
        cpu_kernels = {None: "undecided", True: "cpp", False: "aten"}[_cpp_decision]
    return {
        "backend": backend,
        "triton_installed": _triton.triton is not None,
        "cpu_kernels": cpu_kernels,
        "cpu_note": _cpp_note,
        "cases": cases,
    }


def reset_kernel_status() -> None:
    """Forget every self-check decision: the next Triton-capable call of each case checks again (the
    C++ kernels, once built or found unbuildable, are not built again)."""
    global _cpp_decision, _cpp_note
    _case_kernels.clear()
    _case_notes.clear()
    _cpp_decision, _cpp_note = None, ""


def _case_key(operator: str, dtype: torch.dtype, device: torch.device) -> tuple[str, str, str]:
    return operator, str(dtype).removeprefix("torch."), str(device)


def _fall_back(key: tuple[str, str, str], reason: str) -> None:
    """Record that ``key`` uses the ATen epilogue from now on, warning once per case."""
    if _case_kernels.get(key) == "aten":
        return
    _case_kernels[key] = "aten"
    _case_notes[key] = reason
    operator, dtype, device = key
    warnings.warn(
        f"sphereconv: the Triton epilogue kernels for operator {operator!r}, {dtype} on {device} {reason}; "
        f"using the ATen epilogue for this case for the rest of the process (set {KERNELS_ENV}=aten to skip them)",
        RuntimeWarning,
        stacklevel=3,
    )


def _describe(error: Exception) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"failed to run ({type(error).__name__}: {first_line[:200]})"


def _triton_failed(operator: str, inner: Tensor, error: Exception) -> None:
    """A Triton call raised after the case was selected: ATen for this case from now on."""
    _fall_back(_case_key(operator, inner.dtype, inner.device), _describe(error))


def _triton_selected(operator: str, inner: Tensor) -> bool:
    """Whether this call runs the Triton kernels: they can run here, the backend allows them and,
    under ``auto``, the case passed its self-check (run now on its first use)."""
    if not _use_triton(inner):
        return False
    backend = kernel_backend()
    if backend != "auto":
        return backend == "triton"
    key = _case_key(operator, inner.dtype, inner.device)
    if key not in _case_kernels:
        try:
            problem = _self_check(operator, inner.dtype, inner.device)
        except Exception as error:  # noqa: BLE001 - any failure to compile or launch means: do not use
            problem = _describe(error)
        if problem is None:
            _case_kernels[key] = "triton"
        else:
            _fall_back(key, problem)
    return _case_kernels[key] == "triton"


# The C++ kernels on CPU: None until the first call that could use them, then whether they do
# (built, loaded and, under "auto", in agreement with the ATen epilogue), and why not.
_cpp_decision: bool | None = None
_cpp_note = ""


def _cpp_selected(t: Tensor, cdtype: torch.dtype) -> bool:
    """Whether this call runs the C++ kernels for the layer input ``t``: a contiguous CPU tensor of
    the compute dtype (float32/float64), a plain tensor in eager mode (not a trace's stand-in), the
    backend allows them, and they built (once per process) and, under ``auto``, passed their
    self-check."""
    if t.device.type != "cpu" or t.dtype != cdtype or type(t) is not Tensor or not t.is_contiguous():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    backend = kernel_backend()
    if backend not in ("auto", "cpp"):
        return False
    global _cpp_decision, _cpp_note
    if _cpp_decision is None:
        if _cpu_kernels.load() is None:
            _cpp_decision, _cpp_note = False, f"not built ({_cpu_kernels.load_error()})"
            warnings.warn(
                f"sphereconv: the C++ epilogue kernels could not be built ({_cpu_kernels.load_error()}); "
                f"using the ATen epilogue on CPU",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        problem = None
        if backend == "auto":
            try:
                problem = _in_own_thread(_cpp_self_check)
            except Exception as error:  # noqa: BLE001 - any failure to run means: do not use
                problem = _describe(error)
        if problem is not None:
            _cpp_decision, _cpp_note = False, problem
            warnings.warn(
                f"sphereconv: the C++ epilogue kernels {problem}; using the ATen epilogue on CPU "
                f"(set {KERNELS_ENV}=aten to skip them)",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        _cpp_decision, _cpp_note = True, _cpu_kernels.build_note
    return _cpp_decision


def _in_own_thread(check: Callable[[], str | None]) -> str | None:
    """``check()`` run in a new thread, so that the caller's thread-local autograd state (``no_grad``,
    inference mode, saved-tensor hooks) neither breaks nor sees its autograd calls; its exception is
    raised here."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(check())
        except Exception as error:  # noqa: BLE001 - handed to the caller
            outcome.append(error)

    thread = threading.Thread(target=run, name="sphereconv-self-check")
    thread.start()
    thread.join()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _cpp_self_check() -> str | None:
    """The C++ epilogue vs the ATen one on a small case, every operator, float32 and float64, forward
    and backward (the case of :func:`_self_check`), then the norm kernels and the whole-layer operator
    (:func:`_cpp_norms_mismatch`, :func:`_cpp_layer_mismatch`): None if they agree, else why not."""
    for dtype, tol in ((torch.float32, _CHECK_TOL_FLOAT32), (torch.float64, _CHECK_TOL_FLOAT64)):
        gen = torch.Generator().manual_seed(0)
        groups, per_group, spatial = 2, 3, (8, 16)
        channels = groups * per_group
        chan = (groups, per_group, 1, 1)
        inner = torch.randn(2, channels, *spatial, generator=gen, dtype=dtype).mul_(0.8)
        inner[:, ::2].mul_(0.1)  # cosines all below 1/2 in these channels: the C++ arcsine's short branch
        r = torch.rand(2, groups, *spatial, generator=gen, dtype=dtype).add_(0.5)
        grad = torch.randn(2, channels, *spatial, generator=gen, dtype=dtype)
        bias = torch.randn(channels, generator=gen, dtype=dtype)
        c = inner.unflatten(1, (groups, per_group)).mul(r.unsqueeze(2))
        for operator in _OPERATORS:
            need_k = operator == "learnable_sigmoid"
            k = torch.rand(channels, generator=gen, dtype=dtype).add_(0.2) if need_k else _CHECK_K
            k_g = k.reshape(chan) if isinstance(k, Tensor) else k
            cos = inner.clone()
            out, extra, _ = _cpu_kernels.forward_epilogue(cos, r, groups, operator, k, bias)
            expected, expected_extra = forward_epilogue(c, operator, k_g, bias.reshape(chan), keep_angle=need_k)
            d_inner, d_sq, d_k, d_bias = _cpu_kernels.backward_epilogue(
                grad,
                cos,
                extra,
                r,
                groups,
                operator,
                k,
                need_k,
                True,
                torch.finfo(dtype).eps,
                _acos_derivative_cap(dtype),
            )
            d_c, scale, dk_elem, dk_scale = backward_epilogue(
                grad.unflatten(1, (groups, per_group)), c, expected_extra, operator, k_g, need_k
            )
            d_c = d_c * scale
            problems = [
                _mismatch("cosine", cos, c.reshape(inner.shape), tol),
                _mismatch("output", out, expected.reshape(inner.shape), tol),
                _mismatch("d_inner", d_inner, (d_c * r.unsqueeze(2)).reshape(inner.shape), tol),
                _mismatch("d_sumsq", d_sq, (d_c * c).sum(2) * r.square() * -0.5, tol),
                _mismatch("d_bias", d_bias, grad.sum((0, 2, 3)), tol),
            ]
            if need_k:
                assert dk_elem is not None  # backward_epilogue returns it when need_k
                problems.append(_mismatch("d_k", d_k, (dk_elem.sum_to_size(chan) * dk_scale).reshape(-1), tol))
            x = torch.randn(2, 2 * groups, *spatial, generator=gen, dtype=dtype)
            problems.append(
                _mismatch(
                    "channel sum of squares", _cpu_kernels.channel_sq_sum(x, groups), channel_sq_sum(x, groups), tol
                )
            )
            problem = next((p for p in problems if p is not None), None)
            if problem is not None:
                return f"{problem} ({operator}, {dtype})"
        problem = _cpp_norms_mismatch(gen, dtype, tol) or _cpp_layer_mismatch(gen, dtype, tol)
        if problem is not None:
            return f"{problem} ({dtype})"
    return None


def _cpp_layer_mismatch(gen: torch.Generator, dtype: torch.dtype, tol: float) -> str | None:
    """The whole layer as the C++ operator vs the reference path (ATen ops only), every operator,
    forward and the gradients of input, weight, bias and a learnable k (see :func:`_cpp_self_check`)."""
    from .functional import sphere_conv2d  # (imports this module)

    stride, padding, dilation, groups = (2, 1), (1, 2), (1, 2), 2
    for operator in _OPERATORS:
        x = torch.randn(2, 4, 7, 8, generator=gen, dtype=dtype, requires_grad=True)
        weight = torch.randn(6, 2, 3, 2, generator=gen, dtype=dtype, requires_grad=True)
        bias = torch.randn(6, generator=gen, dtype=dtype, requires_grad=True)
        inputs = [x, weight, bias]
        k_value: Tensor | float = _CHECK_K
        k_tensor = _cpu_kernels.fixed_k(_CHECK_K, dtype) if operator == "sigmoid" else None
        if operator == "learnable_sigmoid":
            k_value = k_tensor = torch.rand(6, generator=gen, dtype=dtype).add_(0.2).requires_grad_()
            inputs.append(k_tensor)
        out = _cpu_kernels.sphere_conv(
            x, weight, bias, operator, k_tensor, stride, padding, dilation, groups, 1e-4, *_cpp_bounds(dtype)
        )
        if out is None:
            return f"the layer operator found inputs outside the direct range ({operator})"
        grad = torch.randn(out.shape, generator=gen, dtype=dtype)
        grads = torch.autograd.grad(out, inputs, grad)
        expected = sphere_conv2d(
            x, weight, bias, stride, padding, dilation, groups, operator=operator, sigmoid_k=k_value, impl="reference"
        )
        expected_grads = torch.autograd.grad(expected, inputs, grad)
        names = ("layer output", "input gradient", "weight gradient", "bias gradient", "k gradient")
        for name, got, want in zip(names, (out, *grads), (expected, *expected_grads)):
            problem = _mismatch(name, got, want, tol)
            if problem is not None:
                return f"{problem} ({operator})"
    return None


def _cpp_norms_mismatch(gen: torch.Generator, dtype: torch.dtype, tol: float) -> str | None:
    """The C++ filter norm, peak search and their gradients vs the ATen ones (see :func:`_cpp_self_check`)."""
    groups, eps = 2, 1e-4
    weight = torch.randn(6, 12, generator=gen, dtype=dtype)
    d_hat = torch.randn(6, 12, generator=gen, dtype=dtype)
    w_hat, state = _filter_unit(weight, dtype, eps)
    unit = _cpu_kernels.filter_unit(weight, eps, _DIRECT_RANGE)
    if unit is None:
        return "returned no filter norm for filters in the direct range"
    grad_w = _filter_unit_backward(d_hat.clone(), w_hat, state, eps)
    problems = [
        _mismatch("unit filters", unit[0], w_hat, tol),
        _mismatch("filter norms", unit[1], state[0], tol),
        _mismatch("filter gradient", _cpu_kernels.filter_unit_backward(d_hat.clone(), *unit, None, eps), grad_w, tol),
    ]
    x = torch.randn(3, 4, 5, 6, generator=gen, dtype=dtype)
    x[1] = -x[1]  # a negative largest element
    sq, peak, sign, direct = _cpu_kernels.sample_stats(x, groups, _DIRECT_RANGE)
    _, x_peak, x_sign = _sample_scale(x, groups, dtype, dtype)
    problems += [
        _mismatch("sums of squares", sq, channel_sq_sum(x, groups), tol),
        _mismatch("input peaks", peak, x_peak, tol),
        _mismatch("input peak signs", sign, x_sign, tol),
    ]
    # patch norms and the input's gradient over windows with stride, padding and dilation
    windows = ((3, 2), (2, 1), (1, 2), (1, 2))  # kernel, stride, padding, dilation
    out_spatial = tuple(_out_len(length, *geometry) for length, geometry in zip(x.shape[2:], zip(*windows)))
    inner = torch.randn(3, 2 * groups, *out_spatial, generator=gen, dtype=dtype)
    norms = (sq, peak, eps, windows)
    out, _, r = _cpu_kernels.forward_epilogue(inner.clone(), None, groups, "cosine", 1.0, None, norms)
    eps_term = x_peak.square().mul_(eps).reshape(3, groups, 1, 1)
    expected_r = box_sum(channel_sq_sum(x, groups), *windows).clamp_min_(0.0).add_(eps_term).rsqrt_()
    expected_out = _cosine(inner, expected_r, groups, dtype).clamp_(-1.0, 1.0)
    problems.append(_mismatch("reciprocal patch norms", r, expected_r, tol))
    problems.append(_mismatch("output after the patch norms", out, expected_out, tol))
    d_sq = torch.randn(r.shape, generator=gen, dtype=dtype)
    d_x = torch.randn(x.shape, generator=gen, dtype=dtype)
    share = box_sum_transpose(d_sq, x.shape[2:], *windows)
    expected = d_x.clone()
    expected.unflatten(1, (groups, 2)).addcmul_(x.unflatten(1, (groups, 2)), share.unsqueeze(2), value=2.0)
    _add_at_sample_peaks(expected, x, groups, x_sign, d_sq.flatten(2).sum(2).mul_(x_peak).mul_(x_sign).mul_(2.0 * eps))
    _cpu_kernels.input_backward(d_x, x, d_sq, peak, sign, None, eps, *windows)
    problems.append(_mismatch("input gradient", d_x, expected, tol))
    if not direct:
        problems.append("found inputs near 1 outside the direct range")
    return next((p for p in problems if p is not None), None)


def _mismatch(name: str, got: Tensor | None, expected: Tensor, tol: float) -> str | None:
    """None if ``got`` is within ``tol`` of ``expected`` relative to its largest value, else a message."""
    if got is None or got.shape != expected.shape:
        shape = None if got is None else tuple(got.shape)
        return f"returned a wrong {name} (shape {shape}, expected {tuple(expected.shape)})"
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    error = float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-30)
    if not error <= tol:  # also catches NaN
        return f"disagree with the ATen epilogue ({name}: relative error {error:.2g}, tolerance {tol:g})"
    return None


def _self_check(operator: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Triton vs ATen on a small case in ``dtype`` on ``device``: None if they agree, else why not.

    Two samples, two groups of three output channels, an 8 x 16 map (128 positions: the kernels'
    block sizes of most real layers, so that their compiled variants serve both), cosines past +-1
    (the clamp), a bias and, for the sigmoids, a per-channel k (learnable: with its gradient);
    forward output, d(inner), d(sum x^2), d(bias), d(k) and the channel sum of squares are compared.
    """
    from . import _triton

    gen = torch.Generator().manual_seed(0)
    groups, per_group, spatial = 2, 3, (8, 16)
    channels = groups * per_group
    chan = (groups, per_group, 1, 1)
    inner = torch.randn(2, channels, *spatial, generator=gen).mul_(0.8).to(device=device, dtype=dtype)
    r = (torch.rand(2, groups, *spatial, generator=gen) + 0.5).to(device)
    grad = torch.randn(2, channels, *spatial, generator=gen).to(device)
    bias = torch.randn(channels, generator=gen).to(device)
    need_k = operator == "learnable_sigmoid"
    k = (torch.rand(channels, generator=gen) + 0.2).to(device) if need_k else _CHECK_K
    k_g = k.reshape(chan) if isinstance(k, Tensor) else k
    # forward
    out = _triton.forward_epilogue(inner, r, groups, operator, k, bias, torch.float32)
    c = inner.float().unflatten(1, (groups, per_group)).mul(r.unsqueeze(2))
    expected, extra = forward_epilogue(c, operator, k_g, bias.reshape(chan), keep_angle=need_k)
    problems = [_mismatch("output", out, expected.reshape(inner.shape), _CHECK_TOL_FLOAT32)]
    # backward
    d_inner, d_sq, d_k, d_bias = _triton.backward_epilogue(grad, inner, r, groups, operator, k, need_k, True, dtype)
    d_c, scale, dk_elem, dk_scale = backward_epilogue(
        grad.unflatten(1, (groups, per_group)), c, extra, operator, k_g, need_k
    )
    d_c = d_c * scale
    problems.append(
        _mismatch("d_inner", d_inner, (d_c * r.unsqueeze(2)).reshape(inner.shape), _CHECK_TOL_STORED[dtype])
    )
    problems.append(_mismatch("d_sumsq", d_sq, (d_c * c).sum(2) * r.square() * -0.5, _CHECK_TOL_FLOAT32))
    problems.append(_mismatch("d_bias", d_bias, grad.sum((0, 2, 3)), _CHECK_TOL_FLOAT32))
    if need_k:
        assert dk_elem is not None  # backward_epilogue returns it when need_k
        problems.append(_mismatch("d_k", d_k, (dk_elem.sum_to_size(chan) * dk_scale).reshape(-1), _CHECK_TOL_FLOAT32))
    x = torch.randn(2, 2 * groups, *spatial, generator=gen).to(device)
    problems.append(
        _mismatch(
            "channel sum of squares", _triton.channel_sq_sum(x, groups), channel_sq_sum(x, groups), _CHECK_TOL_FLOAT32
        )
    )
    return next((p for p in problems if p is not None), None)


class _FusedSphereConvFn(torch.autograd.Function):
    """SphereConv of any rank as one autograd node (see module docstring for the gradients)."""

    @staticmethod
    def forward(
        ctx, input, weight, bias, k_tensor, k_float, stride, padding, dilation, groups, operator, eps, out_dtype
    ):
        dims = weight.dim() - 2
        cdtype = compute_dtype(input.dtype)
        conv_dtype = _autocast_dtype(input)
        device = input.device.type
        n, out_channels = input.shape[0], weight.shape[0]
        per_group = out_channels // groups
        kernel = tuple(weight.shape[2:])

        # The C++ kernels (CPU, contiguous float32/float64, eager; Triton first where it can run) take
        # the filter norm, the input's peaks and sum of squares, and the epilogue, each in one pass,
        # where no rescaling is needed (values in _DIRECT_RANGE); the ATen ops below do the rest.
        cpp = conv_dtype is None and not _use_triton(input) and _cpp_selected(input, cdtype)
        unit = stats = None
        if cpp and not _always_rescale:
            if weight.dtype == cdtype:
                unit = _cpu_kernels.filter_unit(weight.detach().flatten(1).contiguous(), eps, _DIRECT_RANGE)
            stats = _cpu_kernels.sample_stats(input.detach(), groups, _DIRECT_RANGE)
            stats = stats if stats[3] else None
        w_state: _FilterState
        if unit is not None:
            w_hat, w_state = unit[0].reshape(weight.shape), (unit[1], None, unit[2])
        else:
            w_hat, w_state = _filter_unit(weight, cdtype, eps)
        w_conv = _as_dtype(w_hat, conv_dtype if conv_dtype is not None else weight.dtype)
        if stats is not None:
            x_scale, x_peak, x_sign = None, stats[1], stats[2]
        else:
            x_scale, x_peak, x_sign = _sample_scale(input, groups, cdtype, conv_dtype or input.dtype)
        rescale = x_scale is not None
        if x_scale is not None:  # x' = s_x x, exact
            x_s = _scaled_input(input, x_scale, groups, cdtype)
            x_conv = _as_dtype(x_s, conv_dtype if conv_dtype is not None else input.dtype)
        else:  # x itself (see _sample_scale)
            x_s = _as_dtype(input, cdtype)
            x_conv = input.to(conv_dtype) if conv_dtype is not None else input
        with _autocast_off(device):
            inner = _CONV[dims](x_conv, w_conv, None, stride, padding, dilation, groups)
        # the low-precision copy the convolution read is kept for its weight gradient
        x_lowp = x_conv if x_conv is not x_s and x_conv is not input else None
        used_triton = cdtype == torch.float32 and _triton_selected(operator, inner)
        used_cpp = cpp and inner.is_contiguous()
        try:
            x_sq = stats[0] if stats is not None else channel_sq_sum(x_s, groups, used_triton, used_cpp)
        except Exception as error:  # noqa: BLE001 - a Triton failure after the check: fall back for good
            if not used_triton:
                raise
            _triton_failed(operator, inner, error)
            used_triton = False
            x_sq = channel_sq_sum(x_s, groups)
        del x_s, x_conv  # recomputed from the input in backward
        spatial = inner.shape[2:]
        k_val = k_tensor if k_tensor is not None else k_float
        bias_c = _as_dtype(bias, cdtype) if bias is not None else None
        out = None
        keep_angle = k_tensor is not None and k_tensor.requires_grad
        # the C++ kernels: the patch norms, then the conv output becomes the cosine, out and the
        # sigmoids' extra from the same pass
        used_cpp = used_cpp and x_sq.is_contiguous() and x_sq.dtype == inner.dtype
        if used_cpp:
            norms = (x_sq, x_peak, eps, (kernel, stride, padding, dilation))
            out, v, r = _cpu_kernels.forward_epilogue(inner, None, groups, operator, k_val, bias_c, norms)
            out = _as_dtype(out, out_dtype) if out_dtype is not None else out
            saved = inner
        else:
            x_sq = box_sum(x_sq, kernel, stride, padding, dilation)
            eps_term = x_peak.square().mul_(eps).reshape(n, groups, *([1] * dims))
            r = x_sq.clamp_min_(0.0).add_(eps_term).rsqrt_()  # (N, G, *S): 1 / |x'|_e
        if used_triton:
            from . import _triton

            try:
                out = _triton.forward_epilogue(inner, r, groups, operator, k_val, bias_c, out_dtype or cdtype)
                saved, v = inner, None  # the kernels recompute the cosine and g from the conv output
            except Exception as error:  # noqa: BLE001 - fall back for good, like a failed self-check
                _triton_failed(operator, inner, error)
                used_triton = False
        if not used_triton and not used_cpp:
            c_full = _cosine(inner, r, groups, cdtype)  # the conv output becomes the cosine
            k_g = (
                k_val.reshape(groups, per_group, *([1] * dims))
                if isinstance(k_val, Tensor) and k_val.numel() > 1
                else k_val
            )
            bias_g = bias_c.reshape(groups, per_group, *([1] * dims)) if bias_c is not None else None
            c = c_full.unflatten(1, (groups, per_group))
            out, v = forward_epilogue(c, operator, k_g, bias_g, keep_angle)
            # detach(): a reshape of the grouped layout is a view, and autograd forbids in-place
            # ops (e.g. ReLU(inplace=True)) on a view returned by a custom Function; the detached
            # alias shares the storage without being a view.
            out = out.reshape(n, out_channels, *spatial).detach()
            if out_dtype is not None and out.dtype != out_dtype:
                out = out.to(out_dtype)
            saved = c_full
        ctx.save_for_backward(input, x_lowp, x_scale, x_peak, x_sign, w_hat, *w_state, saved, r, k_tensor, v)
        ctx.geometry = (kernel, stride, padding, dilation, groups)
        ctx.config = (operator, k_float, conv_dtype, used_triton, used_cpp, keep_angle, eps, rescale)
        # the C++ filter-norm / input-norm backward (rescaled or not: both paths round alike)
        ctx.cpp_norms = (cpp and weight.dtype == cdtype, cpp)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.weight_dtype = weight.dtype
        ctx.inner_dtype = inner.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, x_lowp, x_scale, x_peak, x_sign, w_hat, w_norm, w_scale, w_signed_peak, saved, r, k_tensor, v = (
            ctx.saved_tensors
        )
        kernel, stride, padding, dilation, groups = ctx.geometry
        operator, k_float, conv_dtype, used_triton, used_cpp, keep_angle, eps, rescale = ctx.config
        dims = len(kernel)
        cdtype = w_hat.dtype
        n, out_channels = saved.shape[0], saved.shape[1]
        per_group = out_channels // groups
        spatial = saved.shape[2:]
        need_x, need_w, need_b, need_k = ctx.needs_input_grad[:4]
        need_k = need_k and k_tensor is not None
        k_val = k_tensor if k_tensor is not None else k_float
        chan = (groups, per_group, *([1] * dims))

        with _autocast_off(input.device.type):
            if used_cpp:
                d_inner, d_sq, d_k, d_bias = _cpu_kernels.backward_epilogue(
                    grad_out,
                    saved,
                    v,
                    r,
                    groups,
                    operator,
                    k_val,
                    need_k,
                    need_b,
                    torch.finfo(cdtype).eps,
                    _acos_derivative_cap(cdtype),
                )
                if d_k is not None and k_tensor.numel() == 1:
                    d_k = d_k.sum()
            elif used_triton:
                from . import _triton

                try:
                    d_inner, d_sq, d_k, d_bias = _triton.backward_epilogue(
                        grad_out,
                        saved,
                        r,
                        groups,
                        operator,
                        k_val,
                        need_k,
                        need_b,
                        ctx.inner_dtype,
                    )
                except Exception as error:  # noqa: BLE001 - fall back for good; recompute what ATen needs
                    _triton_failed(operator, saved, error)
                    used_triton = False
                    saved = _cosine(saved.to(cdtype, copy=True), r, groups, cdtype)
                    k_g = k_val.reshape(chan) if isinstance(k_val, Tensor) and k_val.numel() > 1 else k_val
                    _, v = forward_epilogue(saved.unflatten(1, (groups, per_group)), operator, k_g, None, need_k)
            if not used_triton and not used_cpp:
                grad = grad_out.to(cdtype).unflatten(1, (groups, per_group))
                r_g = r.unsqueeze(2)
                c = saved.unflatten(1, (groups, per_group))  # the cosine
                k_g = k_val.reshape(chan) if isinstance(k_val, Tensor) and k_val.numel() > 1 else k_val
                d_c, scale, d_k, dk_scale = backward_epilogue(grad, c, v, operator, k_g, need_k)
                d_bias = grad.sum_to_size(chan).reshape(-1) if need_b else None
                if d_k is not None:
                    d_k = d_k.sum_to_size(chan).mul_(dk_scale)
                    d_k = d_k if k_tensor.numel() > 1 else d_k.sum()
                # dL/dc = d_c * scale; dL/dsumsq = -r^2/2 sum_p dL/dc * c; dL/dinner = dL/dc * r
                d_sq = channel_dot(d_c, c, 2).mul_(r.square()).mul_(-0.5 * scale)
                r_scaled = r_g if scale == 1.0 else r_g * scale
                if ctx.inner_dtype == cdtype:
                    d_inner = d_c.mul_(r_scaled)
                else:  # written straight in the dtype the convolution ran in
                    d_inner = torch.mul(d_c, r_scaled, out=torch.empty_like(d_c, dtype=ctx.inner_dtype))
                d_inner = d_inner.reshape(n, out_channels, *spatial)

            grad_input = grad_weight = None
            if need_x or need_w:
                x_s = _scaled_input(input, x_scale, groups, cdtype) if rescale else _as_dtype(input, cdtype)
                w_conv = _as_dtype(w_hat, conv_dtype if conv_dtype is not None else ctx.weight_dtype)
                x_conv = x_lowp if x_lowp is not None else (x_s if rescale else input)
                d_x, d_w_hat, _ = torch.ops.aten.convolution_backward(
                    d_inner,
                    x_conv,
                    w_conv,
                    None,
                    list(stride),
                    list(padding),
                    list(dilation),
                    False,
                    [0] * dims,
                    groups,
                    [need_x, need_w, False],
                )
            if need_x:
                d_x = _as_dtype(d_x, cdtype)
                c_in = input.shape[1]
            if need_x and ctx.cpp_norms[1] and d_x.is_contiguous():
                _cpu_kernels.input_backward(
                    d_x, x_s.contiguous(), d_sq, x_peak, x_sign, x_scale, eps, kernel, stride, padding, dilation
                )
                grad_input = _as_dtype(d_x, input.dtype)
            elif need_x:
                share = box_sum_transpose(d_sq, input.shape[2:], kernel, stride, padding, dilation)
                d_xg = d_x.unflatten(1, (groups, c_in // groups))
                d_xg.addcmul_(x_s.unflatten(1, (groups, c_in // groups)), share.unsqueeze(2), value=2.0)
                # eps m'^2 in every patch norm: dL/dm' = 2 eps m' sum_positions dL/dsumsq
                d_peak = d_sq.flatten(2).sum(2).mul_(x_peak).mul_(x_sign).mul_(2.0 * eps)
                _add_at_sample_peaks(d_x, x_s, groups, x_sign, d_peak)
                if rescale:
                    d_xg.mul_(x_scale.reshape(n, groups, 1, *([1] * dims)))  # dL/dx = s_x dL/dx'
                grad_input = _as_dtype(d_x, input.dtype)
            if need_w and ctx.cpp_norms[0]:
                d_hat = _as_dtype(d_w_hat, cdtype).flatten(1).contiguous()
                grad_weight = _cpu_kernels.filter_unit_backward(
                    d_hat, w_hat.flatten(1), w_norm, w_signed_peak, w_scale, eps
                )
                grad_weight = _as_dtype(grad_weight.reshape(w_hat.shape), ctx.weight_dtype)
            elif need_w:
                w_state = (w_norm, w_scale, w_signed_peak)
                grad_weight = _filter_unit_backward(d_w_hat.to(cdtype), w_hat, w_state, eps).to(ctx.weight_dtype)
        grad_bias = _as_dtype(d_bias, ctx.bias_dtype) if need_b and d_bias is not None else None
        grad_k = None
        if need_k:
            assert d_k is not None  # every epilogue returns dL/dk when need_k
            grad_k = _as_dtype(d_k.reshape(k_tensor.shape), k_tensor.dtype)
        return grad_input, grad_weight, grad_bias, grad_k, None, None, None, None, None, None, None, None


def _cosine(inner: Tensor, r: Tensor, groups: int, cdtype: torch.dtype) -> Tensor:
    """The cosine ``inner * r`` (N, C_out, *S) in the compute dtype, in place when the conv output
    already has that dtype."""
    c_full = _as_dtype(inner, cdtype)
    c_full.unflatten(1, (groups, inner.shape[1] // groups)).mul_(r.unsqueeze(2))
    return c_full


class _FusedSphereLinearFn(torch.autograd.Function):
    """SphereLinear (SphereConv on whole vectors) as one autograd node."""

    @staticmethod
    def forward(ctx, input, weight, bias, k_tensor, k_float, operator, eps, out_dtype):
        cdtype = compute_dtype(input.dtype)
        conv_dtype = _autocast_dtype(input)
        device = input.device.type
        w_hat, w_state = _filter_unit(weight, cdtype, eps)
        w_mm = w_hat.to(conv_dtype if conv_dtype is not None else weight.dtype)
        m, x_sign = abs_max(input.detach(), input.dim() - 1)
        x_scale, x_peak = power_of_two_scale(m.to(cdtype))
        x_sign = x_sign.to(cdtype).masked_fill_(m == 0, 0.0)  # an all-zero row: no gradient through m
        x_s = input.to(cdtype) * x_scale.unsqueeze(-1)  # x' = s_x x per row, exact
        x_mm = x_s.to(conv_dtype if conv_dtype is not None else input.dtype)
        with _autocast_off(device):
            inner = F.linear(x_mm, w_mm)
        r = x_s.square().sum(-1, keepdim=True).add_(x_peak.square().mul_(eps).unsqueeze(-1)).rsqrt_()
        k_val = k_tensor if k_tensor is not None else k_float
        bias_c = bias.to(cdtype) if bias is not None else None
        c = _as_dtype(inner, cdtype).mul_(r)
        keep_angle = k_tensor is not None and k_tensor.requires_grad
        out, v = forward_epilogue(c, operator, k_val, bias_c, keep_angle)
        if out_dtype is not None and out.dtype != out_dtype:
            out = out.to(out_dtype)
        ctx.save_for_backward(
            x_s, x_mm if x_mm is not x_s else None, x_scale, x_peak, x_sign, w_hat, *w_state, c, r, k_tensor, v
        )
        ctx.config = (operator, k_float, conv_dtype, eps)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.weight_dtype = weight.dtype
        ctx.input_dtype = input.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_s, x_lowp, x_scale, x_peak, x_sign, w_hat, w_norm, w_scale, w_signed_peak, c, r, k_tensor, v = (
            ctx.saved_tensors
        )
        operator, k_float, conv_dtype, eps = ctx.config
        cdtype = w_hat.dtype
        need_x, need_w, need_b, need_k = ctx.needs_input_grad[:4]
        need_k = need_k and k_tensor is not None
        k_val = k_tensor if k_tensor is not None else k_float
        with _autocast_off(x_s.device.type):
            grad = grad_out.to(cdtype)
            d_c, scale, d_k, dk_scale = backward_epilogue(grad, c, v, operator, k_val, need_k)
            out_features = w_hat.shape[0]
            d_bias = grad.reshape(-1, out_features).sum(0) if need_b else None
            if d_k is not None:
                d_k = d_k.reshape(-1, out_features).sum(0).mul_(dk_scale)
                d_k = d_k if k_tensor.numel() > 1 else d_k.sum()
            d_sq = channel_dot(d_c, c, -1).unsqueeze(-1).mul_(r.square()).mul_(-0.5 * scale)
            d_inner = d_c.mul_(r if scale == 1.0 else r * scale)
            mm_dtype = conv_dtype if conv_dtype is not None else ctx.weight_dtype
            d_inner_mm = d_inner.to(mm_dtype)
            grad_input = grad_weight = None
            if need_x:
                d_x = torch.matmul(d_inner_mm, w_hat.to(mm_dtype)).to(cdtype)
                d_x.addcmul_(x_s, d_sq, value=2.0)
                # eps m'^2 in the norm: dL/dm' = 2 eps m' dL/dsumsq at the row's largest element
                d_peak = d_sq.squeeze(-1).mul(x_peak).mul_(x_sign).mul_(2.0 * eps)
                _add_at_peaks(d_x, x_s, x_peak * x_sign, d_peak)
                grad_input = d_x.mul_(x_scale.unsqueeze(-1)).to(ctx.input_dtype)
            if need_w:
                x_mm = x_lowp if x_lowp is not None else x_s
                d_w_hat = torch.matmul(d_inner_mm.reshape(-1, out_features).t(), x_mm.reshape(-1, x_mm.shape[-1])).to(
                    cdtype
                )
                w_state = (w_norm, w_scale, w_signed_peak)
                grad_weight = _filter_unit_backward(d_w_hat, w_hat, w_state, eps).to(ctx.weight_dtype)
        grad_bias = d_bias.to(ctx.bias_dtype) if need_b and d_bias is not None else None
        grad_k = None
        if need_k:
            assert d_k is not None  # every epilogue returns dL/dk when need_k
            grad_k = d_k.reshape(k_tensor.shape).to(k_tensor.dtype)
        return grad_input, grad_weight, grad_bias, grad_k, None, None, None, None


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _split_k(operator: str, sigmoid_k, cdtype: torch.dtype, out_channels: int) -> tuple[Tensor | None, float]:
    """k as (tensor or None, float): a tensor keeps its autograd history (learnable k)."""
    if operator not in ("sigmoid", "learnable_sigmoid"):
        return None, 0.0
    if isinstance(sigmoid_k, Tensor):
        k = sigmoid_k.to(cdtype)
        k = k if k.dim() == 1 else k.reshape(-1)  # (a reshape of a vector would add an autograd node)
        if k.numel() not in (1, out_channels):
            raise ValueError(f"sigmoid_k has {k.numel()} values; expected 1 or out_channels = {out_channels}")
        return k, 0.0
    return None, float(sigmoid_k)


def fused_sphere_convnd(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    operator: str,
    sigmoid_k,
    eps: float,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """Batched SphereConv through :class:`_FusedSphereConvFn`; arguments already validated.

    ``operator`` is canonical; ``out_dtype`` None keeps the compute dtype (autocast).
    """
    if operator not in _OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; allowed: {', '.join(_OPERATORS)}")
    input, stride_t, padding_t, dilation_t = check_geometry(input, tuple(weight.shape[2:]), stride, padding, dilation)
    cdtype = compute_dtype(input.dtype)
    k_tensor, k_float = _split_k(operator, sigmoid_k, cdtype, weight.shape[0])
    if _cpp_layer_selected(input, weight, bias, cdtype, out_dtype):
        k_values = k_tensor
        if k_values is None and operator in ("sigmoid", "learnable_sigmoid"):
            k_values = _cpu_kernels.fixed_k(k_float, cdtype)
        geometry = (stride_t, padding_t, dilation_t, groups)
        out = _cpu_kernels.sphere_conv(
            input, weight, bias, operator, k_values, *geometry, float(eps), *_cpp_bounds(cdtype)
        )
        if out is not None:  # (None: values that need rescaling, below)
            return out
    return _FusedSphereConvFn.apply(
        input, weight, bias, k_tensor, k_float, stride_t, padding_t, dilation_t, groups, operator, float(eps), out_dtype
    )


def _cpp_bounds(dtype: torch.dtype) -> tuple[float, float, tuple[float, float]]:
    """The arccos derivative's floor and cap and the direct range, as :func:`_cpu_kernels.sphere_conv`
    takes them after ``eps``."""
    return torch.finfo(dtype).eps, _acos_derivative_cap(dtype), _DIRECT_RANGE


def _cpp_layer_selected(
    input: Tensor, weight: Tensor, bias: Tensor | None, cdtype: torch.dtype, out_dtype: torch.dtype | None
) -> bool:
    """Whether the whole layer runs as the C++ operator (:func:`_cpu_kernels.sphere_conv`, autograd node
    :data:`_cpu_kernels.AUTOGRAD_NODE`): where :class:`_FusedSphereConvFn` would run every step on the
    C++ kernels (the C++ kernels selected for the input, autocast off, weight and bias of the input's
    dtype)."""
    return (
        input.device.type == "cpu"  # (first: a CUDA call skips the rest)
        and out_dtype == cdtype
        and weight.dtype == cdtype
        and (bias is None or bias.dtype == cdtype)
        and not _always_rescale
        and _autocast_dtype(input) is None
        and not _use_triton(input)
        and _cpp_selected(input, cdtype)
    )


def fused_sphere_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    operator: str,
    sigmoid_k,
    eps: float,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """SphereLinear through :class:`_FusedSphereLinearFn`; arguments already validated."""
    if operator not in _OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; allowed: {', '.join(_OPERATORS)}")
    k_tensor, k_float = _split_k(operator, sigmoid_k, compute_dtype(input.dtype), weight.shape[0])
    return _FusedSphereLinearFn.apply(input, weight, bias, k_tensor, k_float, operator, float(eps), out_dtype)
