"""A grid of runs in one command: ``sphereconv reproduce --grid configs/sweeps/NAME.yaml``.

A grid file names models (TrainConfig overrides such as the SphereConv operator), regimes (width,
batch, length, augmentation), seeds and stages: the run order, stage by stage and seed by seed
within a stage, so that runs stopped part-way still leave SphereNet and CNN results with the same
seeds. It serves the pre-registered comparison of SphereNets and CNNs in docs/RESULTS.md, which
asks where the gains Liu et al. report (NIPS 2017, Sec. 5.1-5.2) show at CPU sizes.

Each finished run leaves a small JSON file, ``RESULTS/runs/<regime>-<model>-s<seed>.json``: its
settings, its evaluation curve and its summary. A run whose file exists is never trained again
(so a results folder kept in version control carries a sweep from one machine or day to the next),
an interrupted run continues from its newest checkpoint in ``OUT/<grid>/train/``, and after every
run ``RESULTS/report.md`` and its plots are rewritten from all the files present.

Grid file keys: ``name``, ``title``, ``seeds``, ``baseline`` (the model the others are compared
with), ``results`` (folder, relative to the working directory; default ``OUT/<name>``), ``base``
(overrides of every run), ``models`` and ``regimes`` (name -> ``label`` plus overrides),
``stages`` (list of ``{regime, models}``), and optionally ``summary_from``: another grid file
(relative to this one) whose results the report summarises too.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .definitions import Variant
from .plots import plot_curves, plot_effects
from .report import describe_machine
from .results import iterations_to_reach, read_metrics, read_summary, series, thresholds_for
from .runner import DIVERGED_FILE, PlannedRun, run_status, train_run
from .scales import get_scale
from .stats import PairedComparison, mean_interval, paired_comparison

GRID_KEYS = frozenset(
    {"name", "title", "seeds", "baseline", "results", "base", "models", "regimes", "stages", "summary_from"}
)
RUNS_DIR = "runs"
REPORT_FILE = "report.md"
# Metrics kept in a run's results file (the rest of metrics.jsonl stays in the run directory).
KEPT_METRICS = ("step", "test_acc", "test_loss", "train_loss", "train_acc", "lr", "seconds")
# Verdicts need at least this many paired seeds (the protocol's minimum).
MIN_SEEDS_FOR_VERDICT = 3
# Iterations-to-accuracy mark of the convergence comparison (protocol: 85% on Fashion-MNIST).
CONVERGENCE_MARK = 0.85
# A smoke-scale grid multiplies every regime's width by this (width 1/4 becomes 1/16, the smoke width).
SMOKE_WIDTH_FACTOR = 0.25
# Pending comparisons beyond this many are counted rather than listed in the verdict lines.
MAX_LISTED_PENDING = 4
# Where the reports point readers for the protocol and the discussion.
RESULTS_PAGE = "docs/RESULTS.md"


@dataclass(frozen=True)
class Named:
    """A model or regime of a grid: its name, legend label and TrainConfig overrides."""

    name: str
    label: str
    overrides: dict


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring for its keys)."""

    name: str
    title: str
    path: Path
    seeds: tuple[int, ...]
    baseline: str
    base: dict
    models: dict[str, Named]
    regimes: dict[str, Named]
    stages: tuple[tuple[str, tuple[str, ...]], ...]
    results: Path | None
    summary_from: Path | None


@dataclass
class GridRun:
    """One training run of a grid."""

    regime: Named
    model: Named
    seed: int
    settings: dict  # the grid's overrides for this run, what a results file must match
    planned: PlannedRun

    @property
    def run_id(self) -> str:
        return f"{self.regime.name}-{self.model.name}-s{self.seed}"


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping; got {value!r}")
    return value


def _named(section: dict, what: str, path: Path) -> dict[str, Named]:
    entries = {}
    for name, body in _mapping(section, f"{path}: {what}").items():
        body = dict(_mapping(body, f"{path}: {what}.{name}"))
        entries[str(name)] = Named(str(name), str(body.pop("label", name)), body)
    if not entries:
        raise ConfigError(f"{path}: {what} is empty")
    return entries


