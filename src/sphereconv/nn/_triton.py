"""Triton kernels for the fused SphereConv epilogue on CUDA (optional dependency).

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Section 2.1. Three kernels, each one read
of its inputs and one write of its outputs, with float32 arithmetic whatever the storage dtype
(float32, TF32-computed float32, bfloat16, float16):

- :func:`channel_sq_sum`: ``sum x^2`` over the input channels of each group;
- :func:`forward_epilogue`: ``c = inner * r``, ``out = g(clamp(c, -1, 1)) + b``;
- :func:`backward_epilogue`: ``dL/dinner = g'(c) [|c| <= 1] dL/dout * r``, the patch-norm gradient
  ``-r^2/2 sum_p dL/dc * c`` and per-channel partial sums for the bias and the learnable k.

The formulas are those of :mod:`sphereconv.nn._fused`. ``asin`` is evaluated in-kernel from its
Maclaurin series (coefficients (2n)! / (4^n (n!)^2 (2n+1))) after the half-angle reduction
``asin(x) = pi/2 - 2 asin(sqrt((1 - x)/2))`` for ``|x| > 1/2``, so the kernels need no libdevice
and also run under ``TRITON_INTERPRET=1`` (on CPU tensors), which is how the tests check them.

Tensors are addressed as (N, C, S) with arbitrary strides for N and C and one stride for the
flattened spatial dimensions (contiguous and channels-last layouts both qualify).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional (extra "triton")
    triton = None
    tl = None

OPERATOR_CODES = {"cosine": 0, "linear": 1, "sigmoid": 2, "learnable_sigmoid": 2}
# Multiply-adds contracted to FMA in the compiled kernels: Triton's default so far, and what the
# kernels were checked with; set explicitly because Triton 3.9 warns that its default changes in 3.10.
FP_FUSION = True
# Maclaurin coefficients of asin(x) = sum_n a_n x^(2n+1), n = 1..11: after the reduction |x| <= 1/2
# the first omitted term is below 2e-9 relative (float32 rounding is 6e-8).
_ASIN_TERMS = 11
ASIN_COEFFS = tuple(math.comb(2 * n, n) / (4.0**n * (2 * n + 1)) for n in range(1, _ASIN_TERMS + 1))
# Work per program: a [BLOCK_C, BLOCK_S] tile of this many elements (a power of two).
_TILE_ELEMENTS = 2048
_MIN_BLOCK = 16


def available() -> bool:
    """True when Triton is importable and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _flat_strides(t: Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_s) of an (N, C, *S) tensor whose spatial dims flatten to one stride."""
    spatial = t.shape[2:]
    strides = t.stride()
    stride_s = 1
    dims = [(size, stride) for size, stride in zip(spatial, strides[2:]) if size != 1]
    if dims:
        stride_s = dims[-1][1]
        expected = stride_s
        for size, stride in reversed(dims):
            if stride != expected:
                raise ValueError("spatial dimensions do not flatten to one stride")
            expected = stride * size
    return strides[0], strides[1], stride_s


def _as_flat(t: Tensor) -> Tensor:
    try:
        _flat_strides(t)
        return t
    except ValueError:
        return t.contiguous()


def _blocks(channels: int, spatial: int) -> tuple[int, int]:
    block_s = max(_MIN_BLOCK, min(128, triton.next_power_of_2(spatial)))
    block_c = max(_MIN_BLOCK, min(triton.next_power_of_2(channels), _TILE_ELEMENTS // block_s))
    return block_c, block_s


if triton is not None:
    # Module-level constants visible inside the kernels (Triton accepts only constexpr globals).
    _A1, _A2, _A3, _A4, _A5, _A6, _A7, _A8, _A9, _A10, _A11 = (tl.constexpr(a) for a in ASIN_COEFFS)
    _HALF_PI = tl.constexpr(0.5 * math.pi)
    # Linear operator (paper Sec. 2.1): g = 1 - 2 theta/pi = (2/pi) asin(c).
    _LINEAR_SCALE = tl.constexpr(2.0 / math.pi)

    @triton.jit
    def _asin(x):
        ax = tl.abs(x)
        big = ax > 0.5
        z = tl.where(big, 0.5 * (1.0 - ax), x * x)
        s = tl.where(big, tl.sqrt(z), ax)
        p = _A11
        p = p * z + _A10
        p = p * z + _A9
        p = p * z + _A8
        p = p * z + _A7
        p = p * z + _A6
        p = p * z + _A5
        p = p * z + _A4
        p = p * z + _A3
        p = p * z + _A2
        p = p * z + _A1
        series = s + s * z * p  # asin(s)
        res = tl.where(big, _HALF_PI - 2.0 * series, series)
        return tl.where(x < 0, -res, res)

    @triton.jit
    def _sq_sum_kernel(x_ptr, out_ptr, C_PER_G, S, G, sxn, sxc, sxs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid_s = tl.program_id(0)
        g = tl.program_id(1)
        n = tl.program_id(2)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        for c0 in range(0, C_PER_G, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = (offs_c < C_PER_G)[:, None] & mask_s[None, :]
            ptrs = x_ptr + n * sxn + (g * C_PER_G + offs_c)[:, None] * sxc + offs_s[None, :] * sxs
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(x * x, axis=0)
        tl.store(out_ptr + (n * G + g) * S + offs_s, acc, mask=mask_s)

    @triton.jit
    def _forward_kernel(
        inner_ptr,
        r_ptr,
        inv_k_ptr,
        scale_ptr,
        bias_ptr,
        out_ptr,
        C,
        P,
        S,
        G,
        sin_n,
        sin_c,
        sin_s,
        so_n,
        so_c,
        so_s,
        OP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = tl.program_id(2)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_c = offs_c < C
        mask = mask_c[:, None] & (offs_s < S)[None, :]
        x = tl.load(inner_ptr + n * sin_n + offs_c[:, None] * sin_c + offs_s[None, :] * sin_s, mask=mask, other=0.0)
        r = tl.load(r_ptr + (n * G + offs_c // P)[:, None] * S + offs_s[None, :], mask=mask, other=0.0)
        c = x.to(tl.float32) * r
        cc = tl.minimum(tl.maximum(c, -1.0), 1.0)
        if OP == 0:
            g = cc
        elif OP == 1:
            g = _LINEAR_SCALE * _asin(cc)
        else:
            inv_k = tl.load(inv_k_ptr + offs_c, mask=mask_c, other=1.0)
            scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=1.0)
            v = _asin(cc) * inv_k[:, None]  # 2u = asin(c) / k
            sig = 1.0 / (1.0 + tl.exp(-v))
            g = scale[:, None] * (2.0 * sig - 1.0)  # s_k tanh(u)
        if HAS_BIAS:
            g += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0)[:, None]
        tl.store(
            out_ptr + n * so_n + offs_c[:, None] * so_c + offs_s[None, :] * so_s,
            g.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
            mask=mask,
        )

    @triton.jit
    def _backward_kernel(
        grad_ptr,
        inner_ptr,
        r_ptr,
        inv_k_ptr,
        scale_ptr,
        coef_ptr,
        d_inner_ptr,
        d_sq_ptr,
        part_bias_ptr,
        part_k_ptr,
        C,
        P,
        S,
        G,
        NUM_SB,
        ACOS_FLOOR,
        ACOS_CAP,
        sg_n,
        sg_c,
        sg_s,
        sin_n,
        sin_c,
        sin_s,
        sd_n,
        sd_c,
        sd_s,
        OP: tl.constexpr,
        SAVED_IS_COS: tl.constexpr,
        NEED_BIAS: tl.constexpr,
        NEED_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        g_idx = tl.program_id(1)
        n = tl.program_id(2)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        r = tl.load(r_ptr + (n * G + g_idx) * S + offs_s, mask=mask_s, other=0.0)
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        part_row = n * NUM_SB + pid_s
        for p0 in range(0, P, BLOCK_C):
            offs_p = p0 + tl.arange(0, BLOCK_C)
            mask_p = offs_p < P
            ch = g_idx * P + offs_p
            mask = mask_p[:, None] & mask_s[None, :]
            go = tl.load(grad_ptr + n * sg_n + ch[:, None] * sg_c + offs_s[None, :] * sg_s, mask=mask, other=0.0).to(
                tl.float32
            )
            x = tl.load(inner_ptr + n * sin_n + ch[:, None] * sin_c + offs_s[None, :] * sin_s, mask=mask, other=0.0).to(
                tl.float32
            )
            if SAVED_IS_COS:
                c = x
            else:
                c = x * r[None, :]
            inside = (c >= -1.0) & (c <= 1.0)
            if OP == 0:
                d = go
            else:
                # bounded arccos derivative rho = 1/sqrt(max(1 - c^2, floor))
                rho = tl.minimum(1.0 / tl.sqrt(tl.maximum(1.0 - c * c, ACOS_FLOOR)), ACOS_CAP)
                if OP == 1:
                    d = go * rho * _LINEAR_SCALE
                else:
                    inv_k = tl.load(inv_k_ptr + ch, mask=mask_p, other=1.0)[:, None]
                    scale = tl.load(scale_ptr + ch, mask=mask_p, other=1.0)[:, None]
                    cc = tl.minimum(tl.maximum(c, -1.0), 1.0)
                    v = _asin(cc) * inv_k
                    sig = 1.0 / (1.0 + tl.exp(-v))
                    sech2_4 = sig * (1.0 - sig)  # sech^2(u) / 4
                    d = go * rho * sech2_4 * (2.0 * scale * inv_k)
                    if NEED_K:
                        coef = tl.load(coef_ptr + ch, mask=mask_p, other=0.0)[:, None]
                        dk = go * (coef * (2.0 * sig - 1.0) - 2.0 * scale * inv_k * sech2_4 * v)
                        tl.store(part_k_ptr + part_row * C + ch, tl.sum(dk, axis=1), mask=mask_p)
            d = tl.where(inside, d, 0.0)
            acc += tl.sum(d * c, axis=0)
            tl.store(
                d_inner_ptr + n * sd_n + ch[:, None] * sd_c + offs_s[None, :] * sd_s,
                (d * r[None, :]).to(d_inner_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                mask=mask,
            )
            if NEED_BIAS:
                tl.store(part_bias_ptr + part_row * C + ch, tl.sum(go, axis=1), mask=mask_p)
        tl.store(d_sq_ptr + (n * G + g_idx) * S + offs_s, -0.5 * r * r * acc, mask=mask_s)


def _get_kernels():
    if triton is None:
        raise RuntimeError("Triton is not installed (pip install 'sphereconv[triton]')")
    return _sq_sum_kernel, _forward_kernel, _backward_kernel


def _channel_consts(operator: str, k, channels: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel float32 (1/k, s_k, (s_k^2 - 1) pi/4 / k^2) for the sigmoid operators."""
    if OPERATOR_CODES[operator] != 2:
        dummy = torch.ones(1, dtype=torch.float32, device=device)
        return dummy, dummy, dummy
    k_t = (
        k.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if isinstance(k, Tensor)
        else torch.tensor([float(k)], device=device)
    )
    k_t = k_t.expand(channels).contiguous()
    inv_k = 1.0 / k_t
    scale = 1.0 / torch.tanh(math.pi / (4.0 * k_t))
    coef = (scale * scale - 1.0) * (0.25 * math.pi) * inv_k * inv_k
    return inv_k, scale, coef


