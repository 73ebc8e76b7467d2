"""The report of a reproduction: ``report.md`` (markdown table) and ``results.json``.

For every variant the table gives final and best test accuracy as mean ± sample standard deviation
over seeds, the iterations needed to reach a few accuracy marks (the paper's convergence measure,
Liu et al., NIPS 2017 Sec. 5.2), throughput, and the published CIFAR-10 number beside it where the
paper has one (Sec. 5 / wy1iu/SphereNet logs; see :mod:`sphereconv.experiments.paper`).
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .definitions import Experiment, Variant
from .paper import format_paper
from .results import RunResult

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
EMPTY = "—"


@dataclass
class ReportContext:
    """Where and how the runs were made, printed at the top of the report."""

    command: str
    scale: str
    dataset: str
    device: str
    seeds: int
    thresholds: tuple[float, ...]
    notes: list[str] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    machine: str = field(default_factory=lambda: describe_machine())


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux) or the platform module."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str | None = None) -> str:
    """One line: CPU model and cores, GPU if one is used, Python and torch versions."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    if device and device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}")
    return "; ".join(parts)


def _percent(mean: float, std: float, seeds: int) -> str:
    if not math.isfinite(mean):
        return EMPTY
    return f"{100 * mean:.2f}" if seeds < 2 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _iterations(summary: dict, key: str) -> str:
    value = summary["iterations_to"].get(key)
    if value is None:
        return EMPTY
    reached, seeds = summary["reached"][key], summary["seeds"]
    text = f"{value:,.0f}"
    return text if reached == seeds else f"{text} ({reached}/{seeds} seeds)"


def _threshold_keys(thresholds: tuple[float, ...]) -> list[str]:
    return [f"{t:g}" for t in thresholds]


def render_table(rows: list[tuple[Variant, dict]], thresholds: tuple[float, ...], seeds: int) -> str:
    """The markdown results table, one row per (variant, summary over seeds)."""
    with_paper = any(v.paper is not None for v, _ in rows)
    spread = "" if seeds < 2 else " (mean ± std)"
    header = ["variant", "description", f"final acc %{spread}", f"best acc %{spread}"]
    header += [f"iters to {100 * t:g}%" for t in thresholds]
    header.append("images/s")
    if with_paper:
        header.append("paper best / final % (CIFAR-10)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, summary in rows:
        n = summary["seeds"]
        cells = [
            f"`{variant.name}`",
            variant.label,
            _percent(summary["final_test_acc_mean"], summary["final_test_acc_std"], n),
            _percent(summary["best_test_acc_mean"], summary["best_test_acc_std"], n),
        ]
        cells += [_iterations(summary, key) for key in _threshold_keys(thresholds)]
        ips = summary["images_per_second"]
        cells.append(f"{ips:,.0f}" if math.isfinite(ips) else EMPTY)
        if with_paper:
            cells.append(format_paper(variant.paper))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(
    experiment: Experiment, context: ReportContext, rows: list[tuple[Variant, dict]], images: list[str]
) -> str:
    """The whole ``report.md`` text."""
    parts = [
        f"# {experiment.title} (`{experiment.name}`)",
        "",
        f"- command: `{context.command}`",
        f"- scale: `{context.scale}`, dataset: `{context.dataset}`, seeds: {context.seeds}, device: `{context.device}`",
        f"- machine: {context.machine}",
        f"- date: {context.date}",
        f"- paper's claim (Liu et al., NIPS 2017): {experiment.claim}",
        "",
        render_table(rows, context.thresholds, context.seeds),
        "",
        "Accuracies are test accuracy in percent: `final` after the last iteration, `best` the best "
        "evaluation during training (the reference code's measure). `iters to X%` is the first "
        f"evaluated iteration at which test accuracy reached X% ({EMPTY}: never).",
    ]
    if any(v.paper is not None for v, _ in rows):
        parts.append(
            "Paper values are CIFAR-10 (or CIFAR-10+) numbers after 64k iterations of the reference "
            "recipe; they are printed for orientation only unless this run used that recipe and dataset."
        )
    notes = list(context.notes) + ([experiment.notes] if experiment.notes else [])
    if notes:
        parts += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    if images:
        parts.append("")
        parts += [f"![{Path(name).stem}]({name})" for name in images]
    return "\n".join(parts) + "\n"


def results_document(
    experiment: Experiment, context: ReportContext, variant_runs: list[tuple[Variant, list[RunResult], dict]]
) -> dict:
    """Everything in the report as plain JSON-serialisable data."""
    return {
        "experiment": experiment.name,
        "title": experiment.title,
        "command": context.command,
        "scale": context.scale,
        "dataset": context.dataset,
        "device": context.device,
        "machine": context.machine,
        "date": context.date,
        "thresholds": list(context.thresholds),
        "notes": context.notes,
        "variants": [
            {
                "name": variant.name,
                "label": variant.label,
                "overrides": variant.overrides,
                "width_factor": variant.width_factor,
                "paper": None
                if variant.paper is None
                else {"best": variant.paper.best, "final": variant.paper.final, "dataset": variant.paper.dataset},
                "summary": summary,
                "runs": [
                    {
                        "seed": run.seed,
                        "path": str(run.path),
                        "final_test_acc": run.final_test_acc,
                        "best_test_acc": run.best_test_acc,
                        "steps": run.steps,
                        "images_per_second": run.images_per_second,
                    }
                    for run in runs
                ],
            }
            for variant, runs, summary in variant_runs
        ],
    }


def _json_safe(value):
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(
    out_dir: Path,
    experiment: Experiment,
    context: ReportContext,
    variant_runs: list[tuple[Variant, list[RunResult], dict]],
    images: list[str],
) -> Path:
    """Write ``report.md`` and ``results.json`` into ``out_dir``; returns the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [(variant, summary) for variant, _, summary in variant_runs]
    report = out_dir / REPORT_FILE
    report.write_text(render_report(experiment, context, rows, images))
    document = _json_safe(results_document(experiment, context, variant_runs))
    (out_dir / RESULTS_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return report