def load_grid(path: str | os.PathLike) -> Grid:
    """Parse and check a grid file; raises :class:`ConfigError` naming the bad key or value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file {path} is not valid YAML: {exc}") from None
    raw = _mapping(raw, f"grid file {path}")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(GRID_KEYS))}")
    for key in ("name", "models", "regimes", "stages"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    models = _named(raw["models"], "models", path)
    regimes = _named(raw["regimes"], "regimes", path)
    seeds = raw.get("seeds", [0, 1, 2])
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise ConfigError(f"{path}: seeds must be a non-empty list of non-negative integers; got {seeds!r}")
    baseline = str(raw.get("baseline", next(iter(models))))
    if baseline not in models:
        raise ConfigError(f"{path}: baseline {baseline!r} is not a model; models: {', '.join(models)}")
    stages = []
    for number, stage in enumerate(raw["stages"] if isinstance(raw["stages"], list) else [None], start=1):
        stage = _mapping(stage, f"{path}: stage {number}")
        regime, names = stage.get("regime"), stage.get("models")
        if regime not in regimes:
            raise ConfigError(f"{path}: stage {number} names regime {regime!r}; regimes: {', '.join(regimes)}")
        if not isinstance(names, list) or not names or any(n not in models for n in names):
            raise ConfigError(
                f"{path}: stage {number} models must be a list drawn from: {', '.join(models)}; got {names!r}"
            )
        stages.append((regime, tuple(names)))
    summary_from = raw.get("summary_from")
    return Grid(
        name=str(raw["name"]),
        title=str(raw.get("title", raw["name"])),
        path=path,
        seeds=tuple(seeds),
        baseline=baseline,
        base=dict(_mapping(raw.get("base", {}), f"{path}: base")),
        models=models,
        regimes=regimes,
        stages=tuple(stages),
        results=Path(raw["results"]) if raw.get("results") else None,
        summary_from=(path.parent / summary_from) if summary_from else None,
    )


@dataclass
class GridPlan:
    grid: Grid
    runs: list[GridRun]
    train_dir: Path
    results_dir: Path
    smoke: bool


def plan_grid(
    grid: Grid,
    *,
    out: str | Path = "runs/reproduce",
    results: str | Path | None = None,
    smoke: bool = False,
    device: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    progress: bool = True,
) -> GridPlan:
    """Every run of ``grid`` in run order, with validated configs; trains nothing.

    ``smoke`` shrinks every run to the ``smoke`` scale (a plumbing check) and then keeps the
    results out of the grid's own results folder, under ``out`` unless ``results`` is given.
    """
    from ..engine import load_config

    train_dir = Path(out) / grid.name / "train"
    if results is not None:
        results_dir = Path(results)
    elif grid.results is not None and not smoke:
        results_dir = grid.results
    else:
        results_dir = Path(out) / grid.name
    execution = {"device": device, "data_dir": data_dir, "download": download or None, "progress": progress}
    shrink = get_scale("smoke").overrides if smoke else {}
    runs, seen = [], set()
    for regime_name, model_names in grid.stages:
        regime = grid.regimes[regime_name]
        for seed in grid.seeds:
            for model_name in model_names:
                if (regime_name, model_name, seed) in seen:
                    continue
                seen.add((regime_name, model_name, seed))
                model = grid.models[model_name]
                settings = {**grid.base, **regime.overrides, **model.overrides, **shrink, "seed": seed}
                if smoke:  # keep the regimes' relative widths: 1/4 becomes the smoke scale's 1/16
                    width = {**grid.base, **regime.overrides, **model.overrides}.get("width_mult", 1.0)
                    settings["width_mult"] = width * SMOKE_WIDTH_FACTOR
                run_dir = train_dir / f"{regime_name}-{model_name}-s{seed}"
                try:
                    config = load_config(None, {**settings, **execution, "out": str(run_dir)})
                except ConfigError as exc:
                    raise ConfigError(f"{grid.path}: regime {regime_name!r}, model {model_name!r}: {exc}") from None
                if config.iterations is None:  # lengths, curves and convergence are compared in steps
                    raise ConfigError(
                        f"{grid.path}: regime {regime_name!r} sets no iterations (its runs would last "
                        f"epochs={config.epochs:g}); a grid's runs need a length in optimizer steps: set "
                        "iterations in its base or regimes"
                    )
                variant = Variant(model_name, model.label, model.overrides)
                runs.append(GridRun(regime, model, seed, _plain(settings), PlannedRun(variant, seed, run_dir, config)))
    return GridPlan(grid, runs, train_dir, results_dir, smoke)


def _plain(value):
    """``value`` normalised through YAML (tuples to lists, numpy-free), for comparisons and JSON."""
    return yaml.safe_load(yaml.safe_dump(value))


def results_path(plan: GridPlan, run: GridRun) -> Path:
    return plan.results_dir / RUNS_DIR / f"{run.run_id}.json"


def _write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    temporary.replace(path)


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


@functools.lru_cache(maxsize=1)
def source_version() -> str:
    """The git commit of the library's source tree (``+modified`` if it has uncommitted changes), else ``unknown``.

    Recorded per run: the settings pin what a run computes only as long as the library code does.
    Cached, and first called when a grid starts, so it names the code the process loaded.
    """
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")


def record_run(plan: GridPlan, run: GridRun, command: str) -> Path:
    """Write the results file of a finished (or diverged) run from its run directory."""
    out = run.planned.out
    document: dict[str, Any] = {
        "grid": plan.grid.name,
        "regime": run.regime.name,
        "model": run.model.name,
        "seed": run.seed,
        "settings": run.settings,
        "command": command,
        "machine": describe_machine(run.planned.config.device),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": source_version(),
    }
    if (out / DIVERGED_FILE).is_file():
        document["diverged"] = json.loads((out / DIVERGED_FILE).read_text()).get("error", "diverged")
    else:
        summary = read_summary(out) or {}
        document["summary"] = {
            key: _finite(summary.get(key))
            for key in (
                "final_test_acc",
                "best_test_acc",
                "best_step",
                "steps",
                "images_per_second",
                "train_seconds",
                "seconds",
                "num_parameters",
            )
        }
        document["summary"]["device"] = summary.get("device")
        document["metrics"] = [{k: _finite(r.get(k)) for k in KEPT_METRICS} for r in read_metrics(out)]
    path = results_path(plan, run)
    _write_json(path, document)
    return path


def load_recorded(plan: GridPlan, run: GridRun) -> dict | None:
    """The results file of ``run`` if present; :class:`ConfigError` if it was made with other settings."""
    path = results_path(plan, run)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg}); delete it to rerun that run") from None
    saved = document.get("settings", {})
    differing = sorted(k for k in set(saved) | set(run.settings) if saved.get(k) != run.settings.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} there vs {run.settings.get(k)!r} now" for k in differing[:4])
        raise ConfigError(
            f"{path} was made with different settings ({details}); move it away or use another --results folder"
        )
    return document


def _lock_path(run: GridRun) -> Path:
    return run.planned.out.parent / f"{run.run_id}.lock"


def _lock_owner(run: GridRun) -> int | None:
    """The process id of the live process that holds the run's lock file, else None (a lock file
    left by a process that is gone is removed)."""
    lock = _lock_path(run)
    try:
        owner = int(lock.read_text().strip() or 0)
        os.kill(owner, 0)
        return owner
    except FileNotFoundError:
        return None
    except (ValueError, ProcessLookupError, PermissionError):
        lock.unlink(missing_ok=True)
        return None


def _claim(run: GridRun) -> bool:
    """Take the run for this process (a lock file beside its directory); False if another live process has it."""
    lock = _lock_path(run)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = _lock_owner(run)
        return owner == os.getpid() if owner is not None else _claim(run)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def select_runs(plan: GridPlan, only: str | None) -> list[GridRun]:
    """The runs of ``plan`` in the cells ``only`` names, in run order (all runs when None).

    ``only`` is a comma-separated list of ``REGIME`` or ``REGIME/MODEL`` (``WL``, ``Q/linear,Q/sigmoid``):
    it splits a grid between workers or machines. Which process trains a run does not change its
    results file, and the report always covers every recorded run.
    """
    if only is None:
        return list(plan.runs)
    grid, chosen = plan.grid, set()
    for selector in only.split(","):
        regime, _, model = selector.strip().partition("/")
        if regime not in grid.regimes:
            raise ConfigError(
                f"invalid --only {only!r}: {selector.strip()!r} names regime {regime!r}; "
                f"grid {grid.name} has regimes {', '.join(grid.regimes)} (write REGIME or REGIME/MODEL)"
            )
        if model and model not in grid.models:
            raise ConfigError(
                f"invalid --only {only!r}: {selector.strip()!r} names model {model!r}; "
                f"grid {grid.name} has models {', '.join(grid.models)}"
            )
        matched = {r.run_id for r in plan.runs if r.regime.name == regime and model in ("", r.model.name)}
        if not matched:
            raise ConfigError(f"invalid --only {only!r}: no stage of grid {grid.name} runs {selector.strip()!r}")
        chosen |= matched
    return [r for r in plan.runs if r.run_id in chosen]


def _numbered(plan: GridPlan, runs: list[GridRun] | None) -> list[tuple[int, GridRun]]:
    """``(place in the whole grid, run)`` for each of ``runs`` (default: all), in run order."""
    chosen = {r.run_id for r in (plan.runs if runs is None else runs)}
    return [(index, run) for index, run in enumerate(plan.runs, start=1) if run.run_id in chosen]


def execute_grid(
    plan: GridPlan, command: str, log: Callable[[str], None] = print, runs: list[GridRun] | None = None
) -> None:
    """Train every run (of ``runs``, default all) without a results file, in order, rewriting the
    report after each."""
    total = len(plan.runs)
    for index, run in _numbered(plan, runs):
        tag = f"[{index}/{total}] {run.run_id}"
        if load_recorded(plan, run) is not None:
            log(f"{tag}: in {plan.results_dir / RUNS_DIR}, skipped")
            continue
        if not _claim(run):
            log(f"{tag}: being trained by another process, skipped")
            continue
        try:
            status = run_status(run.planned)
            started = time.perf_counter()
            if status in ("finished", "diverged"):
                outcome = f"{status} earlier in {run.planned.out}, recorded"
            else:
                outcome = train_run(run.planned, status) + f" in {time.perf_counter() - started:.0f} s"
                if status == "partial":
                    outcome = "resumed: " + outcome
            record_run(plan, run, command)
        finally:
            _lock_path(run).unlink(missing_ok=True)
        log(f"{tag}: {outcome}")
        write_grid_report(plan, command)


# -- the report ------------------------------------------------------------------------------


@dataclass
class Cell:
    """The finished runs of one regime x model: seed -> results document."""

    regime: Named
    model: Named
    planned_seeds: tuple[int, ...]
    documents: dict[int, dict]

    def values(self, key: str) -> dict[int, float]:
        return {
            s: d["summary"][key]
            for s, d in self.documents.items()
            if "summary" in d and d["summary"].get(key) is not None
        }

    def iterations_to(self, mark: float) -> dict[int, int | None]:
        return {s: iterations_to_reach(d["metrics"], mark) for s, d in self.documents.items() if "metrics" in d}


def collect_cells(plan: GridPlan, strict: bool = True) -> tuple[list[Cell], int]:
    """Cells in stage order with whatever results files exist, and how many files were ignored.

    A file made with other settings raises :class:`ConfigError`, or with ``strict=False`` is
    ignored and counted.
    """
    cells: dict[tuple[str, str], Cell] = {}
    ignored = 0
    for run in plan.runs:
        key = (run.regime.name, run.model.name)
        cell = cells.setdefault(key, Cell(run.regime, run.model, (), {}))
        cell.planned_seeds += (run.seed,)
        try:
            document = load_recorded(plan, run)
        except ConfigError:
            if strict:
                raise
            ignored, document = ignored + 1, None
        if document is not None:
            cell.documents[run.seed] = document
    return list(cells.values()), ignored


def _pct(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _estimate_text(values: list[float]) -> str:
    estimate = mean_interval(values)
    if estimate.n == 0:
        return "—"
    if estimate.n == 1:
        return f"{_pct(estimate.mean)} (1 seed)"
    return f"{_pct(estimate.mean)} [{_pct(estimate.low)}, {_pct(estimate.high)}]"


def verdict(comparison: PairedComparison, lower_is_better: bool = False) -> str:
    """The protocol's verdict: better / worse / no detectable difference, or pending (< 3 pairs)."""
    if comparison.n < MIN_SEEDS_FOR_VERDICT:
        return f"pending ({comparison.n}/{MIN_SEEDS_FOR_VERDICT} paired seeds)"
    low, high = comparison.difference.low, comparison.difference.high
    if lower_is_better:
        low, high = -high, -low
    if low > 0:
        return "SphereNet better"
    if high < 0:
        return "SphereNet worse"
    return "no detectable difference"


