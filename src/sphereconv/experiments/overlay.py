"""``sphereconv plot``: overlay the learning curves of any finished runs.

A run directory holds ``metrics.jsonl``; any other directory given (a ``reproduce`` output, say) is
searched for run directories below it. Runs that differ only in a trailing ``seed<k>`` directory
are one line, the mean over seeds with the min-max range shaded (as in the reproduction plots).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from .plots import plot_curves
from .results import ResultsError, find_run_dirs, read_metrics, series

SEED_DIR = re.compile(r"^seed\d+$")
METRICS = ("test_acc", "train_loss", "train_acc", "test_loss", "lr")


def run_label(run_dir: Path, root: Path) -> str:
    """Legend label of ``run_dir`` found under ``root``: its path relative to root minus ``seed<k>``."""
    run_dir, root = Path(run_dir), Path(root)
    parts = list(run_dir.relative_to(root).parts)
    if parts and SEED_DIR.match(parts[-1]):
        parts = parts[:-1]
    if not parts:  # the root is the run itself, or a variant directory holding seed<k> runs
        name = root.resolve().name
        parts = [root.resolve().parent.name if SEED_DIR.match(name) else name]
    return "/".join(parts)


def collect_curves(roots: list[Path], metric: str) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Label -> per-run (steps, values) of ``metric`` for every run found under ``roots``."""
    if metric not in METRICS:
        raise ResultsError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    # One line per run, or per runs that differ only in a trailing seed<k> folder: keyed by that path.
    lines: dict[Path, tuple[str, list[tuple[list[int], list[float]]]]] = {}
    multiple_roots = len(roots) > 1
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            problem = "is a file, not a folder" if root.exists() else "does not exist"
            raise ResultsError(f"run directory {root} {problem}")
        run_dirs = find_run_dirs(root)
        if not run_dirs:
            raise ResultsError(f"no finished runs in {root}: no metrics.jsonl at or below it")
        for run_dir in run_dirs:
            label = run_label(run_dir, root)
            if multiple_roots and run_dir != root:
                label = f"{root.resolve().name}/{label}"
            resolved = run_dir.resolve()
            key = resolved.parent if SEED_DIR.match(resolved.name) else resolved
            lines.setdefault(key, (label, []))[1].append(series(read_metrics(run_dir), metric))
    # Different runs with the same label (e1/run and e2/run) are named by their paths below their
    # common folder instead of being drawn as one line, as if they were seeds of one run.
    count = Counter(label for label, _ in lines.values())
    clashing = [key for key, (label, _) in lines.items() if count[label] > 1]
    common = Path(os.path.commonpath(clashing)) if clashing else None
    groups: dict[str, list[tuple[list[int], list[float]]]] = {}
    for key, (label, curves) in lines.items():
        if common is not None and count[label] > 1:
            label = key.relative_to(common).as_posix() if key != common else key.name
        groups.setdefault(label, []).extend(curves)
    return groups


def overlay_runs(roots: list[Path], out: Path, metric: str = "test_acc", title: str | None = None) -> Path:
    """Plot ``metric`` of every run under ``roots`` into the PNG ``out``; returns its path."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ResultsError(f"--out must name a .png file; got {str(out)!r}")
    groups = collect_curves(roots, metric)
    if not any(steps for curves in groups.values() for steps, _ in curves):
        raise ResultsError(f"none of the runs recorded {metric!r}")
    return plot_curves(groups, out, metric=metric, title=title)
