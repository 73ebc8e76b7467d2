"""``sphereconv selftest``: check an installation on the user's own hardware.

SphereConv (Liu et al., "Deep Hyperspherical Learning", NIPS 2017, Sec. 2.1) has two
implementations in :mod:`sphereconv.nn.functional`: the fused one that every layer uses by default
(ATen epilogue on CPU, Triton kernels on CUDA) and the unfused reference composition of ATen ops.
The self-test runs every operator and layer type (1-d/2-d/3-d convolutions, linear, learnable k,
groups, stride, dilation and every padding mode) through the default path, forward and backward,
in every dtype the device supports, and compares the output and all gradients with the reference
path computed in float64 on the same (rounded) inputs and weights. It names the kernel path each
case took, then trains a tiny SphereNet-9 (paper Sec. 5) for a few steps on one fixed batch and
checks that the loss decreases.

Errors are relative: ``max |got - truth| / max |truth|`` per tensor, the largest over the output
and every gradient. Modes: float64, float32 (TF32 off), bfloat16 where the device runs it and
bf16 autocast; on CUDA also float16, TF32 and fp16 autocast.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import (
    SPHERE_OPERATORS,
    SphereConv1d,
    SphereConv2d,
    SphereConv3d,
    SphereLinear,
    _cpu_kernels,
    _fused,
    kernel_status,
)
from .nn.functional import use_reference_impl

# Relative tolerances against the float64 reference. float64: rounding (2^-53 = 1.1e-16) over the
# same sums, with the same wide margin as float32. float32: the epilogue's arccos derivative
# (at most ~1e2 on these inputs) times float32 rounding (2^-24) over sums of a few dozen terms,
# with a wide margin (observed errors are below 1e-5). bfloat16 / float16 keep 8 / 11 significant
# bits (relative rounding 2^-8 = 3.9e-3 / 2^-11 = 4.9e-4 per value); sums of a few dozen rounded
# products and their gradients stay within a few percent (bfloat16) / a few tenths of a percent
# (float16) of the largest value, as in tests/nn/test_fused.py. TF32 (CUDA's default for float32
# convolutions) keeps float16's 10 stored mantissa bits but rounds the inputs of every product; the
# same 2e-2 as benchmarks/gpu_check.py. The float32 rows run with TF32 off: they check the kernels.
TOLERANCES = {
    "float64": 1e-12,
    "float32": 1e-4,
    "bfloat16": 5e-2,
    "float16": 1e-2,
    "tf32": 2e-2,
    "autocast-bfloat16": 5e-2,
    "autocast-float16": 1e-2,
}
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "tf32": torch.float32,
}

# Tiny SphereNet-9 training check: width 1/8 of the reference widths (16/24/32 channels), one fixed
# batch of 32 images, Adam at the reference recipe's learning rate (paper Sec. 5).
TRAIN_WIDTH_MULT = 0.125
TRAIN_BATCH = 32
TRAIN_STEPS = 8
TRAIN_LR = 1e-3

PASS, FAIL, SKIP = "ok", "FAIL", "skipped"


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer to check: a builder of the module (float32, on CPU) and the input shape."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


@dataclasses.dataclass
class Result:
    """One row of the self-test table."""

    case: str
    dtype: str
    path: str
    error: float | None
    tolerance: float | None
    status: str
    note: str = ""


def layer_cases(operators: Sequence[str] = SPHERE_OPERATORS) -> list[LayerCase]:
    """Every layer type for every operator, and every 2-d geometry option for every operator."""
    cases: list[LayerCase] = []

    def add(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
        cases.append(LayerCase(name, build, shape))

    for op in operators:
        add(f"conv1d/{op}", partial(SphereConv1d, 3, 5, 3, padding=1, bias=True, operator=op), (2, 3, 9))
        add(f"conv2d/{op}", partial(SphereConv2d, 3, 5, 3, padding=1, bias=True, operator=op), (2, 3, 7, 7))
        add(f"conv3d/{op}", partial(SphereConv3d, 2, 3, 3, padding=1, bias=True, operator=op), (2, 2, 5, 5, 5))
        add(f"linear/{op}", partial(SphereLinear, 12, 5, bias=True, operator=op), (4, 12))
        add(f"conv2d-groups2/{op}", partial(SphereConv2d, 4, 6, 3, padding=1, groups=2, operator=op), (2, 4, 7, 7))
        add(f"conv2d-stride2/{op}", partial(SphereConv2d, 3, 5, 3, stride=2, padding=1, operator=op), (2, 3, 8, 8))
        add(f"conv2d-dilation2/{op}", partial(SphereConv2d, 3, 5, 3, padding=2, dilation=2, operator=op), (2, 3, 8, 8))
        for mode in ("reflect", "replicate", "circular"):
            add(
                f"conv2d-{mode}/{op}",
                partial(SphereConv2d, 3, 5, 3, padding=1, padding_mode=mode, operator=op),
                (2, 3, 6, 6),
            )
    return cases


def device_dtypes(device: torch.device) -> list[str]:
    """The dtypes to check on ``device``: storage dtypes it computes in, then autocast."""
    names = ["float64", "float32"]
    if _dtype_works(device, torch.bfloat16):
        names.append("bfloat16")
    if device.type == "cuda":
        names += ["float16", "tf32"]
    names.append("autocast-bfloat16")
    if device.type == "cuda":
        names.append("autocast-float16")
    return names


def _dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a convolution and its backward run in ``dtype`` on ``device`` at all."""
    try:
        x = torch.randn(1, 2, 4, 4, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 2, 3, 3, device=device, dtype=dtype, requires_grad=True)
        F.conv2d(x, w, padding=1).sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA convolutions and matrix products on or off inside the block."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _autocast(device: torch.device, dtype_name: str):
    if dtype_name.startswith("autocast-"):
        return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name.split("-", 1)[1]])
    return contextlib.nullcontext()


