"""C++ kernels for the fused SphereConv on CPU, compiled at first use (optional).

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Section 2.1; the formulas are those of
:mod:`sphereconv.nn._fused`. There, each layer call runs about 130 small ATen ops, the epilogue alone
sweeping the output about five times (clamp, arcsine, logistic function, bias forward; clamp mask,
arccos derivative, products and reductions backward). These kernels do each step in one pass:

- :func:`filter_unit` / :func:`filter_unit_backward`: ``w_hat = w / |w|_e`` with the filter's
  largest element, and ``dL/dw`` from ``dL/dw_hat`` (projection plus the gradient of the largest
  element), one call each for all filters;
- :func:`sample_stats`: the largest |x| of each sample-group with its sign and ``sum x^2`` over the
  group's channels, one read of the input;
- :func:`input_backward`: ``dL/dx += 2 x share`` with ``share`` the windows' transpose of
  ``dL/dsumsq``, plus the gradient of the largest element, found in the same pass;
- :func:`forward_epilogue`: ``r = 1 / |x_patch|_e`` (the window sums of ``sum x^2`` over the
  convolution's geometry, stride, padding and dilation, 1-d to 3-d, plus ``eps m^2``), then ``c =
  inner * r`` (written over the conv output, which becomes the saved cosine), ``out = g(clamp(c, -1,
  1)) + b`` and, for the sigmoids, ``sigmoid(2u)`` for the backward;
- :func:`backward_epilogue`: ``dL/dinner = g'(c) [|c| <= 1] dL/dout * r``, the patch-norm gradient
  ``-r^2/2 sum_p dL/dc * c`` and per-sample, per-channel partial sums for the bias and a learnable k
  (whose ``dg/dk`` takes the arcsine of the saved cosine again);
- :func:`channel_sq_sum`: ``sum x^2`` over the input channels of each group;
- :func:`sphere_conv`: the whole layer as one PyTorch operator with its own autograd node (C++,
  :data:`AUTOGRAD_NODE`): the filter norms, the input's statistics, the convolution (ATen's) and the
  forward epilogue; backward the epilogue, ATen's convolution backward and the norm gradients. The
  fused path runs it wherever all of the above apply (contiguous float32/float64, autocast off,
  largest values in the direct range), instead of its Python autograd function: a layer call then
  costs one Python call instead of some thirty (about 170 us less per layer, forward and backward).

The arcsine (linear and sigmoid operators) runs block by block: a block of cosines all within 1/2,
the usual case for filters not aligned with their patches, skips the square root of the polynomial's
other branch, and for the sigmoids with k >= pi/12 takes ``tanh(u)`` from a polynomial valid for
|u| <= 1 instead of an exponential and a division (other blocks: ``2 sigmoid(2u) - 1``). The sigmoids'
constants (``1/k``, ``s_k``, the ``dg/dk`` coefficient) are computed in the kernels from k, once per
channel and call.

Inputs that need the power-of-two rescaling (largest values outside the fused path's direct range)
take the ATen filter norm and peak search; the gradients then take the kernels with the scales.

The source (``csrc/cpu_kernels.cpp``, package data) has C entry points, called through :mod:`ctypes`
on contiguous float32/float64 tensors, and the operator, registered with ``TORCH_LIBRARY`` under a
namespace of its own per build. It is compiled against PyTorch's headers and libraries (15-30 s, most
of it the headers), once per source, compiler, flags (which follow PyTorch's CPU capability) and
PyTorch version, into the PyTorch extensions directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and loaded from there afterwards. Without a C++ compiler, or if
building or loading fails for any reason, :func:`load` returns None and the fused path keeps its
ATen ops (:mod:`sphereconv.nn._fused` warns once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

OPERATOR_CODES = {"cosine": 0, "linear": 1, "sigmoid": 2, "learnable_sigmoid": 2}
# Compiler flags: -fno-math-errno and -fno-trapping-math let the selects and square roots of the
# arcsine vectorise without changing a result (no reassociation, no fast-math); -ffp-contract=off
# rounds every product as ATen's separate ops do (sums of squares agree bit for bit with the ATen
# path, which matters where a cosine rounds to +-1); AVX2/AVX-512 and FMA where PyTorch dispatches
# to them (512-bit vectors: twice the arcsine and exponential throughput of AVX2 on AMD EPYC);
# -fvisibility=hidden exports the C entry points only.
_BASE_FLAGS = (
    "-O3",
    "-std=c++20",  # as PyTorch builds its extensions (its headers use C++20)
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=off",
    "-fvisibility=hidden",
)
_AVX2_FLAGS = ("-mavx2", "-mfma")
_AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mprefer-vector-width=512")
_CXX_ENV = "CXX"
# A build takes 15-30 s (most of it PyTorch's headers); a compiler that hangs must not hang the first
# layer call for good.
_BUILD_TIMEOUT_S = 300
# The kernels' source, package data beside this module.
SOURCE_FILE = "csrc/cpu_kernels.cpp"


@functools.lru_cache(maxsize=1)
def source() -> str:
    """The C++ source of the kernels (read once per process)."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