@dataclass
class Comparison:
    regime: Named
    model: Named
    accuracy: PairedComparison
    best: PairedComparison
    convergence: PairedComparison | None  # None unless every paired seed of both reached the mark
    reached: tuple[int, int, int]  # seeds of the model and of the baseline that reached the mark, of n


def compare_cells(plan: GridPlan, cells: list[Cell]) -> list[Comparison]:
    """Every non-baseline cell against the baseline cell of its regime."""
    baselines = {c.regime.name: c for c in cells if c.model.name == plan.grid.baseline}
    comparisons = []
    for cell in cells:
        base = baselines.get(cell.regime.name)
        if cell.model.name == plan.grid.baseline or base is None:
            continue
        accuracy = paired_comparison(cell.values("final_test_acc"), base.values("final_test_acc"))
        best = paired_comparison(cell.values("best_test_acc"), base.values("best_test_acc"))
        mine, theirs = cell.iterations_to(CONVERGENCE_MARK), base.iterations_to(CONVERGENCE_MARK)
        shared = sorted(set(mine) & set(theirs))
        mine_reached = {s: float(n) for s in shared if (n := mine[s]) is not None}
        theirs_reached = {s: float(n) for s in shared if (n := theirs[s]) is not None}
        reached = (len(mine_reached), len(theirs_reached), len(shared))
        convergence = None
        if shared and reached[0] == reached[1] == len(shared):
            convergence = paired_comparison(mine_reached, theirs_reached)
        comparisons.append(Comparison(cell.regime, cell.model, accuracy, best, convergence, reached))
    return comparisons