def _storage_dtype(dtype_name: str) -> torch.dtype:
    return torch.float32 if dtype_name.startswith("autocast-") else DTYPES[dtype_name]


def _gradients(module: nn.Module, x: Tensor, out: Tensor, grad_out: Tensor) -> list[Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(out, [x, *params], grad_out.to(out.dtype)))


def relative_error(got: Tensor, truth: Tensor) -> float:
    """``max |got - truth| / max |truth|`` in float64 (inf if ``got`` is not finite)."""
    got64, truth64 = got.detach().to(torch.float64).cpu(), truth.detach().to(torch.float64).cpu()
    if got64.shape != truth64.shape:
        return math.inf
    if not torch.isfinite(got64).all():
        return math.inf
    return float((got64 - truth64).abs().max() / truth64.abs().max().clamp_min(1e-30))


def _kernel_cases() -> list[dict]:
    return list(kernel_status()["cases"])


def kernel_path(module: nn.Module, x: Tensor, out: Tensor, conv_dtype: torch.dtype | None = None) -> str:
    """Which implementation produced ``out``: the fused node with the Triton, C++ (CPU) or ATen
    epilogue (``fused-aten*``: Triton could run but this case fell back to ATen), or the reference
    path. ``conv_dtype``: the dtype the convolution ran in (autocast's), if not ``x``'s."""
    grad_fn = out.grad_fn.name() if out.grad_fn is not None else ""
    if grad_fn == _cpu_kernels.AUTOGRAD_NODE:
        return "fused-cpp"  # the whole layer as the C++ operator
    if not grad_fn.startswith("_Fused"):
        return "reference"
    if isinstance(module, SphereLinear):
        return "fused-aten"  # SphereLinear's epilogue is ATen on every device
    probe = torch.empty(0, device=x.device, dtype=_fused.compute_dtype(x.dtype))
    backend = kernel_status()["backend"]
    if backend == "aten":
        return "fused-aten"
    if not _fused._use_triton(probe):
        cpp = conv_dtype is None and x.dtype == probe.dtype and _fused._cpp_selected(x.contiguous(), probe.dtype)
        return "fused-cpp" if cpp else "fused-aten"
    if backend == "cpp":  # Triton could run here, but this backend means ATen wherever the C++ kernels cannot
        return "fused-aten"
    operator = getattr(module, "operator", "")
    dtypes = {str(conv_dtype or x.dtype).removeprefix("torch.")}
    for case in _kernel_cases():
        if (
            case["operator"] == operator
            and case["dtype"] in dtypes
            and case["kernels"] == "aten"
            and case["device"].startswith(x.device.type)
        ):
            return "fused-aten*"
    return "fused-triton"


def kernel_summary() -> list[str]:
    """Lines naming the kernel backend in force, every case that fell back from Triton to ATen and,
    once a CPU convolution has decided it, the CPU epilogue (C++ kernels or ATen, and why)."""
    info = kernel_status()
    cases = info["cases"]
    triton = [c for c in cases if c["kernels"] == "triton"]
    fallen = [c for c in cases if c["kernels"] == "aten"]
    lines = [
        f"kernels: backend {info['backend']}, Triton {'installed' if info['triton_installed'] else 'not installed'}; "
        f"{len(triton)} Triton-capable case(s) on Triton, {len(fallen)} fell back to ATen"
    ]
    lines += [f"  fell back: {c['operator']} {c['dtype']} {c['device']}: {c['note']}" for c in fallen]
    cpu_kernels = info.get("cpu_kernels", "undecided")
    if cpu_kernels != "undecided":  # the epilogue of contiguous float32/float64 CPU convolutions, and why
        note = f": {info['cpu_note']}" if info.get("cpu_note") else ""
        lines.append(f"  CPU: {'C++ kernels' if cpu_kernels == 'cpp' else 'ATen epilogue'}{note}")
    return lines