_library: ctypes.CDLL | None = None
# The library's PyTorch operators (torch.ops.<namespace>), set by a successful load.
_ops = None
# The name of sphere_conv's autograd node (``grad_fn.name()`` of its output).
AUTOGRAD_NODE = "torch::autograd::CppNode<sphereconv::SphereConvFunction>"
_load_error: str | None = None
_tried = False
# How the library was obtained: "built in X s" or "loaded from the cache", for kernel_status().
build_note = ""


def _compiler() -> str | None:
    return os.environ.get(_CXX_ENV) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _flags() -> tuple[str, ...]:
    capability = torch.backends.cpu.get_cpu_capability()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return _BASE_FLAGS + {"AVX2": _AVX2_FLAGS, "AVX512": _AVX512_FLAGS}.get(capability, ()) + (abi,)


def _torch_build_flags() -> list[str]:
    """PyTorch's headers and libraries, where its wheels put them (as torch.utils.cpp_extension finds
    them for a CPU build; that module needs setuptools, this does not): the operator at the end of the
    source uses them."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    return [
        f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-L{lib}",
        f"-Wl,-rpath,{lib}",
        "-ltorch",
        "-ltorch_cpu",
        "-lc10",
    ]


def _build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` (as for PyTorch's own extensions), else PyTorch's default root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "sphereconv_cpu_kernels"


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in ("f32", "f64"):
        getattr(lib, f"sphereconv_backward_{suffix}").argtypes = (
            [ptr] * 5
            + [i64]
            + [ptr] * 4
            + [i64] * 4
            + [
                i32,
                f64,
                f64,
                i32,
            ]
        )
        getattr(lib, f"sphereconv_channel_sq_sum_{suffix}").argtypes = [ptr] * 2 + [i64] * 4 + [i32]
        getattr(lib, f"sphereconv_sample_stats_{suffix}").argtypes = [ptr] * 4 + [i64] * 4 + [f64, f64, i32]
        getattr(lib, f"sphereconv_normalized_forward_{suffix}").argtypes = (
            [ptr] * 5 + [f64, ptr, i64] + [ptr] * 3 + [i64] * 4 + [i32] * 2
        )
        getattr(lib, f"sphereconv_input_backward_{suffix}").argtypes = [ptr] * 6 + [f64] + [i64] * 3 + [ptr, i32]
        getattr(lib, f"sphereconv_filter_unit_{suffix}").argtypes = [ptr] * 5 + [i64] * 2 + [f64] * 3
        getattr(lib, f"sphereconv_filter_unit_backward_{suffix}").argtypes = [ptr] * 5 + [i64] * 2 + [f64]
        for name in ("backward", "channel_sq_sum", "normalized_forward", "input_backward", "filter_unit_backward"):
            getattr(lib, f"sphereconv_{name}_{suffix}").restype = None
        for name in ("sample_stats", "filter_unit"):
            getattr(lib, f"sphereconv_{name}_{suffix}").restype = i32


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library; raises on any failure."""
    global build_note
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (g++, c++ or clang++ on PATH, or $CXX)")
    flags = _flags()
    key = hashlib.sha256("\n".join([source(), compiler, *flags, torch.__version__]).encode()).hexdigest()[:16]
    # the operators' namespace: one per build, as a process may load two (a test's other compiler)
    namespace = f"sphereconv_cpu_{key}"
    root = _build_root()
    path = root / f"sphereconv_epilogue_{key}.so"
    if path.exists():
        build_note = f"loaded from {path}"
    else:
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            source_path = Path(tmp) / "sphereconv_epilogue.cpp"
            source_path.write_text(source())
            built = Path(tmp) / path.name
            result = subprocess.run(
                [compiler, *flags, f"-DSPHERECONV_OPS={namespace}", str(source_path), "-o", str(built)]
                + _torch_build_flags(),
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
            )
            if result.returncode != 0:
                message = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[0]
                raise RuntimeError(f"{Path(compiler).name} failed: {message[:200]}")
            os.replace(built, path)  # atomic: concurrent processes see the whole file or none
        build_note = f"built in {time.perf_counter() - start:.1f} s into {path}"
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    torch.ops.load_library(str(path))  # (loaded already: this records it and finds the operators)
    global _ops
    _ops = getattr(torch.ops, namespace)
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; None (and :func:`load_error` says why) if they
    cannot be built or loaded. The outcome is kept for the rest of the process."""
    global _library, _load_error, _tried
    if not _tried:
        _tried = True
        try:
            _library = _build()
        except Exception as error:  # noqa: BLE001 - anything at all: the ATen epilogue serves instead
            first_line = str(error).splitlines()[0] if str(error) else ""
            _load_error = f"{type(error).__name__}: {first_line[:200]}"
            _library = None
    return _library


def load_error() -> str | None:
    """Why :func:`load` returned None (None if it has not, or has not been called)."""
    return _load_error


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the dispatch when ``t`` has that dtype already (a layer call makes about
    twenty such conversions, nearly all no-ops; the fused path uses this too)."""
    return t if t.dtype == dtype else t.to(dtype)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(t: Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


# Values per block of the arcsine (kArcsineBlock in the source), for the tests.
KERNEL_ARCSINE_BLOCK = 256

# Elements below which a kernel runs on one thread: ATen's grain size for its own parallel loops
# (at::internal::GRAIN_SIZE); waking a team costs more than it saves on less work.
_GRAIN_SIZE = 32768


def _threads(work: Tensor) -> int:
    return 1 if work.numel() < _GRAIN_SIZE else max(1, torch.get_num_threads())


def _k_values(operator: str, k, like: Tensor) -> tuple[Tensor | None, int]:
    """The sigmoids' k as the kernels read it: ``(values, stride)``, one value per channel (stride 1)
    or one for all (stride 0), in the dtype of ``like``; ``(None, 0)`` for the other operators."""
    if OPERATOR_CODES[operator] != 2:
        return None, 0
    if not isinstance(k, Tensor):
        return fixed_k(float(k), like.dtype), 0
    if k.dtype != like.dtype or not k.is_contiguous():
        k = k.detach().to(like.dtype).contiguous()
    return k, int(k.numel() > 1)  # (read through its pointer: no detach needed)


@functools.lru_cache(maxsize=64)
def fixed_k(k: float, dtype: torch.dtype) -> Tensor:
    """A fixed k as a one-value tensor, made once per (k, dtype) (never written to)."""
    return torch.full((1,), k, dtype=dtype)


def _dims(t: Tensor, groups: int) -> tuple[int, int, int, int]:
    return t.shape[0], t.shape[1], groups, math.prod(t.shape[2:])


def forward_epilogue(
    inner: Tensor,
    r: Tensor | None,
    groups: int,
    operator: str,
    k,
    bias: Tensor | None,
    norms: tuple[Tensor, Tensor, float, tuple[tuple[int, ...], ...]] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(out, extra, r)`` for the contiguous conv output ``inner`` (N, C, *S) of float32/float64,
    which is overwritten with the cosine ``c = inner * r``.

    ``r`` (N, G, *S), the reciprocal patch norms, is given, or ``None`` with ``norms = (sq, peak,
    eps, windows)``: then ``r = 1 / sqrt(sum over each window of sq + eps m^2)`` (a sum below zero
    counts as zero) is computed in the same call from the channels' sum of squares ``sq`` (N, G,
    *S_in, contiguous, the dtype of ``inner``), the largest |x| per sample-group ``peak`` (N, G) and
    the convolution's ``windows`` (kernel, stride, padding, dilation). ``extra`` is
    ``sigmoid(2u)`` for the sigmoids (what :func:`backward_epilogue` reads), else None.
    """
    lib = load()
    n, c, g, s = _dims(inner, groups)
    if norms is None:
        assert r is not None  # given when the norms are not
        r, sq, peak, eps, geometry = r.contiguous(), None, None, 0.0, None
    else:
        sq, peak, eps, windows = norms
        r = torch.empty((n, g, *inner.shape[2:]), dtype=inner.dtype)
        geometry = _windows(tuple(sq.shape[2:]), tuple(inner.shape[2:]), *windows)
        peak = as_dtype(peak, inner.dtype).contiguous()
    op = OPERATOR_CODES[operator]
    out = torch.empty_like(inner)
    extra = torch.empty_like(inner) if op == 2 else None
    k_values, k_stride = _k_values(operator, k, inner)
    if bias is not None:
        bias = as_dtype(bias, inner.dtype).contiguous()
    getattr(lib, f"sphereconv_normalized_forward_{_suffix(inner)}")(
        _ptr(inner),
        _ptr(r),
        _ptr(sq),
        _ptr(peak),
        geometry,
        eps,
        _ptr(k_values),
        k_stride,
        _ptr(bias),
        _ptr(out),
        _ptr(extra),
        n,
        c,
        g,
        s,
        op,
        _threads(inner),
    )
    return out, extra, r


def backward_epilogue(
    grad_out: Tensor,
    cos: Tensor,
    extra: Tensor | None,
    r: Tensor,
    groups: int,
    operator: str,
    k,
    need_k: bool,
    need_bias: bool,
    acos_floor: float,
    acos_cap: float,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(dL/dinner, dL/dsumsq, dL/dk or None, dL/dbias or None)`` from ``dL/dout``, the saved cosine
    ``cos`` (N, C, *S, contiguous) and ``extra`` from :func:`forward_epilogue`; ``dL/dk`` has one
    value per channel (the caller sums a scalar k), ``dL/dbias`` shape (C,)."""
    lib = load()
    n, c, g, s = _dims(cos, groups)
    grad_out = as_dtype(grad_out, cos.dtype).contiguous()
    r = r.contiguous()
    op = OPERATOR_CODES[operator]
    need_k = need_k and op == 2
    d_inner = torch.empty_like(cos)
    d_sq = torch.empty(r.shape, dtype=cos.dtype)
    d_bias = torch.empty(c, dtype=cos.dtype) if need_bias else None
    d_k = torch.empty(c, dtype=cos.dtype) if need_k else None
    k_values, k_stride = _k_values(operator, k, cos)
    getattr(lib, f"sphereconv_backward_{_suffix(cos)}")(
        _ptr(grad_out),
        _ptr(cos),
        _ptr(extra),
        _ptr(r),
        _ptr(k_values),
        k_stride,
        _ptr(d_inner),
        _ptr(d_sq),
        _ptr(d_bias),
        _ptr(d_k),
        n,
        c,
        g,
        s,
        op,
        acos_floor,
        acos_cap,
        _threads(cos),
    )
    return d_inner, d_sq, d_k, d_bias


def channel_sq_sum(input: Tensor, groups: int) -> Tensor:
    """``sum x^2`` over each group's channels of a contiguous float32/float64 (N, C, *S) tensor:
    (N, G, *S), one read of ``x``."""
    lib = load()
    n, c, g, s = _dims(input, groups)
    out = torch.empty((n, groups, *input.shape[2:]), dtype=input.dtype)
    getattr(lib, f"sphereconv_channel_sq_sum_{_suffix(input)}")(_ptr(input), _ptr(out), n, c, g, s, _threads(input))
    return out


def sample_stats(input: Tensor, groups: int, direct_range: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, bool]:
    """One read of a contiguous float32/float64 input (N, C, *S): ``(sum x^2 over each group's
    channels (N, G, *S), the largest |x| per sample-group (N, G), its sign (+1/-1, 0 for an all-zero
    sample-group), whether every largest |x| lies in direct_range)``."""
    lib = load()
    n, c, g, s = _dims(input, groups)
    sq = torch.empty((n, groups, *input.shape[2:]), dtype=input.dtype)
    peak = torch.empty((n, groups), dtype=input.dtype)
    sign = torch.empty((n, groups), dtype=input.dtype)
    direct = getattr(lib, f"sphereconv_sample_stats_{_suffix(input)}")(
        _ptr(input), _ptr(sq), _ptr(peak), _ptr(sign), n, c, g, s, *direct_range, _threads(input)
    )
    return sq, peak, sign, bool(direct)


@functools.lru_cache(maxsize=256)
def _windows(
    in_spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> ctypes.Array:
    """The convolution's windows as the kernels read them: 18 int64 (input and output extents,
    kernel, stride, padding, dilation; 1-d and 2-d geometries padded in front to 3-d)."""
    lead = 3 - len(kernel)
    values: list[int] = []
    for part, fill in ((in_spatial, 1), (out_spatial, 1), (kernel, 1), (stride, 1), (padding, 0), (dilation, 1)):
        values += [fill] * lead + [int(v) for v in part]
    return (ctypes.c_int64 * 18)(*values)


def input_backward(
    d_x: Tensor,
    input: Tensor,
    d_sq: Tensor,
    peak: Tensor,
    sign: Tensor,
    scale: Tensor | None,
    eps: float,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> None:
    """In place on the contiguous ``d_x`` (N, C, *S): ``+= 2 x share`` with ``share`` the windows'
    transpose of ``d_sq`` (N, G, *S_out) and, at one largest element of each sample-group,
    ``+= 2 eps m sign sum_positions d_sq``; then times the power-of-two ``scale`` (N, G) of the (then
    rescaled, contiguous) ``input`` if given."""
    lib = load()
    n, c, g, _ = _dims(d_x, d_sq.shape[1])
    d_sq = d_sq.contiguous()
    geometry = _windows(tuple(d_x.shape[2:]), tuple(d_sq.shape[2:]), kernel, stride, padding, dilation)
    getattr(lib, f"sphereconv_input_backward_{_suffix(d_x)}")(
        _ptr(d_x),
        _ptr(input),
        _ptr(d_sq),
        _ptr(peak.contiguous()),
        _ptr(sign.contiguous()),
        _ptr(None if scale is None else scale.contiguous()),
        eps,
        n,
        c,
        g,
        geometry,
        _threads(d_x),
    )


def filter_unit(weight: Tensor, eps: float, direct_range: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(w_hat, |w|_e, signed largest element)`` per row of the contiguous (O, K) ``weight``, or None
    when some row's largest |w| lies outside ``direct_range`` (then it needs rescaling)."""
    lib = load()
    rows, cols = weight.shape
    sum_sq = torch.mul(weight, weight).sum(1)  # as the ATen path sums (see the source)
    w_hat = torch.empty_like(weight)
    norm = torch.empty(rows, dtype=weight.dtype)
    signed_peak = torch.empty(rows, dtype=weight.dtype)
    direct = getattr(lib, f"sphereconv_filter_unit_{_suffix(weight)}")(
        _ptr(weight), _ptr(sum_sq), _ptr(w_hat), _ptr(norm), _ptr(signed_peak), rows, cols, eps, *direct_range
    )
    return (w_hat, norm, signed_peak) if direct else None


def filter_unit_backward(
    d_hat: Tensor, w_hat: Tensor, norm: Tensor, signed_peak: Tensor, scale: Tensor | None, eps: float
) -> Tensor:
    """``dL/dw`` from the contiguous (O, K) ``dL/dw_hat`` (overwritten and returned), times the
    filters' power-of-two ``scale`` (O,) if given."""
    lib = load()
    rows, cols = d_hat.shape
    getattr(lib, f"sphereconv_filter_unit_backward_{_suffix(d_hat)}")(
        _ptr(d_hat), _ptr(w_hat.contiguous()), _ptr(norm), _ptr(signed_peak), _ptr(scale), rows, cols, eps
    )
    return d_hat


def sphere_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    operator: str,
    k: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    eps: float,
    acos_floor: float,
    acos_cap: float,
    direct_range: tuple[float, float],
) -> Tensor | None:
    """The whole fused layer as one operator with its own autograd node (forward: filter norms, input
    statistics, convolution, epilogue; backward: epilogue, convolution backward, norm gradients), or
    None when a largest |value| lies outside ``direct_range`` (then the layer needs rescaling).

    Contiguous CPU ``input`` of float32/float64; ``weight``, ``bias`` and ``k`` (one value or one
    per output channel, None for cosine and linear; gradients flow to it) of the same dtype;
    ``stride``, ``padding``, ``dilation`` checked explicit ints (as :func:`_fused.check_geometry`
    returns them). Call :func:`load` first.
    """
    assert _ops is not None  # loaded (see the docstring)
    code, geometry = OPERATOR_CODES[operator], (stride, padding, dilation, groups)
    return _ops.sphere_conv(input, weight, bias, k, *geometry, code, eps, acos_floor, acos_cap, *direct_range)