def _points(comparison: PairedComparison, scale: float = 100.0, digits: int = 2) -> tuple[str, str, str]:
    d = comparison.difference
    if d.n == 0:
        return "—", "—", "—"
    mean = f"{scale * d.mean:+.{digits}f}"
    interval = "—" if d.n < 2 else f"[{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]"
    p = "—" if not math.isfinite(comparison.p_value) else f"{comparison.p_value:.3f}"
    return mean, interval, p


def _regime_description(plan: GridPlan, regime: Named) -> str:
    config = next(r.planned.config for r in plan.runs if r.regime.name == regime.name)
    return f"width {config.width_mult:g}, batch {config.batch_size}, {config.augment}, {config.iterations} iterations"


def comparison_lines(plan: GridPlan, comparisons: list[Comparison]) -> list[str]:
    """One plain sentence per comparison (used by this report and by reports that summarise it)."""
    lines = []
    for c in comparisons:
        mean, interval, p = _points(c.accuracy)
        baseline = plan.grid.models[plan.grid.baseline].label
        text = f"`{c.regime.name}` ({_regime_description(plan, c.regime)}), {c.model.label} vs {baseline}: "
        if c.accuracy.n == 0:
            lines.append(text + "not run yet")
            continue
        lines.append(
            f"{text}{verdict(c.accuracy)}; final accuracy difference {mean} points, 95% CI {interval}, "
            f"p = {p}, {c.accuracy.n} seed(s)"
        )
    return lines