def check_layer(case: LayerCase, dtype_name: str, device: torch.device, seed: int = 0) -> Result:
    """Default path in ``dtype_name`` against the float64 reference path, forward and backward."""
    tolerance = TOLERANCES[dtype_name]
    try:
        torch.manual_seed(seed)
        storage = _storage_dtype(dtype_name)
        module = case.build().to(device=device, dtype=storage)
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(case.input_shape, generator=gen).to(device=device, dtype=storage).requires_grad_()
        with _tf32(dtype_name == "tf32"):
            with _autocast(device, dtype_name):
                out = module(x)
            conv_dtype = DTYPES[dtype_name.split("-", 1)[1]] if dtype_name.startswith("autocast-") else None
            path = kernel_path(module, x, out, conv_dtype)
            grad_out = torch.randn(out.shape, generator=gen).to(device)
            grads = _gradients(module, x, out, grad_out)
        truth_module = copy.deepcopy(module).to(torch.float64)
        x64 = x.detach().to(torch.float64).requires_grad_()
        with use_reference_impl():
            truth_out = truth_module(x64)
        truth_grads = _gradients(truth_module, x64, truth_out, grad_out.to(torch.float64))
        error = max(relative_error(a, b) for a, b in zip([out, *grads], [truth_out, *truth_grads]))
    except Exception as exc:  # any failure of the installation is a failed check, reported in one line
        message = " ".join(str(exc).split())[:160]
        return Result(case.name, dtype_name, "-", None, tolerance, FAIL, f"{type(exc).__name__}: {message}")
    status = PASS if error <= tolerance else FAIL
    return Result(case.name, dtype_name, path, error, tolerance, status)


def _training_batch(device: torch.device) -> tuple[Tensor, Tensor, str]:
    """A fixed batch of real Fashion-MNIST test images if installed, else random images."""
    from .data import load_dataset, normalize_pixels
    from .errors import DatasetError

    try:
        images, labels = load_dataset("fashion-mnist", "test", progress=False)
    except (DatasetError, OSError, ValueError):
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(TRAIN_BATCH, 1, 28, 28, generator=gen)
        labels = torch.randint(0, 10, (TRAIN_BATCH,), generator=gen)
        return images.to(device), labels.to(device), "random images (Fashion-MNIST not found)"
    return (
        normalize_pixels(images[:TRAIN_BATCH]).to(device),
        labels[:TRAIN_BATCH].to(device),
        f"Fashion-MNIST test images 0-{TRAIN_BATCH - 1}",
    )


def check_training(device: torch.device, operator: str = "cosine", seed: int = 0) -> tuple[Result, list[float]]:
    """A few Adam steps of a tiny SphereNet-9 on one fixed batch: the loss must decrease."""
    from .models import create_model

    name = f"spherenet9-w{TRAIN_WIDTH_MULT:g}/train-{TRAIN_STEPS}-steps/{operator}"
    losses: list[float] = []
    try:
        images, labels, source = _training_batch(device)
        torch.manual_seed(seed)
        model = create_model(
            "spherenet9",
            operator=operator,
            width_mult=TRAIN_WIDTH_MULT,
            in_channels=1,
            image_size=tuple(images.shape[-2:]),
        ).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
        model.train()
        for _ in range(TRAIN_STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    except Exception as exc:
        message = " ".join(str(exc).split())[:160]
        return Result(name, "float32", "-", None, None, FAIL, f"{type(exc).__name__}: {message}"), losses
    decreased = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    note = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} on {source}"
    return Result(name, "float32", "fused", None, None, PASS if decreased else FAIL, note), losses


def run(
    device: torch.device,
    operators: Sequence[str] = SPHERE_OPERATORS,
    dtypes: Sequence[str] | None = None,
    train: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Every layer case in every dtype of ``device`` (or ``dtypes``), then the training check."""
    results: list[Result] = []
    available = device_dtypes(device)
    for dtype_name in dtypes if dtypes is not None else available:
        if dtype_name not in available:
            results.append(
                Result(
                    "all layers",
                    dtype_name,
                    "-",
                    None,
                    TOLERANCES[dtype_name],
                    SKIP,
                    f"{dtype_name} does not run on this {device.type} device",
                )
            )
            continue
        if progress:
            progress(f"layers in {dtype_name}")
        results += [check_layer(case, dtype_name, device) for case in layer_cases(operators)]
    if train:
        if progress:
            progress("SphereNet-9 training steps")
        results.append(check_training(device)[0])
    return results


def format_table(results: Sequence[Result]) -> str:
    """Fixed-width table: case, dtype, path, max error, tolerance, status, note."""
    rows = [["case", "dtype", "path", "max error", "tolerance", "status", "note"]]
    for r in results:
        rows.append(
            [
                r.case,
                r.dtype,
                r.path,
                "-" if r.error is None else f"{r.error:.2e}",
                "-" if r.tolerance is None else f"{r.tolerance:.0e}",
                r.status,
                r.note,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failures(results: Sequence[Result]) -> list[Result]:
    """The failed rows."""
    return [r for r in results if r.status == FAIL]


__all__ = [
    "TOLERANCES",
    "LayerCase",
    "Result",
    "layer_cases",
    "device_dtypes",
    "check_layer",
    "check_training",
    "run",
    "format_table",
    "failures",
    "relative_error",
    "kernel_path",
    "kernel_summary",
]
