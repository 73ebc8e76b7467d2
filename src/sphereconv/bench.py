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

On CPU the default shapes use smaller batches (:data:`CPU_LAYER_SHAPES`) so that the whole run
takes a couple of minutes on two cores; the channel and map sizes are the real ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from typing import Callable, Iterable, Sequence

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


@dataclasses.dataclass
class BenchConfig:
    """What :func:`run` measures. ``None`` fields take the device's defaults."""

    device: str = "auto"
    dtypes: Sequence[str] = ("fp32", "bf16")
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
    return device


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


def _check_config(config: BenchConfig) -> None:
    for d in config.dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; allowed: {', '.join(DTYPES)}")
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


def interleaved_medians(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int,
                        warmup: int, timer: str = "wall") -> dict[str, float]:
    """Median milliseconds per step of every candidate, run round-robin in a rotating order."""
    clock = _Timer(device, timer)
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        round_samples: dict[str, list[float]] = {n: [] for n in names}
        for name in order:
            clock.time(name, steps[name], round_samples)
        clock.flush(round_samples)
        if round_index >= warmup:
            for name in names:
                samples[name].extend(round_samples[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak CUDA memory of one step above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
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


def _layer_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, device: torch.device, dtype: str,
                impl: str | None = None) -> Callable[[], None]:
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


def bench_layers(shape: LayerShape, dtype: str, operators: Sequence[str], device: torch.device, repeats: int,
                 warmup: int, reference: bool = False, seed: int = 0, timer: str = "wall") -> list[dict]:
    """Records for one shape and dtype: every operator against ``nn.Conv2d``, interleaved."""
    torch.manual_seed(seed)
    kwargs = dict(kernel_size=shape.kernel, padding=shape.padding, bias=False, device=device)
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
    medians = interleaved_medians(steps, device, repeats, warmup, timer)
    peaks = {name: peak_memory_mb(step, device) for name, step in steps.items()} if device.type == "cuda" else {}
    records = []
    for op in operators:
        record = {
            "kind": "layer", "operator": op, "shape": shape.label, "shape_name": shape.name,
            "batch": shape.batch, "in_channels": shape.in_channels, "out_channels": shape.out_channels,
            "size": shape.size, "kernel": shape.kernel, "dtype": dtype, "device": device.type,
            "conv_ms": round(medians["conv"], 4), "sphere_ms": round(medians[op], 4),
            "ratio": round(medians[op] / medians["conv"], 4), "repeats": repeats,
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


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                dtype: str) -> Callable[[], None]:
    # Adam, as in the reference recipe (paper Sec. 5 / SPEC sec. 5).
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def bench_models(dtype: str, operators: Sequence[str], device: torch.device, batch: int, repeats: int, warmup: int,
                 width_mult: float = 1.0, seed: int = 0, model: str = "spherenet9", timer: str = "wall") -> list[dict]:
    """Records of one training step of ``model`` per operator against its CNN baseline, interleaved."""
    from .models import create_model

    torch.manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for op in ("none", *operators):
        net = create_model(model, operator=op, width_mult=width_mult).to(device)
        steps[op] = _train_step(net, images, labels, device, dtype)
    medians = interleaved_medians(steps, device, repeats, warmup, timer)
    peaks = {name: peak_memory_mb(step, device) for name, step in steps.items()} if device.type == "cuda" else {}
    records = []
    for op in operators:
        record = {
            "kind": "model", "model": model, "operator": op, "shape": f"{batch}x3x32x32", "batch": batch,
            "width_mult": width_mult, "dtype": dtype, "device": device.type,
            "conv_ms": round(medians["none"], 4), "sphere_ms": round(medians[op], 4),
            "ratio": round(medians[op] / medians["none"], 4),
            "conv_images_per_s": round(batch / medians["none"] * 1e3, 2),
            "sphere_images_per_s": round(batch / medians[op] * 1e3, 2),
            "images_per_s_ratio": round(medians["none"] / medians[op], 4), "repeats": repeats,
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
        "device": device.type, "torch": torch.__version__, "python": platform.python_version(),
        "cpu": _cpu_model(), "threads": torch.get_num_threads(),
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


def run(config: BenchConfig, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run the benchmarks of ``config``; returns one record (dict) per measurement."""
    _check_config(config)
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    shapes = config.shapes if config.shapes is not None else (CUDA_LAYER_SHAPES if cuda else CPU_LAYER_SHAPES)
    repeats = config.repeats or (CUDA_REPEATS if cuda else CPU_REPEATS)
    machine = machine_description(device)
    stamp = {key: machine[key] for key in ("torch", "threads", "gpu", "tf32_conv", "cpu") if key in machine}
    if cuda:
        stamp.pop("cpu")
    records: list[dict] = []
    if config.layers:
        for shape in shapes:
            for dtype in config.dtypes:
                if progress:
                    progress(f"layer {shape.label} {dtype}")
                records += bench_layers(shape, dtype, config.operators, device, repeats, config.warmup,
                                        config.reference, config.seed, config.timer)
    if config.models:
        batch = config.model_batch or (CUDA_MODEL_BATCH if cuda else CPU_MODEL_BATCH)
        for dtype in config.dtypes:
            if progress:
                progress(f"model spherenet9 batch {batch} {dtype}")
            records += bench_models(dtype, config.operators, device, batch, repeats, config.warmup,
                                    config.model_width_mult, config.seed, timer=config.timer)
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
        row = [r["kind"], r["shape"], r["dtype"], r["operator"], f"{r['conv_ms']:.2f}", f"{r['sphere_ms']:.2f}",
               f"{r['ratio']:.2f}x"]
        if has_ref:
            row += [f"{r['reference_ms']:.2f}" if "reference_ms" in r else "-",
                    f"{r['reference_ratio']:.2f}x" if "reference_ratio" in r else "-"]
        if has_peak:
            row += [f"{r.get('conv_peak_mb', math.nan):.1f}", f"{r.get('sphere_peak_mb', math.nan):.1f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i >= 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(records: list[dict], path: str) -> None:
    """Write the list of records as JSON (indent 1)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


__all__ = [
    "BenchConfig", "LayerShape", "CPU_LAYER_SHAPES", "CUDA_LAYER_SHAPES", "run", "bench_layers", "bench_models",
    "interleaved_medians", "peak_memory_mb", "format_table", "write_json", "parse_shape", "resolve_device",
    "machine_description",
]
