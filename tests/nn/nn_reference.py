"""Slow, obvious reference computations for the nn tests.

Every operator is recomputed patch by patch: the input is padded with the layer's padding mode, each
patch is cut out explicitly, and the cosine, the angle (explicit arccos) and g are evaluated from
their textbook formulas (paper Sec. 2.1), with the sigmoid in its exp form. The norms
are the documented ones of ``sphereconv.nn.functional``: ``sqrt(sum v^2 + eps m^2)`` with ``m`` the
largest |x| of the sample over the group's input channels (all positions), or of the filter; 1 when
that is 0. Computed directly in float64, without any rescaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-4


def _tuple(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def extract_patches(x, kernel_size, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """(N, C, *S) -> (N, C, *out, *kernel): every patch a convolution sees, cut out explicitly."""
    dims = x.dim() - 2
    kernel_size, stride = _tuple(kernel_size, dims), _tuple(stride, dims)
    padding, dilation = _tuple(padding, dims), _tuple(dilation, dims)
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    if any(padding):
        x = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else padding_mode)
    for d in range(dims):
        span = dilation[d] * (kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])[..., :: dilation[d]]
    return x


def patch_cosines(x, weight, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", eps=EPS):
    """Per-patch ``(cos, |x|_e, |w|_e)``: cos (N, C_out, *out), |x|_e (N, C_out, *out), |w|_e (C_out,)."""
    dims = weight.dim() - 2
    # largest |x| of each sample over each group's channels (padding copies values, adds zeros)
    peak = x.abs().reshape(x.shape[0], groups, -1).amax(-1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    patches = extract_patches(x, weight.shape[2:], stride, padding, dilation, padding_mode)
    n, c_out = x.shape[0], weight.shape[0]
    c_per_group, out_per_group = weight.shape[1], c_out // groups
    out_spatial = patches.shape[2 : 2 + dims]
    cos = torch.empty(n, c_out, *out_spatial, dtype=x.dtype)
    x_norm = torch.empty_like(cos)
    w_norm = torch.empty(c_out, dtype=x.dtype)
    for o in range(c_out):
        g = o // out_per_group
        p = patches[:, g * c_per_group : (g + 1) * c_per_group]  # (N, Cg, *out, *k)
        # Move the patch contents (channel, kernel...) to the end and flatten them.
        p = p.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)).reshape(n, *out_spatial, -1)
        w = weight[o].reshape(-1)
        w_peak = float(w.abs().max()) or 1.0
        wn = math.sqrt(float((w * w).sum()) + eps * w_peak**2)
        xn = torch.sqrt((p * p).sum(-1) + eps * peak[:, g].reshape(-1, *([1] * dims)) ** 2)
        cos[:, o] = (p * w).sum(-1) / (wn * xn)
        x_norm[:, o] = xn
        w_norm[o] = wn
    return cos, x_norm, w_norm


def g_of_angle(theta, operator, k=0.3):
    """g(theta) from the paper's formulas; the sigmoid in its exp form with c_k."""
    if operator == "linear":
        return 1 - 2 * theta / math.pi
    if operator == "cosine":
        return torch.cos(theta)
    if operator == "square_cosine":
        c = torch.cos(theta)
        return torch.sign(c) * c * c
    if operator in ("sigmoid", "learnable_sigmoid", "lr_sigmoid"):
        k = torch.as_tensor(k, dtype=theta.dtype)
        c_k = (1 + torch.exp(-math.pi / (2 * k))) / (1 - torch.exp(-math.pi / (2 * k)))
        e = torch.exp(theta / k - math.pi / (2 * k))
        return c_k * (1 - e) / (1 + e)
    raise AssertionError(operator)


def g_of_cosine(cos, operator, k=0.3):
    """g(arccos(cos)) with an explicit arccos."""
    return g_of_angle(torch.acos(cos.clamp(-1, 1)), operator, k)


def channel_view(value, cos):
    """Per-output-channel values broadcast over (N, C_out, *spatial)."""
    value = torch.as_tensor(value, dtype=cos.dtype)
    if value.numel() == 1:
        return value.reshape(())
    return value.reshape(-1, *([1] * (cos.dim() - 2)))


def sphere_conv_reference(x, weight, operator="cosine", k=0.3, eps=EPS, **conv):
    """SphereConv output g(theta) per patch."""
    cos, _, _ = patch_cosines(x, weight, eps=eps, **conv)
    return g_of_cosine(cos, operator, channel_view(k, cos))


def sphere_linear_reference(x, weight, operator="cosine", k=0.3, eps=EPS):
    """SphereLinear: g of the angle between x and each row of the weight."""
    x_peak = x.abs().amax(-1, keepdim=True)
    w_peak = weight.abs().amax(-1)
    xn = torch.sqrt((x * x).sum(-1, keepdim=True) + eps * torch.where(x_peak > 0, x_peak, 1.0) ** 2)
    wn = torch.sqrt((weight * weight).sum(-1) + eps * torch.where(w_peak > 0, w_peak, 1.0) ** 2)
    return g_of_cosine((x @ weight.T) / (xn * wn), operator, k)


def magnitude_reference(xn, magnitude, alpha, beta, rho):
    """h(|x|) of Decoupled Networks Sec. 3.1, written out case by case."""
    if magnitude == "sphere":
        return alpha * torch.ones_like(xn)
    if magnitude == "ball":
        return alpha * torch.where(xn < rho, xn / rho, torch.ones_like(xn))
    if magnitude == "tanh":
        return alpha * torch.tanh(xn / rho)
    if magnitude == "linear":
        return alpha * xn
    if magnitude == "seg":
        return torch.where(xn <= rho, alpha * xn, beta * xn + (alpha - beta) * rho)
    if magnitude == "log":
        return alpha * torch.log(1 + xn)
    if magnitude == "mix":
        return alpha * xn + beta * torch.log(1 + xn)
    raise AssertionError(magnitude)