def _grouped(by_outcome: dict[str, list[str]]) -> str:
    """``outcome: model@regime, ...; ...``, with long pending lists shortened to a count."""
    parts = []
    for outcome, names in by_outcome.items():
        listed = (
            f"{len(names)} comparisons"
            if outcome == "pending" and len(names) > MAX_LISTED_PENDING
            else ", ".join(names)
        )
        parts.append(f"{outcome}: {listed}")
    return "; ".join(parts) or "no results yet"


def _interval_text(low: float, high: float) -> str:
    """``[low, high]`` in signed points, or what stands in for it where one seed pair gives none."""
    return (
        f"[{low:+.2f}, {high:+.2f}]" if math.isfinite(low) and math.isfinite(high) else "(one seed pair, no interval)"
    )


def claim_conclusions(plan: GridPlan, comparisons: list[Comparison]) -> list[str]:
    """The protocol's claims, each with the verdicts so far, in plain words."""
    by_verdict: dict[str, list[str]] = {}
    for c in comparisons:
        by_verdict.setdefault(verdict(c.accuracy).split(" (")[0], []).append(f"{c.model.name}@{c.regime.name}")
    accuracy = _grouped(by_verdict)
    speed: dict[str, list[str]] = {}
    for c in comparisons:
        if c.convergence is not None:
            key = verdict(c.convergence, lower_is_better=True).split(" (")[0]
        elif c.reached[2]:
            key = "not every seed reached 85%"
        else:
            key = "pending"
        speed.setdefault(key, []).append(f"{c.model.name}@{c.regime.name}")
    convergence = _grouped(speed)
    lines = [
        f"**SphereNets at least as accurate as CNN-9** (final accuracy, paired): {accuracy}.",
        f"**SphereNets converge faster** (iterations to {100 * CONVERGENCE_MARK:g}%, paired): {convergence}.",
    ]
    for vary, words in (("width_mult", "width"), ("iterations", "run length")):
        groups = {
            label: sorted(points)
            for label, points in _effect_groups(plan, comparisons, vary).items()
            if len(points) > 1
        }
        if groups:
            trend = "; ".join(
                f"{label}: "
                + ", ".join(f"{x:g} -> {mean:+.2f} {_interval_text(low, high)}" for x, mean, low, high in points)
                for label, points in groups.items()
            )
            lines.append(
                f"**The gain grows with {words}** "
                f"(paired final-accuracy difference in points, 95% CI, by {words}): {trend}."
            )
        else:
            lines.append(
                f"**The gain grows with {words}:** pending "
                f"(no model has paired results at two {words}s with the rest fixed yet)."
            )
    return lines


def _in_words(comparison: Comparison) -> str:
    """What a comparison's final-accuracy interval says, in words a first-time reader follows."""
    n = comparison.accuracy.n
    if n < 2:
        return "one seed pair gives no interval, so this is not yet evidence either way"
    if n < MIN_SEEDS_FOR_VERDICT:
        return (
            f"with {n} seed pairs the interval is wide; the protocol needs {MIN_SEEDS_FOR_VERDICT} before it "
            "calls a difference"
        )
    return {
        "SphereNet worse": "the whole interval is below zero, so at this size the SphereNet is less accurate",
        "SphereNet better": "the whole interval is above zero, so at this size the SphereNet is more accurate",
        "no detectable difference": "the interval includes zero, so no difference is detectable",
    }[verdict(comparison.accuracy)]