def channel_sq_sum(input: Tensor, groups: int) -> Tensor:
    """``sum x^2`` over each group's channels: (N, C, *S) -> (N, G, *S) float32, one read of ``x``."""
    sq_sum_kernel, _, _ = _get_kernels()
    x = _as_flat(input)
    n, c = x.shape[0], x.shape[1]
    spatial = x.shape[2:]
    s = math.prod(spatial)
    out = torch.empty((n, groups, *spatial), dtype=torch.float32, device=x.device)
    block_c, block_s = _blocks(c // groups, s)
    grid = (triton.cdiv(s, block_s), groups, n)
    sq_sum_kernel[grid](
        x, out, c // groups, s, groups, *_flat_strides(x), BLOCK_C=block_c, BLOCK_S=block_s, enable_fp_fusion=FP_FUSION
    )
    return out


def forward_epilogue(
    inner: Tensor, r: Tensor, groups: int, operator: str, k, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``g(clamp(inner * r)) (+ bias)`` for the conv output ``inner`` (N, C, *S) and ``r`` (N, G, *S)."""
    _, forward_kernel, _ = _get_kernels()
    inner = _as_flat(inner)
    n, c = inner.shape[0], inner.shape[1]
    s = math.prod(inner.shape[2:])
    r = r.contiguous()
    out = torch.empty_like(inner, dtype=out_dtype)
    inv_k, scale, _ = _channel_consts(operator, k, c, inner.device)
    bias_t = bias.to(torch.float32).contiguous() if bias is not None else inv_k
    block_c, block_s = _blocks(c, s)
    grid = (triton.cdiv(s, block_s), triton.cdiv(c, block_c), n)
    forward_kernel[grid](
        inner,
        r,
        inv_k,
        scale,
        bias_t,
        out,
        c,
        c // groups,
        s,
        groups,
        *_flat_strides(inner),
        *_flat_strides(out),
        OP=OPERATOR_CODES[operator],
        HAS_BIAS=bias is not None,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        enable_fp_fusion=FP_FUSION,
    )
    return out


def backward_epilogue(
    grad_out: Tensor,
    saved: Tensor,
    r: Tensor,
    groups: int,
    operator: str,
    k,
    need_k: bool,
    need_bias: bool,
    d_inner_dtype: torch.dtype,
    *,
    saved_is_cos: bool = False,
    acos_floor: float = torch.finfo(torch.float32).eps,
):
    """``(dL/dinner, dL/dsumsq, dL/dk or None, dL/dbias or None)`` from ``dL/dout``.

    ``saved`` is the conv output (or the cosine when ``saved_is_cos``); ``dL/dk`` is reduced to the
    shape of ``k`` and ``dL/dbias`` to (C,).
    """
    _, _, backward_kernel = _get_kernels()
    saved = _as_flat(saved)
    grad_out = _as_flat(grad_out)
    n, c = saved.shape[0], saved.shape[1]
    per_group = c // groups
    s = math.prod(saved.shape[2:])
    r = r.contiguous()
    d_inner = torch.empty_like(saved, dtype=d_inner_dtype)
    d_sq = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    inv_k, scale, coef = _channel_consts(operator, k, c, saved.device)
    need_k = need_k and OPERATOR_CODES[operator] == 2
    block_c, block_s = _blocks(per_group, s)
    num_sb = triton.cdiv(s, block_s)
    rows = n * num_sb
    part_bias = torch.empty((rows, c) if need_bias else (1,), dtype=torch.float32, device=saved.device)
    part_k = torch.empty((rows, c) if need_k else (1,), dtype=torch.float32, device=saved.device)
    cap = 1.0 / math.sqrt(acos_floor)
    grid = (num_sb, groups, n)
    backward_kernel[grid](
        grad_out,
        saved,
        r,
        inv_k,
        scale,
        coef,
        d_inner,
        d_sq,
        part_bias,
        part_k,
        c,
        per_group,
        s,
        groups,
        num_sb,
        acos_floor,
        cap,
        *_flat_strides(grad_out),
        *_flat_strides(saved),
        *_flat_strides(d_inner),
        OP=OPERATOR_CODES[operator],
        SAVED_IS_COS=saved_is_cos,
        NEED_BIAS=need_bias,
        NEED_K=need_k,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        enable_fp_fusion=FP_FUSION,
    )
    d_k = None
    if need_k:
        d_k = part_k.sum(0)
        if isinstance(k, Tensor) and k.numel() == 1:
            d_k = d_k.sum().reshape(k.shape)
    d_bias = part_bias.sum(0) if need_bias else None
    return d_inner, d_sq, d_k, d_bias
