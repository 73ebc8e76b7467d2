"""PNG plots of reproduction runs (matplotlib, Agg, no pyplot state).

- learning curves: a metric against training iterations, one line per variant (mean over seeds)
  with the min-max range over seeds shaded, as in the convergence figures of Liu et al.
  (NIPS 2017, Fig. 4);
- sweep plots: final test accuracy against a swept setting (width, depth, batch size), one line
  per group, error bars spanning the seeds;
- 2-D feature scatter plots (NIPS 2017 Sec. 5.4, Fig. 5): test features coloured by class;
- effect plots of the sweep: a paired SphereNet-minus-CNN difference with its 95% interval against
  width or run length.

Every figure has the same fixed pixel size so that reports and tests can rely on it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported by the functions that draw, so planning never loads it
    from matplotlib.figure import Figure

# Fixed output size: 8 x 5 inches at 100 dpi = 800 x 500 pixels (feature plots are wider).
FIGURE_INCHES = (8.0, 5.0)
FEATURE_PANEL_INCHES = 4.0
DPI = 100
# Scatter plots keep at most this many points per panel (keeps the PNG well under 200 KB).
MAX_SCATTER_POINTS = 2000

METRIC_LABELS = {
    "test_acc": "test accuracy (%)",
    "train_acc": "training accuracy (%)",
    "train_loss": "training loss",
    "test_loss": "test loss",
    "lr": "learning rate",
}
PERCENT_METRICS = ("test_acc", "train_acc")


def _new_figure(inches: tuple[float, float] = FIGURE_INCHES) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=inches, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed over: two grid workers rewrite the same report plots, and writes
    # into one file at once interleave (a PNG of one's head and the other's tail).
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, dpi=DPI, format="png")
        temporary.replace(out)
    finally:
        temporary.unlink(missing_ok=True)
    return out


def _colours(count: int) -> list:
    """Distinct colours for ``count`` lines (tab10 up to 10, tab20 beyond)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def aggregate_curves(
    curves: list[tuple[list[int], list[float]]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps and the mean, min and max over seeds at each step any seed evaluated."""
    steps = np.array(sorted({s for run_steps, _ in curves for s in run_steps}), dtype=float)
    table = np.full((len(curves), len(steps)), np.nan)
    index = {s: i for i, s in enumerate(steps)}
    for row, (run_steps, values) in enumerate(curves):
        for s, v in zip(run_steps, values):
            table[row, index[s]] = v
    with warnings.catch_warnings():  # every column has at least one value, but numpy checks anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(table, axis=0), np.nanmin(table, axis=0), np.nanmax(table, axis=0)


def plot_curves(
    groups: dict[str, list[tuple[list[int], list[float]]]],
    out: Path,
    *,
    metric: str = "test_acc",
    title: str | None = None,
) -> Path:
    """Plot ``metric`` against iterations, one line per group (mean over its runs, min-max shaded).

    ``groups`` maps a legend label to the (steps, values) of each of its runs (one per seed);
    accuracy metrics given as fractions are drawn in percent.
    """
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    drawn = 0
    for colour, (label, curves) in zip(_colours(len(groups)), groups.items()):
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        steps, mean, low, high = aggregate_curves(curves)
        marker = "o" if len(steps) <= 30 else None
        axes.plot(steps, mean * scale, color=colour, label=label, marker=marker, markersize=3, linewidth=1.5)
        if len(curves) > 1:
            axes.fill_between(steps, low * scale, high * scale, color=colour, alpha=0.2, linewidth=0)
        drawn += 1
    if drawn == 0:
        axes.text(0.5, 0.5, f"no {metric} values recorded", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("training iterations")
    axes.set_ylabel(METRIC_LABELS.get(metric, metric))
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title, fontsize=10)
    if drawn:
        many = drawn > 8
        axes.legend(fontsize=6 if many else 8, ncol=2 if many else 1, loc="best", framealpha=0.8)
    figure.tight_layout()
    return _save(figure, out)


def plot_sweep(
    groups: dict[str, list[tuple[float, list[float]]]],
    out: Path,
    *,
    xlabel: str,
    log_x: bool = False,
    title: str | None = None,
) -> Path:
    """Final test accuracy (%) against a swept value, one line per group.

    ``groups`` maps a legend label to (x, accuracies over seeds as fractions) points; the line is
    the mean and the error bar spans min to max.
    """
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for colour, (label, points) in zip(_colours(len(groups)), groups.items()):
        points = sorted((x, v) for x, v in points if v)
        xs = np.array([x for x, _ in points], dtype=float)
        means = np.array([np.mean(v) for _, v in points]) * 100
        lows = means - np.array([np.min(v) for _, v in points]) * 100
        highs = np.array([np.max(v) for _, v in points]) * 100 - means
        axes.errorbar(xs, means, yerr=[lows, highs], color=colour, label=label, marker="o", markersize=4, capsize=3)
    if log_x:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("final test accuracy (%)")
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return _save(figure, out)


def plot_features2d(
    panels: list[tuple[str, np.ndarray, np.ndarray]],
    out: Path,
    *,
    class_names: list[str] | None = None,
    title: str | None = None,
    seed: int = 0,
) -> Path:
    """Scatter 2-D features coloured by class, one panel per (label, features (N, 2), labels (N,))."""
    figure = _new_figure((FEATURE_PANEL_INCHES * max(len(panels), 1), FEATURE_PANEL_INCHES + 0.6))
    if not panels:  # every run diverged: a labelled image, as the curve plots draw (was "cannot write empty image")
        axes = figure.add_subplot(1, 1, 1)
        axes.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes.transAxes)
    colours = _colours(10)
    generator = np.random.default_rng(seed)
    for position, (label, features, labels) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        if len(features) > MAX_SCATTER_POINTS:
            keep = generator.choice(len(features), MAX_SCATTER_POINTS, replace=False)
            features, labels = features[keep], labels[keep]
        for cls in np.unique(labels):
            mask = labels == cls
            name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
            axes.scatter(
                features[mask, 0],
                features[mask, 1],
                s=2,
                color=colours[int(cls) % len(colours)],
                label=name,
                linewidths=0,
            )
        axes.set_title(label, fontsize=9)
        axes.set_aspect("equal", adjustable="datalim")
        axes.tick_params(labelsize=7)
        axes.grid(True, alpha=0.3)
        if position == len(panels):
            axes.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, out)


def plot_effects(
    groups: dict[str, list[tuple[float, float, float, float]]],
    out: Path,
    *,
    xlabel: str,
    ylabel: str = "SphereNet - CNN, final test accuracy (points)",
    log_x: bool = False,
    title: str | None = None,
) -> Path:
    """A paired effect against a swept value, one line per group, with its confidence interval.

    ``groups`` maps a legend label to ``(x, mean, low, high)`` points in the units of the y axis;
    a NaN interval (a single pair) draws the point without an error bar. A dashed line marks 0.
    """
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    axes.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    count = len(groups)
    for index, (colour, (label, points)) in enumerate(zip(_colours(count), groups.items())):
        points = sorted(points)
        xs = np.array([p[0] for p in points], dtype=float)
        # Nudge the groups apart horizontally so that overlapping error bars stay readable.
        xs = (
            xs * (1.0 + 0.03 * (index - (count - 1) / 2))
            if log_x
            else xs + 0.01 * (index - (count - 1) / 2) * max(xs.max(), 1.0)
        )
        means = np.array([p[1] for p in points], dtype=float)
        lows = np.nan_to_num(means - np.array([p[2] for p in points], dtype=float))
        highs = np.nan_to_num(np.array([p[3] for p in points], dtype=float) - means)
        axes.errorbar(xs, means, yerr=[lows, highs], color=colour, label=label, marker="o", markersize=4, capsize=3)
    if log_x:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title, fontsize=10)
    if groups:
        axes.legend(fontsize=8, loc="best")
    else:
        axes.text(0.5, 0.5, "no paired results yet", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    return _save(figure, out)