def in_short(plan: GridPlan, cells: list[Cell], comparisons: list[Comparison]) -> list[str]:
    """The report's opening: each comparison with a finished pair of runs as one sentence (the
    difference, its interval, the seed pairs and what they allow one to conclude)."""
    means = {(c.regime.name, c.model.name): mean_interval(list(c.values("final_test_acc").values())) for c in cells}
    baseline = plan.grid.models[plan.grid.baseline]
    lines = []
    for c in comparisons:
        if c.accuracy.n == 0:
            continue
        d = c.accuracy.difference
        side = "above" if d.mean > 0 else "below"
        interval = "" if d.n < 2 else f", 95% interval {100 * d.low:+.2f} to {100 * d.high:+.2f}"
        ours, theirs = means[(c.regime.name, c.model.name)], means[(c.regime.name, baseline.name)]
        lines.append(
            f"In regime `{c.regime.name}`, {c.model.label} ended {abs(100 * d.mean):.2f} points {side} "
            f"{baseline.label} ({_pct(ours.mean)}% vs {_pct(theirs.mean)}% final test accuracy; paired by seed"
            f"{interval}; {c.accuracy.n} seed pair(s)): {_in_words(c)}."
        )
    lines = lines or ["No comparison has a finished pair of runs yet."]
    if plan.smoke:
        lines.insert(0, "Smoke scale (a check of the plumbing, a few iterations per run): these numbers mean nothing.")
    return lines


def _run_settings(grid: Grid, regime: Named, model: Named) -> dict:
    return {**grid.base, **regime.overrides, **model.overrides}


def _other_grid_in_short(path: Path, plan: GridPlan) -> list[str]:
    """The opening's lines on the grid at ``path`` (``summary_from``): its comparisons that this grid
    repeats with the same settings, and how all its comparisons of 3 or more seed pairs came out."""
    other_plan = plan_grid(load_grid(path), progress=False)
    cells, _ = collect_cells(other_plan, strict=False)
    comparisons = compare_cells(other_plan, cells)
    mine = {(r.regime.name, r.model.name): _run_settings(plan.grid, r.regime, r.model) for r in plan.runs}
    lines = []
    for c in comparisons:
        key = (c.regime.name, c.model.name)
        same = mine.get(key) == _run_settings(other_plan.grid, c.regime, c.model)
        if same and c.accuracy.n >= MIN_SEEDS_FOR_VERDICT:
            d = c.accuracy.difference
            lines.append(
                f"The full sweep ran the same regime `{c.regime.name}` with {c.accuracy.n} seed pairs: "
                f"{c.model.label} {abs(100 * d.mean):.2f} points {'above' if d.mean > 0 else 'below'} "
                f"{other_plan.grid.models[other_plan.grid.baseline].label}, 95% interval {100 * d.low:+.2f} to "
                f"{100 * d.high:+.2f}: {_in_words(c)}."
            )
    counts: dict[str, int] = {}
    for c in comparisons:
        if c.accuracy.n >= MIN_SEEDS_FOR_VERDICT:
            counts[verdict(c.accuracy)] = counts.get(verdict(c.accuracy), 0) + 1
    if counts:
        parts = [
            f"{counts[key]} {words}"
            for key, words in (
                ("SphereNet better", "with the SphereNet more accurate"),
                ("no detectable difference", "with no detectable difference"),
                ("SphereNet worse", "with the SphereNet less accurate"),
            )
            if key in counts
        ]
        lines.append(
            f"Over all its regimes and operators, the sweep has {sum(counts.values())} finished comparison(s) of "
            f"{MIN_SEEDS_FOR_VERDICT} or more seed pairs: {', '.join(parts)} (listed in the last section)."
        )
    return lines


def _effect_groups(
    plan: GridPlan, comparisons: list[Comparison], vary: str
) -> dict[str, list[tuple[float, float, float, float]]]:
    """Effect points (x, mean, low, high in points) grouped by model and the settings held fixed."""
    groups: dict[str, list[tuple[float, float, float, float]]] = {}
    for c in comparisons:
        d = c.accuracy.difference
        if d.n == 0:
            continue
        config = next(r.planned.config for r in plan.runs if r.regime.name == c.regime.name)
        held = {"width_mult": f"{config.iterations} it", "iterations": f"width {config.width_mult:g}"}[vary]
        label = f"{c.model.name}, {held}, batch {config.batch_size}, {config.augment}"
        groups.setdefault(label, []).append((float(getattr(config, vary)), 100 * d.mean, 100 * d.low, 100 * d.high))
    return groups


def _results_page_link(out: Path) -> str:
    """A markdown link to the results page: relative from a folder of the same tree, else absolute."""
    page = Path(RESULTS_PAGE).resolve()
    if not page.is_file():
        return f"`{RESULTS_PAGE}` of the source tree"
    try:
        Path(out).resolve().relative_to(Path.cwd())
    except ValueError:
        return f"[{RESULTS_PAGE}]({page.as_uri()})"
    return f"[{RESULTS_PAGE}]({os.path.relpath(page, Path(out).resolve())})"


