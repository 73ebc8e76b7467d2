"""Layer and training-step benchmarks behind ``sphereconv bench``.

Measures what SphereConv (Liu et al., "Deep Hyperspherical Learning", NIPS 2017, Sec. 2.1) costs
relative to the plain convolution it replaces:

- **layers**: forward + backward (input and weight gradients) of ``SphereConv2d`` for every
  operator against ``nn.Conv2d`` of the same shape, at the SphereNet-9 layer shapes (paper Sec. 5:
  3x3 convolutions of width 128, 192, 256 on 32x32, 16x16, 8x8 maps, batch 128) and one ResNet
  stage shape (batch 64, 256 channels, 56x56);
- **models** (``models=True``): one training step (forward, cross-entropy, backward, Adam step)
  of ``spherenet9`` for every operator against its CNN baseline (``operator="none"``).

All candidates of one shape and dtype run interleaved, round-robin in a rotating order, so that
load from other processes hits them alike; warm-up rounds are excluded and the median of the
remaining rounds is reported. On CUDA every step is timed with CUDA events and the peak memory of
one step is recorded. ``bf16`` runs the forward pass under ``torch.autocast``.

On CPU the default shapes use smaller batches (:data:`CPU_LAYER_SHAPES`), bf16 is timed only on a
CPU with fast bfloat16 units, and the default number of rounds shrinks to a time budget, so that
the whole run takes under three minutes on two cores; the channel and map sizes are the real ones.
Every workload's memory is checked against what the device has free before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .nn import SphereConv2d
from .nn.angular import SPHERE_OPERATORS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MB = 2.0**20


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A 2-d convolution workload: ``batch x in_channels x out_channels x size`` (square maps)."""

    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int = 3
    padding: int = 1

    @property
    def label(self) -> str:
        """``NxCinxCoutxHW``, the notation of the benchmark tables."""
        return f"{self.batch}x{self.in_channels}x{self.out_channels}x{self.size}"


# SphereNet-9 (paper Sec. 5; reference code widths 128/192/256 on 32/16/8 maps, batch 128) and the
# 3x3 layer of a ResNet stage at 56x56 with 256 channels, batch 64.
CUDA_LAYER_SHAPES = (
    LayerShape("spherenet9-stage1", 128, 128, 128, 32),
    LayerShape("spherenet9-stage2", 128, 192, 192, 16),
    LayerShape("spherenet9-stage3", 128, 256, 256, 8),
    LayerShape("resnet-stage", 64, 256, 256, 56),
)
# The same layers on CPU with batch 16 (SphereNet-9) and 2 (ResNet stage): 1/8 and 1/32 of the
# GPU batches, so that every operator, both dtypes and all shapes fit in about two minutes on
# two cores.
CPU_LAYER_SHAPES = (
    LayerShape("spherenet9-stage1", 16, 128, 128, 32),
    LayerShape("spherenet9-stage2", 16, 192, 192, 16),
    LayerShape("spherenet9-stage3", 16, 256, 256, 8),
    LayerShape("resnet-stage", 2, 256, 256, 56),
)
# Training-step batch for --models: the reference recipe's 128 on CUDA, 16 on CPU.
CUDA_MODEL_BATCH = 128
CPU_MODEL_BATCH = 16
# Rounds: warm-up (excluded) and measured; each round runs every candidate once.
CUDA_REPEATS, CPU_REPEATS = 25, 7
DEFAULT_WARMUP = 2
# With the default number of rounds, a CPU run shrinks its rounds (down to MIN_REPEATS) so that the
# whole benchmark stays within this many seconds: `sphereconv bench` on a 2-core machine must
# finish in under 3 minutes, and the remaining minute covers start-up, model building and the
# minimum rounds of a heavily loaded machine.
CPU_TIME_BUDGET_S = 120.0
MIN_REPEATS = 3
# By default bf16 autocast is timed on CPU only where the CPU has AMX tiles for bfloat16
# (/proc/cpuinfo flag ``amx_bf16``), the CPUs bf16 training is meant for; elsewhere it would double
# the run time of a default run that must finish within 3 minutes.
FAST_BF16_CPU_FLAG = "amx_bf16"
# Memory a benchmark may plan to use: this fraction of what the device has free (the rest is left
# to the system and to the allocator's rounding).
MEMORY_FRACTION = 0.8
# Bytes per element of the float32 tensors the layer benchmark holds at once, per input element
# (input, its gradient and the norm's scratch: 3) and per output element (gradient of the output,
# the convolution output, the cosine, g, the gradient of the cosine and the convolution's own
# gradient: 6); a SphereNet-9 training step holds about 8 float32 values per activation element
# (convolution, BatchNorm and ReLU outputs, their gradients and the saved cosine).
BYTES_PER_FLOAT = 4
LAYER_INPUT_COPIES, LAYER_OUTPUT_COPIES = 3, 6
MODEL_ACTIVATION_COPIES = 8
WEIGHT_COPIES = 4  # weight, gradient and Adam's two moments
MODEL_IMAGE_SHAPE = (3, 32, 32)  # CIFAR images, the paper's SphereNet-9 input (Sec. 5)
MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed accepts


