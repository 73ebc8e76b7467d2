"""Reading finished training runs and summarising them over seeds.

A run directory is what ``sphereconv train`` writes: ``metrics.jsonl`` (one JSON object per
evaluation: step, train_loss, test_acc, ...) and ``summary.json``. Accuracies are fractions in
[0, 1] in those files and percentages in reports. Following Liu et al. (NIPS 2017, Sec. 5 and the
reference logs) a run is judged by its best and final test accuracy and by the first evaluated
iteration at which test accuracy reaches a threshold.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .._validation import is_real
from ..engine.run_dir import METRICS_FILE, SUMMARY_FILE
from ..errors import SphereconvError

# Accuracies (fractions) at which "iterations to reach" is reported, per dataset. CIFAR-10 uses
# the paper's 80% / 85% (NIPS 2017 Sec. 5.2) plus two lower marks; the others are chosen so that
# the marks separate slow from fast learners on that dataset.
ACCURACY_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "fashion-mnist": (0.80, 0.85, 0.88, 0.90),
    "mnist": (0.90, 0.95, 0.98, 0.99),
    "cifar10": (0.50, 0.70, 0.80, 0.85),
    "cifar100": (0.30, 0.45, 0.55, 0.65),
}
DEFAULT_THRESHOLDS = (0.50, 0.70, 0.80, 0.90)


class ResultsError(SphereconvError):
    """A run directory has no metrics, or its files are not valid JSON."""


def thresholds_for(dataset: str) -> tuple[float, ...]:
    """Accuracy thresholds (fractions) used for ``dataset``."""
    return ACCURACY_THRESHOLDS.get(dataset, DEFAULT_THRESHOLDS)


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` in file order; raises :class:`ResultsError`."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ResultsError(f"{run_dir} is not a finished run: it has no {METRICS_FILE}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a text file of JSON lines") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not is_real(step) or not math.isfinite(step):
            raise ResultsError(f"{path}:{number} is not a metrics record (needs a 'step' key holding a number)")
        records.append(record)
    return records


def read_summary(run_dir: Path) -> dict | None:
    """``run_dir/summary.json`` as a dict, or None if the run has not finished."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc.msg}); delete the run directory to retrain it") from None
    if not isinstance(summary, dict):
        raise ResultsError(f"{path} does not hold a JSON object")
    return summary


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that have a finite value for it."""
    steps, values = [], []
    for record in metrics:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def iterations_to_reach(metrics: list[dict], threshold: float) -> int | None:
    """First evaluated step whose test accuracy is >= ``threshold`` (a fraction), else None."""
    for step, acc in zip(*series(metrics, "test_acc")):
        if acc >= threshold:
            return step
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class RunResult:
    """One finished run: seed, its summary numbers and its evaluation records."""

    seed: int
    path: Path
    final_test_acc: float
    best_test_acc: float
    steps: int
    images_per_second: float
    metrics: list[dict] = field(repr=False, default_factory=list)

    @classmethod
    def load(cls, run_dir: Path, seed: int) -> RunResult:
        summary = read_summary(run_dir)
        if summary is None:
            raise ResultsError(f"{run_dir} has no {SUMMARY_FILE}; the run did not finish")
        metrics = read_metrics(run_dir)
        _, accs = series(metrics, "test_acc")
        final = summary.get("final_test_acc", accs[-1] if accs else math.nan)
        best = summary.get("best_test_acc", max(accs) if accs else math.nan)
        return cls(
            seed=seed,
            path=Path(run_dir),
            final_test_acc=float(final),
            best_test_acc=float(best),
            steps=int(summary.get("steps", metrics[-1]["step"] if metrics else 0)),
            images_per_second=float(summary.get("images_per_second", math.nan)),
            metrics=metrics,
        )


def summarise_runs(runs: list[RunResult], thresholds: tuple[float, ...]) -> dict:
    """Mean/std over seeds of final and best accuracy and images/s, and iterations to thresholds.

    ``iterations_to[threshold]`` holds the mean step over the seeds that reached it (None if none
    did) and ``reached[threshold]`` how many seeds reached it.
    """
    final_mean, final_std = mean_std([r.final_test_acc for r in runs])
    best_mean, best_std = mean_std([r.best_test_acc for r in runs])
    ips_mean, _ = mean_std([r.images_per_second for r in runs if math.isfinite(r.images_per_second)])
    iterations_to, reached = {}, {}
    for threshold in thresholds:
        steps = [s for s in (iterations_to_reach(r.metrics, threshold) for r in runs) if s is not None]
        key = f"{threshold:g}"
        iterations_to[key] = statistics.fmean(steps) if steps else None
        reached[key] = len(steps)
    return {
        "seeds": len(runs),
        "final_test_acc_mean": final_mean,
        "final_test_acc_std": final_std,
        "best_test_acc_mean": best_mean,
        "best_test_acc_std": best_std,
        "images_per_second": ips_mean,
        "iterations_to": iterations_to,
        "reached": reached,
    }


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories at or below ``root`` (those holding a metrics file), sorted by path."""
    root = Path(root)
    if (root / METRICS_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(METRICS_FILE))