def write_grid_report(plan: GridPlan, command: str) -> Path:
    """Rewrite ``report.md`` and its plots in the results folder from the results files present."""
    grid, out = plan.grid, plan.results_dir
    out.mkdir(parents=True, exist_ok=True)
    cells, _ = collect_cells(plan)
    comparisons = compare_cells(plan, cells)
    thresholds = [t for t in thresholds_for(plan.runs[0].planned.config.dataset)][:3]
    done = sum(len(c.documents) for c in cells)
    finished = sorted(d["finished"] for c in cells for d in c.documents.values())
    machines = sorted({d.get("machine", "") for c in cells for d in c.documents.values()})
    parts = [
        f"# {grid.title} (grid `{grid.name}`)",
        "",
        f"- command: `{command}`",
        f"- grid file: `{grid.path}`; protocol and discussion: {_results_page_link(out)}",
        f"- runs finished: {done} of {len(plan.runs)}"
        + (f", between {finished[0]} and {finished[-1]}" if finished else ""),
        f"- machine: {'; '.join(machines) or describe_machine()}",
    ]
    if plan.smoke:
        parts.append(
            "- **smoke scale**: every run shrunk to a few iterations on a few hundred images; the numbers mean nothing"
        )
    parts += ["", "## In short", ""] + [f"- {line}" for line in in_short(plan, cells, comparisons)]
    if grid.summary_from is not None:
        parts += [line for text in _other_grid_in_short(grid.summary_from, plan) for line in ("", text)]
    parts += ["", "## Verdicts (pre-registered rules; primary measure: final test accuracy)", ""]
    parts += [f"- {line}" for line in claim_conclusions(plan, comparisons)]
    parts += [
        "",
        "| regime | model vs baseline | seeds | final acc. difference (points) | 95% CI | p (paired t) | verdict "
        "| best acc. difference [95% CI] | iterations to 85%: difference [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        mean, interval, p = _points(c.accuracy)
        best_mean, best_interval, _ = _points(c.best)
        best = "—" if c.best.n == 0 else f"{best_mean} {best_interval}"
        if c.convergence is not None:
            conv_mean, conv_interval, _ = _points(c.convergence, scale=1.0, digits=0)
            convergence = f"{conv_mean} {conv_interval}"
        else:
            convergence = f"reached by {c.reached[0]} / {c.reached[1]} of {c.reached[2]} seeds" if c.reached[2] else "—"
        parts.append(
            f"| `{c.regime.name}` | {c.model.name} vs {grid.baseline} | {c.accuracy.n} | {mean} | {interval} | {p} | "
            f"{verdict(c.accuracy)} | {best} | {convergence} |"
        )
    header = ["regime", "model", "seeds done", "final acc. % mean [95% CI]", "best acc. % mean [95% CI]"]
    header += [f"iters to {100 * t:g}% (seeds reaching)" for t in thresholds] + ["images/s"]
    parts += ["", "## Cells", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    pending = []
    for cell in cells:
        n = len(cell.documents)
        if n == 0:
            pending.append(f"`{cell.regime.name}`/{cell.model.name}")
        reach = []
        for t in thresholds:
            steps = [s for s in cell.iterations_to(t).values() if s is not None]
            reach.append("—" if not steps else f"{sum(steps) / len(steps):,.0f} ({len(steps)}/{n})")
        speeds = [v for v in cell.values("images_per_second").values()]
        diverged = sum("diverged" in d for d in cell.documents.values())
        seeds_text = f"{n}/{len(cell.planned_seeds)}" + (f" ({diverged} diverged)" if diverged else "")
        parts.append(
            "| "
            + " | ".join(
                [
                    f"`{cell.regime.name}`",
                    cell.model.label,
                    seeds_text,
                    _estimate_text(list(cell.values("final_test_acc").values())),
                    _estimate_text(list(cell.values("best_test_acc").values())),
                    *reach,
                    f"{sum(speeds) / len(speeds):,.0f}" if speeds else "—",
                ]
            )
            + " |"
        )
    parts += ["", "Regimes:", ""]
    parts += [
        f"- `{r.name}`: {r.label} ({_regime_description(plan, r)})"
        for r in grid.regimes.values()
        if any(x.regime.name == r.name for x in plan.runs)
    ]
    if pending:
        parts += ["", f"Pending cells (no finished run yet): {', '.join(pending)}."]
    parts += ["", "## Plots", ""]
    for regime in grid.regimes.values():
        regime_cells = [c for c in cells if c.regime.name == regime.name and c.documents]
        if not regime_cells:
            continue
        curves = {
            c.model.label: [series(d["metrics"], "test_acc") for d in c.documents.values() if "metrics" in d]
            for c in regime_cells
        }
        name = f"test_acc_{regime.name}.png"
        plot_curves(
            curves,
            out / name,
            title=f"{grid.name} `{regime.name}`: {_regime_description(plan, regime)} (mean over seeds, range shaded)",
        )
        parts.append(f"![test accuracy, regime {regime.name}]({name})")
    for vary, xlabel, name in (
        ("width_mult", "width multiplier", "effect_width.png"),
        ("iterations", "iterations", "effect_length.png"),
    ):
        groups = _effect_groups(plan, comparisons, vary)
        if any(len(points) > 1 for points in groups.values()):
            plot_effects(
                groups,
                out / name,
                xlabel=xlabel,
                log_x=True,
                title=f"{grid.name}: SphereNet - CNN (paired, 95% CI) against {xlabel}",
            )
            parts.append(f"![effect against {xlabel}]({name})")
    parts += [
        "",
        "Accuracies are on the test set named by the runs' settings, in percent; intervals are 95% "
        "Student-t intervals over seeds; differences are paired by seed (same data order and "
        "augmentation). `iters to X%` is the first evaluated iteration at or above X%.",
    ]
    if grid.summary_from is not None:
        parts += ["", *summary_of_other_grid(grid.summary_from, out)]
    report = out / REPORT_FILE
    temporary = report.with_suffix(f".md.{os.getpid()}.tmp")  # two workers may report at once
    temporary.write_text("\n".join(parts) + "\n")
    temporary.replace(report)
    return report


def summary_of_other_grid(path: Path, report_dir: Path) -> list[str]:
    """Markdown lines summarising the committed results of the grid file at ``path``.

    The lines go into a report written in ``report_dir``.
    """
    other = load_grid(path)
    plan = plan_grid(other, progress=False)
    link = (
        f"Protocol, all cells and discussion: {_results_page_link(report_dir)} and `{plan.results_dir / REPORT_FILE}`."
    )
    cells, ignored = collect_cells(plan, strict=False)
    done = sum(len(c.documents) for c in cells)
    if ignored:
        link += f" ({ignored} results file(s) made with settings other than the grid file's are left out.)"
    title = f"## What the full sweep (`{other.path}`) has found so far"
    if done == 0:
        return [title, "", f"No run of the sweep has finished yet ({len(plan.runs)} planned). {link}"]
    comparisons = compare_cells(plan, cells)
    lines = [title, "", f"{done} of {len(plan.runs)} runs finished. {link}", ""]
    lines += [f"- {line}" for line in claim_conclusions(plan, comparisons)[:2]]
    lines += [f"- {line}" for line in comparison_lines(plan, comparisons) if not line.endswith("not run yet")]
    return lines


def run_grid(
    grid_file: str | os.PathLike,
    *,
    command: str,
    log: Callable[[str], None] = print,
    only: str | None = None,
    **options,
) -> Path:
    """Plan, train what is missing (of the cells ``only`` names, see :func:`select_runs`), and
    report; returns the report's path (options: :func:`plan_grid`)."""
    grid = load_grid(grid_file)
    plan = plan_grid(grid, **options)
    runs = select_runs(plan, only)
    source_version()  # the code this process runs, before anyone edits the tree
    done = sum(results_path(plan, r).is_file() for r in plan.runs)
    selected = f" ({len(runs)} selected by --only {only})" if only is not None else ""
    log(
        f"grid {grid.name}: {len(plan.runs)} run(s){selected}, {done} already in {plan.results_dir / RUNS_DIR}; "
        f"training in {plan.train_dir}"
    )
    try:
        execute_grid(plan, command, log, runs)
    finally:  # stopped by a signal or an error: the report still covers every finished run
        report = write_grid_report(plan, command)
    cells, _ = collect_cells(plan)
    for line in in_short(plan, cells, compare_cells(plan, cells)):
        log(line)
    for line in _other_grid_in_short(grid.summary_from, plan) if grid.summary_from is not None else []:
        log(line)
    return report


def describe_plan(plan: GridPlan, runs: list[GridRun] | None = None) -> list[str]:
    """One line per run (of ``runs``, default all): order, id, status (for a partial run, the step
    its checkpoint holds and whether a process is training it now) and the key settings; then the
    count per status (for ``--dry-run``)."""
    from ..engine.checkpoint import checkpoint_dir, list_checkpoints

    lines = []
    counts: dict[str, int] = {}
    numbered = _numbered(plan, runs)
    for index, run in numbered:
        config = run.planned.config
        state = "recorded" if results_path(plan, run).is_file() else run_status(run.planned)
        counts[state] = counts.get(state, 0) + 1
        if state == "partial":
            steps = list_checkpoints(checkpoint_dir(run.planned.out))
            state += f" (checkpoint at step {steps[-1][0]:,} of {config.iterations:,})" if steps else ""
        if state != "recorded" and (owner := _lock_owner(run)) is not None:
            state += f", being trained by process {owner}"
        lines.append(
            f"  {index:3d}. {run.run_id}: {state}; operator={config.operator} width_mult={config.width_mult:g} "
            f"batch_size={config.batch_size} augment={config.augment} iterations={config.iterations} "
            f"eval_every={config.eval_every}"
        )
    of = (
        f"{len(numbered)} selected of {len(plan.runs)} runs"
        if len(numbered) < len(plan.runs)
        else f"{len(plan.runs)} runs"
    )
    lines.append("  " + ", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {of})")
    return lines
