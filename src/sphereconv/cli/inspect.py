"""``sphereconv inspect``: per-layer plots of a run or checkpoint (why does a deep network train?).

Measures, on a few real training batches, every convolution of the checkpoint's network: the
distribution of cos(theta) between filters and input patches (Liu et al., NIPS 2017, Sec. 2.1),
the mean and spread of each block's output, and the gradient norms per layer
(:mod:`sphereconv.engine.layer_stats`). Writes ``layer_stats.json`` and the plots
``cos_theta.png``, ``activations.png``, ``gradients.png``, plus ``over_iterations.png`` when the run
recorded statistics while training (``--layer-stats-every N`` of ``sphereconv train``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .parsing import device_name, existing_directory, output_directory, positive_int

SUMMARY_FILE = "layer_stats.json"
DEFAULT_BATCHES = 4
# Figure size in inches and resolution of every plot (1000 x 450 pixels).
FIGURE_INCHES = (10.0, 4.5)
FIGURE_DPI = 100
# Floor of the logarithmic axes: gradient and spread values of exactly zero are drawn here.
LOG_FLOOR = 1e-12


def register(subparsers) -> None:
    """Add the ``inspect`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "inspect",
        description="Per-layer statistics of a run's newest checkpoint (or a checkpoint file) on real training "
        "batches: cos theta, activations and gradients against depth, as JSON and PNG plots.",
    )
    parser.add_argument(
        "target", metavar="RUN_OR_CHECKPOINT", help="run directory (its newest checkpoint) or a checkpoint file (.pt)"
    )
    parser.add_argument(
        "--out",
        type=output_directory,
        default=None,
        metavar="DIR",
        help="where to write the plots (default: RUN/inspect)",
    )
    parser.add_argument(
        "--batches",
        type=positive_int,
        default=DEFAULT_BATCHES,
        help=f"training batches to measure, averaged (default {DEFAULT_BATCHES})",
    )
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: the run's)")
    parser.add_argument(
        "--data-dir",
        type=existing_directory,
        default=None,
        help="folder holding the dataset files (default: where the run found them)",
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)"
    )
    parser.set_defaults(func=run)


def run_directory_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file belongs to (``RUN/checkpoints/step_N.pt`` -> ``RUN``)."""
    from ..engine.checkpoint import CHECKPOINT_DIR

    parent = checkpoint.parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


def run(args: argparse.Namespace) -> int:
    """Measure the checkpoint, write the JSON summary and the plots; returns the exit code."""
    from ..engine.layer_stats import LAYER_STATS_FILE, inspect_checkpoint, read_layer_stats
    from .evaluate import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.target)
    summary = inspect_checkpoint(
        checkpoint, batches=args.batches, batch_size=args.batch_size, data_dir=args.data_dir, device=args.device
    )
    run_dir = run_directory_of(checkpoint)
    out = Path(args.out) if args.out is not None else run_dir / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    layer_kind = "plain convolutions (CNN)" if summary["operator"] == "none" else f"operator={summary['operator']}"
    title = (
        f"{summary['model']}, {layer_kind}, batch_norm={summary['batch_norm']}, "
        f"width x{summary['width_mult']:g}, step {summary['step']}"
    )
    written = [
        out / SUMMARY_FILE,
        plot_cos_theta(summary, out / "cos_theta.png", title),
        plot_activations(summary, out / "activations.png", title),
        plot_gradients(summary, out / "gradients.png", title),
    ]
    # Only a run that recorded statistics owns the file (an overwritten run may have left one).
    history = read_layer_stats(run_dir / LAYER_STATS_FILE) if summary["layer_stats_every"] else []
    if history:
        written.append(plot_over_iterations(history, out / "over_iterations.png", title, summary["num_classes"]))
    layers = summary["layers"]
    print(
        f"{len(layers)} layers of {checkpoint} measured on {summary['batches']} training batches "
        f"(batch loss {summary['loss']:.4f}); wrote {', '.join(str(p) for p in written)}"
    )
    return 0


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib is imported here only, so the rest of the CLI does not need it)


def _figure(columns: int):
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def _save(figure, path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure.suptitle(title, fontsize=9)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=FIGURE_DPI)
    return path


def _positive(values: list) -> list[float]:
    return [math.nan if v is None else max(float(v), LOG_FLOOR) for v in values]


def plot_cos_theta(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Left: histogram of cos(theta) per layer (heat map); right: its quantiles against depth."""
    import numpy as np

    from ..engine.layer_stats import COS_QUANTILES, COS_RANGE

    layers = summary["layers"]
    figure, (left, right) = _figure(2)
    hist = np.array([row["cos_hist"] for row in layers], dtype=float)
    density = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    image = left.imshow(
        np.log10(np.maximum(density, 1e-6)),
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(*COS_RANGE, 0.5, len(layers) + 0.5),
        vmin=-6,
        vmax=0,
    )
    figure.colorbar(image, ax=left, label="log10 fraction of (filter, patch) pairs")
    left.set_xlabel("cos theta = <w, x> / (|w| |x|)")
    left.set_ylabel("layer (depth)")
    left.set_title("distribution of cos theta per layer", fontsize=9)
    depth = [row["index"] for row in layers]
    q = np.array([row["cos_quantiles"] for row in layers], dtype=float)
    mid = len(COS_QUANTILES) // 2
    for low, alpha in ((0, 0.15), (1, 0.25), (2, 0.4)):
        high = len(COS_QUANTILES) - 1 - low
        right.fill_between(
            depth,
            q[:, low],
            q[:, high],
            alpha=alpha,
            color="tab:blue",
            linewidth=0,
            label=f"{COS_QUANTILES[low]:g}-{COS_QUANTILES[high]:g} quantiles",
        )
    right.plot(depth, q[:, mid], color="tab:blue", label="median")
    right.axhline(0.0, color="grey", linewidth=0.7)
    right.set_xlabel("layer (depth)")
    right.set_ylabel("cos theta")
    right.set_title("quantiles of cos theta against depth", fontsize=9)
    right.legend(fontsize=7)
    return _save(figure, path, title)


def plot_activations(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Left: mean, spread and spread across images of each block's output; right: dead channels."""
    layers = summary["layers"]
    depth = [row["index"] for row in layers]
    figure, (left, right) = _figure(2)
    for key, label in (("act_mean", "|mean|"), ("act_std", "std (all units)"), ("act_batch_std", "std across images")):
        values = [None if row[key] is None else abs(row[key]) for row in layers]
        left.plot(depth, _positive(values), marker=".", label=label)
    left.set_yscale("log")
    left.set_xlabel("layer (depth)")
    left.set_ylabel("block output (after BN / ReLU)")
    left.set_title("activation mean and spread against depth", fontsize=9)
    left.legend(fontsize=7)
    right.plot(depth, [row["dead_channels"] for row in layers], marker=".", color="tab:red")
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("layer (depth)")
    right.set_ylabel("fraction of channels zero on every image")
    right.set_title("dead channels", fontsize=9)
    return _save(figure, path, title)


def plot_gradients(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Left: gradient norms against depth; right: gradient norm relative to the weight norm."""
    layers = summary["layers"]
    depth = [row["index"] for row in layers]
    figure, (left, right) = _figure(2)
    left.plot(depth, _positive([row["grad_norm"] for row in layers]), marker=".", label="|dL/dW| (weights)")
    left.plot(depth, _positive([row["act_grad_norm"] for row in layers]), marker=".", label="|dL/d output| per image")
    left.set_yscale("log")
    left.set_xlabel("layer (depth)")
    left.set_ylabel("gradient norm")
    left.set_title("gradient norm against depth", fontsize=9)
    left.legend(fontsize=7)
    right.plot(depth, _positive([row["grad_ratio"] for row in layers]), marker=".", color="tab:green")
    right.set_yscale("log")
    right.set_xlabel("layer (depth)")
    right.set_ylabel("|dL/dW| / |W|")
    right.set_title("relative weight gradient", fontsize=9)
    return _save(figure, path, title)


def plot_over_iterations(history: list[dict[str, Any]], path: Path, title: str, num_classes: int) -> Path:
    """Statistics recorded while training: batch loss (dashed: chance, ln ``num_classes``), and
    per-layer heat maps over iterations."""
    import numpy as np

    iterations = [record["iteration"] for record in history]
    figure, axes = _figure(4)
    axes[0].plot(iterations, [record["loss"] for record in history], marker=".")
    axes[0].axhline(math.log(num_classes), color="grey", linewidth=0.7, linestyle="--")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel(f"batch loss (dashed: ln {num_classes}, chance)")
    axes[0].set_title("loss", fontsize=9)
    span = (
        iterations[0],
        iterations[-1] if len(iterations) > 1 else iterations[0] + 1,
        0.5,
        len(history[0]["layers"]) + 0.5,
    )
    for ax, key, label in (
        (axes[1], "grad_norm", "log10 |dL/dW|"),
        (axes[2], "act_batch_std", "log10 std across images"),
        (axes[3], "cos_std", "log10 std of cos theta"),
    ):
        grid = np.array(
            [
                [math.nan if row[key] is None else max(row[key], LOG_FLOOR) for row in record["layers"]]
                for record in history
            ],
            dtype=float,
        ).T
        image = ax.imshow(np.log10(grid), aspect="auto", origin="lower", cmap="viridis", extent=span)
        figure.colorbar(image, ax=ax, label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("layer (depth)")
        ax.set_title(label, fontsize=9)
    return _save(figure, path, title)