@dataclasses.dataclass
class BenchConfig:
    """What :func:`run` measures. ``None`` fields take the device's defaults (``dtypes``: fp32 and
    bf16, without bf16 on a CPU without fast bf16; ``repeats``: shrunk on CPU to the time budget)."""

    device: str = "auto"
    dtypes: Sequence[str] | None = None
    operators: Sequence[str] = SPHERE_OPERATORS
    shapes: Sequence[LayerShape] | None = None
    repeats: int | None = None
    warmup: int = DEFAULT_WARMUP
    models: bool = False
    model_batch: int | None = None
    model_width_mult: float = 1.0
    layers: bool = True
    reference: bool = False
    seed: int = 0
    timer: str = "wall"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 units (flag :data:`FAST_BF16_CPU_FLAG` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return FAST_BF16_CPU_FLAG in line.split()
    except OSError:
        pass
    return False


def default_dtypes(device: torch.device) -> tuple[tuple[str, ...], str | None]:
    """The dtypes timed by default on ``device`` and, when one is left out, a note saying why."""
    if device.type == "cpu" and not cpu_has_fast_bf16():
        return ("fp32",), (
            f"bf16 skipped to keep the run short: this CPU has no AMX bfloat16 units "
            f"({FAST_BF16_CPU_FLAG}); pass --dtypes fp32,bf16 to time it too"
        )
    return ("fp32", "bf16"), None


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free memory, or MemAvailable of /proc/meminfo (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def layer_memory_bytes(shape: LayerShape) -> int:
    """Float32 memory the layer benchmark of ``shape`` holds at once (see :data:`LAYER_OUTPUT_COPIES`)."""
    out_size = shape.size + 2 * shape.padding - shape.kernel + 1
    inputs = shape.batch * shape.in_channels * shape.size**2
    outputs = shape.batch * shape.out_channels * max(out_size, 0) ** 2
    weights = shape.out_channels * shape.in_channels * shape.kernel**2
    return BYTES_PER_FLOAT * (LAYER_INPUT_COPIES * inputs + LAYER_OUTPUT_COPIES * outputs + WEIGHT_COPIES * weights)


def model_memory_bytes(batch: int, width_mult: float) -> int:
    """Float32 memory of one SphereNet-9 training step (activations and Adam state), roughly."""
    from .models.layers import scaled_width
    from .models.spherenet import SPHERENET_STAGE_WIDTHS

    channels, size = MODEL_IMAGE_SHAPE[0], MODEL_IMAGE_SHAPE[1]
    activations = weights = 0
    for base in SPHERENET_STAGE_WIDTHS:
        width = scaled_width(base, width_mult)
        activations += 3 * width * size * size
        weights += 9 * width * (channels + 2 * width)
        channels, size = width, (size + 1) // 2
    return BYTES_PER_FLOAT * (MODEL_ACTIVATION_COPIES * batch * activations + WEIGHT_COPIES * weights)


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB"


def parse_shape(text: str) -> LayerShape:
    """``NxCinxCoutxHW`` (e.g. ``16x128x128x32``) -> :class:`LayerShape` with a 3x3 kernel, padding 1."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise ValueError(f"shape must be NxCinxCoutxHW with four positive integers (e.g. 16x128x128x32); got {text!r}")
    return LayerShape(text, *values)


def check_memory(config: BenchConfig, device: torch.device, shapes: Sequence[LayerShape], model_batch: int) -> None:
    """Raise ``ValueError`` naming the workload and the limit if it cannot fit in ``device``'s free memory."""
    free = available_memory_bytes(device)
    if free is None:
        return
    limit = int(free * MEMORY_FRACTION)
    if config.layers:
        for shape in shapes:
            need = layer_memory_bytes(shape)
            if need > limit:
                raise ValueError(
                    f"shape {shape.label} needs about {_gb(need)}, more than the limit of {_gb(limit)} "
                    f"({MEMORY_FRACTION:.0%} of the {_gb(free)} free on {device.type}); use a smaller NxCinxCoutxHW"
                )
    if config.models:
        need = model_memory_bytes(model_batch, config.model_width_mult)
        if need > limit:
            raise ValueError(
                f"--model-batch {model_batch} at --model-width-mult {config.model_width_mult:g} needs about "
                f"{_gb(need)}, more than the limit of {_gb(limit)} ({MEMORY_FRACTION:.0%} of the {_gb(free)} free "
                f"on {device.type}); use a smaller batch or width"
            )


def _check_config(config: BenchConfig) -> None:
    for d in config.dtypes or ():
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; allowed: {', '.join(DTYPES)}")
    if config.dtypes is not None and not config.dtypes:
        raise ValueError(f"dtypes must name at least one of {', '.join(DTYPES)}")
    if (
        not isinstance(config.model_width_mult, (int, float))
        or not math.isfinite(config.model_width_mult)
        or config.model_width_mult <= 0
    ):
        raise ValueError(f"model_width_mult must be a positive finite number; got {config.model_width_mult!r}")
    if config.model_batch is not None and config.model_batch < 1:
        raise ValueError(f"model_batch must be at least 1; got {config.model_batch}")
    if not 0 <= config.seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED} (torch.manual_seed's range); got {config.seed}")
    for op in config.operators:
        if op not in SPHERE_OPERATORS:
            raise ValueError(f"unknown operator {op!r}; allowed: {', '.join(SPHERE_OPERATORS)}")
    if config.repeats is not None and config.repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {config.repeats}")
    if config.warmup < 0:
        raise ValueError(f"warmup must be non-negative; got {config.warmup}")
    if config.timer not in TIMERS:
        raise ValueError(f"timer must be one of {', '.join(TIMERS)}; got {config.timer!r}")
    if not config.layers and not config.models:
        raise ValueError("nothing to measure: enable layers or models")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


TIMERS = ("wall", "cpu")


class _Timer:
    """Times one call: CUDA events on a GPU (read after the round); on CPU wall-clock time
    (``perf_counter``) or, with ``clock="cpu"``, the CPU time of the process (``process_time``,
    all threads), which time spent waiting for a core on a loaded machine does not inflate."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        if clock not in TIMERS:
            raise ValueError(f"timer must be one of {', '.join(TIMERS)}; got {clock!r}")
        self.cuda = device.type == "cuda"
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.pending: list[tuple[str, object, object]] = []

    def time(self, name: str, fn: Callable[[], None], out: dict[str, list[float]]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((name, start, end))
        else:
            t0 = self.clock()
            fn()
            out[name].append((self.clock() - t0) * 1e3)

    def flush(self, out: dict[str, list[float]]) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.pending:
                out[name].append(start.elapsed_time(end))  # type: ignore[attr-defined]
        self.pending.clear()


def interleaved_medians(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    warmup: int,
    timer: str = "wall",
    budget_s: float | None = None,
) -> dict[str, float]:
    """Median milliseconds per step of every candidate, run round-robin in a rotating order.

    With ``budget_s``, measured rounds stop early (after at least :data:`MIN_REPEATS`) when the
    next round would end past ``budget_s`` seconds of wall-clock time from the start.
    """
    samples = interleaved_samples(steps, device, repeats, warmup, timer, budget_s)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_samples(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    warmup: int,
    timer: str = "wall",
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """The milliseconds of every measured round of every candidate (see :func:`interleaved_medians`)."""
    clock = _Timer(device, timer)
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for round_index in range(warmup + repeats):
        measured = round_index - warmup
        if budget_s is not None and measured >= MIN_REPEATS:
            elapsed = time.perf_counter() - start
            if elapsed + elapsed / round_index > budget_s:
                break
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        round_samples: dict[str, list[float]] = {n: [] for n in names}
        for name in order:
            clock.time(name, steps[name], round_samples)
        clock.flush(round_samples)
        if round_index >= warmup:
            for name in names:
                samples[name].extend(round_samples[name])
    return samples


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak CUDA memory of one step above what was allocated before it (``device`` must be CUDA)."""
    if device.type != "cuda":
        raise ValueError(f"peak memory is measured on CUDA devices only; got {device}")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MB


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


# ----------------------------------------------------------------------------------------------
# Layer benchmark
# ----------------------------------------------------------------------------------------------


def _layer_step(
    layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, device: torch.device, dtype: str, impl: str | None = None
) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]
    grads_by_dtype: dict[torch.dtype, torch.Tensor] = {}  # cast once, outside the timed region

    def step() -> None:
        with _autocast(device, dtype):
            if impl == "reference":
                from .nn.functional import use_reference_impl

                with use_reference_impl():
                    out = layer(x)
            else:
                out = layer(x)
        if out.dtype not in grads_by_dtype:
            grads_by_dtype[out.dtype] = grad_out.to(out.dtype)
        torch.autograd.grad(out, [x, *params], grads_by_dtype[out.dtype])

    return step


def _medians(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    warmup: int,
    timer: str,
    budget_s: float | None,
) -> tuple[dict[str, float], int]:
    samples = interleaved_samples(steps, device, repeats, warmup, timer, budget_s)
    return {name: statistics.median(values) for name, values in samples.items()}, len(next(iter(samples.values())))


def bench_layers(
    shape: LayerShape,
    dtype: str,
    operators: Sequence[str],
    device: torch.device,
    repeats: int,
    warmup: int,
    reference: bool = False,
    seed: int = 0,
    timer: str = "wall",
    budget_s: float | None = None,
) -> list[dict]:
    """Records for one shape and dtype: every operator against ``nn.Conv2d``, interleaved (rounds
    shrunk to ``budget_s`` seconds, see :func:`interleaved_medians`)."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(kernel_size=shape.kernel, padding=shape.padding, bias=False, device=device)
    conv = nn.Conv2d(shape.in_channels, shape.out_channels, **kwargs)
    x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, device=device, requires_grad=True)
    out_size = shape.size + 2 * shape.padding - shape.kernel + 1
    grad_out = torch.randn(shape.batch, shape.out_channels, out_size, out_size, device=device)
    steps = {"conv": _layer_step(conv, x, grad_out, device, dtype)}
    for op in operators:
        layer = SphereConv2d(shape.in_channels, shape.out_channels, operator=op, **kwargs)
        layer.weight.data.copy_(conv.weight.data)
        steps[op] = _layer_step(layer, x, grad_out, device, dtype)
        if reference:
            steps[op + "/reference"] = _layer_step(layer, x, grad_out, device, dtype, impl="reference")
    medians, repeats = _medians(steps, device, repeats, warmup, timer, budget_s)
    peaks = {name: peak_memory_mb(step, device) for name, step in steps.items()} if device.type == "cuda" else {}
    records = []
    for op in operators:
        record = {
            "kind": "layer",
            "operator": op,
            "shape": shape.label,
            "shape_name": shape.name,
            "batch": shape.batch,
            "in_channels": shape.in_channels,
            "out_channels": shape.out_channels,
            "size": shape.size,
            "kernel": shape.kernel,
            "dtype": dtype,
            "device": device.type,
            "conv_ms": round(medians["conv"], 4),
            "sphere_ms": round(medians[op], 4),
            "ratio": round(medians[op] / medians["conv"], 4),
            "repeats": repeats,
            "timer": "cuda_events" if device.type == "cuda" else timer,
        }
        if reference:
            record["reference_ms"] = round(medians[op + "/reference"], 4)
            record["reference_ratio"] = round(medians[op + "/reference"] / medians["conv"], 4)
        if peaks:
            record["conv_peak_mb"] = round(peaks["conv"], 2)
            record["sphere_peak_mb"] = round(peaks[op], 2)
            if reference:
                record["reference_peak_mb"] = round(peaks[op + "/reference"], 2)
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------
# Training-step benchmark
# ----------------------------------------------------------------------------------------------


def _train_step(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, dtype: str
) -> Callable[[], None]:
    # Adam, as in the reference recipe (paper Sec. 5, wy1iu/SphereNet).
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def bench_models(
    dtype: str,
    operators: Sequence[str],
    device: torch.device,
    batch: int,
    repeats: int,
    warmup: int,
    width_mult: float = 1.0,
    seed: int = 0,
    model: str = "spherenet9",
    timer: str = "wall",
    budget_s: float | None = None,
) -> list[dict]:
    """Records of one training step of ``model`` per operator against its CNN baseline, interleaved."""
    from .models import create_model

    torch.manual_seed(seed)
    images = torch.randn(batch, *MODEL_IMAGE_SHAPE, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for op in ("none", *operators):
        net = create_model(model, operator=op, width_mult=width_mult).to(device)
        steps[op] = _train_step(net, images, labels, device, dtype)
    medians, repeats = _medians(steps, device, repeats, warmup, timer, budget_s)
    peaks = {name: peak_memory_mb(step, device) for name, step in steps.items()} if device.type == "cuda" else {}
    records = []
    for op in operators:
        record = {
            "kind": "model",
            "model": model,
            "operator": op,
            "shape": "x".join(map(str, (batch, *MODEL_IMAGE_SHAPE))),
            "batch": batch,
            "width_mult": width_mult,
            "dtype": dtype,
            "device": device.type,
            "conv_ms": round(medians["none"], 4),
            "sphere_ms": round(medians[op], 4),
            "ratio": round(medians[op] / medians["none"], 4),
            "conv_images_per_s": round(batch / medians["none"] * 1e3, 2),
            "sphere_images_per_s": round(batch / medians[op] * 1e3, 2),
            "images_per_s_ratio": round(medians["none"] / medians[op], 4),
            "repeats": repeats,
            "timer": "cuda_events" if device.type == "cuda" else timer,
        }
        if peaks:
            record["conv_peak_mb"] = round(peaks["none"], 2)
            record["sphere_peak_mb"] = round(peaks[op], 2)
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------
# Driver, table, JSON
# ----------------------------------------------------------------------------------------------


def machine_description(device: torch.device) -> dict:
    """Where the numbers come from: CPU model and threads, GPU name, library versions."""
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_conv"] = bool(torch.backends.cudnn.allow_tf32)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def validate(config: BenchConfig) -> tuple[torch.device, Sequence[LayerShape], int]:
    """Check every value of ``config`` and the memory of every workload (``ValueError`` naming the
    bad value and what is allowed); returns the device, the layer shapes and the model batch."""
    _check_config(config)
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    shapes = config.shapes if config.shapes is not None else (CUDA_LAYER_SHAPES if cuda else CPU_LAYER_SHAPES)
    model_batch = config.model_batch or (CUDA_MODEL_BATCH if cuda else CPU_MODEL_BATCH)
    check_memory(config, device, shapes, model_batch)
    return device, shapes, model_batch


def run(
    config: BenchConfig, progress: Callable[[str], None] | None = None, notes: list[str] | None = None
) -> list[dict]:
    """Run the benchmarks of ``config``; returns one record (dict) per measurement.

    Everything is validated (including the memory each workload needs) before anything is
    allocated. What the run left out or shrunk for the hardware is appended to ``notes``.
    """
    device, shapes, model_batch = validate(config)
    cuda = device.type == "cuda"
    notes = notes if notes is not None else []
    dtypes = config.dtypes
    if dtypes is None:
        dtypes, note = default_dtypes(device)
        if note:
            notes.append(note)
    repeats = config.repeats or (CUDA_REPEATS if cuda else CPU_REPEATS)
    budget = CPU_TIME_BUDGET_S if config.repeats is None and not cuda else None
    machine = machine_description(device)
    stamp = {key: machine[key] for key in ("torch", "threads", "gpu", "tf32_conv", "cpu") if key in machine}
    if cuda:
        stamp.pop("cpu")
    blocks: list[tuple[LayerShape | None, str]] = []
    if config.layers:
        blocks += [(shape, dtype) for shape in shapes for dtype in dtypes]
    if config.models:
        blocks += [(None, dtype) for dtype in dtypes]
    records: list[dict] = []
    start = time.perf_counter()
    for index, (shape, dtype) in enumerate(blocks):
        share = None
        if budget is not None:  # an equal share of what is left of the budget
            share = max(0.0, budget - (time.perf_counter() - start)) / (len(blocks) - index)
        if shape is not None:
            if progress:
                progress(f"layer {shape.label} {dtype}")
            block = bench_layers(
                shape,
                dtype,
                config.operators,
                device,
                repeats,
                config.warmup,
                config.reference,
                config.seed,
                config.timer,
                share,
            )
        else:
            if progress:
                progress(f"model spherenet9 batch {model_batch} {dtype}")
            block = bench_models(
                dtype,
                config.operators,
                device,
                model_batch,
                repeats,
                config.warmup,
                config.model_width_mult,
                config.seed,
                timer=config.timer,
                budget_s=share,
            )
        if block and block[0]["repeats"] < repeats:
            what = f"layer {shape.label}" if shape is not None else f"model batch {model_batch}"
            notes.append(
                f"{what} {dtype}: {block[0]['repeats']} of {repeats} rounds, to stay within the CPU time "
                f"budget of {CPU_TIME_BUDGET_S:.0f} s (pass --repeats to measure them all)"
            )
        records += block
    return [{**record, **stamp} for record in records]


def format_table(records: Iterable[dict]) -> str:
    """A fixed-width text table of the records (ratios are SphereConv / plain convolution)."""
    records = list(records)
    has_ref = any("reference_ms" in r for r in records)
    has_peak = any("sphere_peak_mb" in r for r in records)
    header = ["kind", "shape", "dtype", "operator", "conv ms", "sphere ms", "ratio"]
    if has_ref:
        header += ["reference ms", "ref ratio"]
    if has_peak:
        header += ["conv MB", "sphere MB"]
    rows = [header]
    for r in records:
        row = [
            r["kind"],
            r["shape"],
            r["dtype"],
            r["operator"],
            f"{r['conv_ms']:.2f}",
            f"{r['sphere_ms']:.2f}",
            f"{r['ratio']:.2f}x",
        ]
        if has_ref:
            row += [
                f"{r['reference_ms']:.2f}" if "reference_ms" in r else "-",
                f"{r['reference_ratio']:.2f}x" if "reference_ratio" in r else "-",
            ]
        if has_peak:
            row += [f"{r.get('conv_peak_mb', math.nan):.1f}", f"{r.get('sphere_peak_mb', math.nan):.1f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i >= 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(records: list[dict], path: str) -> None:
    """Write the list of records as JSON (indent 1), atomically: an interrupted or failed write
    leaves ``path`` as it was, never a truncated file."""
    from .engine.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(records, indent=1) + "\n")


__all__ = [
    "BenchConfig",
    "LayerShape",
    "CPU_LAYER_SHAPES",
    "CUDA_LAYER_SHAPES",
    "run",
    "bench_layers",
    "bench_models",
    "interleaved_medians",
    "interleaved_samples",
    "peak_memory_mb",
    "format_table",
    "write_json",
    "parse_shape",
    "resolve_device",
    "machine_description",
    "default_dtypes",
    "cpu_has_fast_bf16",
    "check_memory",
    "validate",
]
