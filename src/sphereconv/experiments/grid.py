"""Grid files and their runs: what ``sphereconv reproduce --grid configs/sweeps/NAME.yaml`` trains.

A grid file names models (TrainConfig overrides such as the SphereConv operator), regimes (width,
batch, length, augmentation), seeds and stages: the run order, stage by stage and seed by seed
within a stage, so that runs stopped part-way still leave SphereNet and CNN results with the same
seeds. It serves the pre-registered comparison of SphereNets and CNNs in docs/RESULTS.md, which
asks where the gains Liu et al. report (NIPS 2017, Sec. 5.1-5.2) show at CPU sizes.

Each finished run leaves a small JSON file, ``RESULTS/runs/<regime>-<model>-s<seed>.json``: its
settings, its evaluation curve and its summary. A run whose file exists is never trained again, so
a results folder kept in version control carries a sweep from one machine or day to the next.

Grid file keys: ``name``, ``title``, ``seeds``, ``baseline`` (the model the others are compared
with), ``results`` (folder, relative to the working directory; default ``OUT/<name>``), ``base``
(overrides of every run), ``models`` and ``regimes`` (name -> ``label`` plus overrides),
``stages`` (list of ``{regime, models}``), and optionally ``summary_from``: another grid file
(relative to this one) whose results the report summarises too.

This module parses grid files, plans their runs and reads and writes the results files;
:mod:`.sweep` trains the runs and :mod:`.grid_report` writes the combined report.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .._validation import is_real
from ..errors import ConfigError
from .definitions import Variant
from .report import describe_machine
from .results import read_metrics, read_summary
from .runner import DIVERGED_FILE, PlannedRun
from .scales import get_scale

GRID_KEYS = frozenset(
    {"name", "title", "seeds", "baseline", "results", "base", "models", "regimes", "stages", "summary_from"}
)
RUNS_DIR = "runs"
# Metrics kept in a run's results file (the rest of metrics.jsonl stays in the run directory).
KEPT_METRICS = ("step", "test_acc", "test_loss", "train_loss", "train_acc", "lr", "seconds")
# A smoke-scale grid multiplies every regime's width by this (width 1/4 becomes 1/16, the smoke width).
SMOKE_WIDTH_FACTOR = 0.25
# Model and regime names: run ids join them with "-" (REGIME-MODEL-sSEED) and --only splits
# REGIME/MODEL, and the ids name folders, so neither character (nor a path separator) may occur.
_NAME = re.compile(r"[A-Za-z0-9_.]+")


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

    def overrides(self, regime: Named, model: Named) -> dict:
        """The TrainConfig overrides of a run of ``model`` in ``regime``: base, then regime, then model."""
        return {**self.base, **regime.overrides, **model.overrides}


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
        if not _NAME.fullmatch(str(name)) or str(name) in (".", ".."):
            raise ConfigError(
                f"{path}: {what} name {str(name)!r} may use only letters, digits, '_' and '.' "
                "(run ids join names with '-' and name folders)"
            )
        body = dict(_mapping(body, f"{path}: {what}.{name}"))
        entries[str(name)] = Named(str(name), str(body.pop("label", name)), body)
    if not entries:
        raise ConfigError(f"{path}: {what} is empty")
    return entries


def load_grid(path: str | os.PathLike) -> Grid:
    """Parse and check a grid file; raises :class:`ConfigError` naming the bad key or value."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a grid file" if path.is_dir() else "does not exist"
        raise ConfigError(f"grid file {str(path)!r} {problem}")
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
        if not isinstance(regime, str) or regime not in regimes:
            raise ConfigError(f"{path}: stage {number} names regime {regime!r}; regimes: {', '.join(regimes)}")
        if not isinstance(names, list) or not names or any(not isinstance(n, str) or n not in models for n in names):
            raise ConfigError(
                f"{path}: stage {number} models must be a list drawn from: {', '.join(models)}; got {names!r}"
            )
        stages.append((regime, tuple(names)))
    if not stages:
        raise ConfigError(f"{path}: stages is empty")
    for key in ("results", "summary_from"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key} must be a path (a string); got {raw[key]!r}")
    summary_from = raw.get("summary_from")
    if summary_from and not (path.parent / summary_from).is_file():
        # Found out only when the first report is written, after a run has trained, otherwise.
        raise ConfigError(
            f"{path}: summary_from {summary_from!r} is not a grid file (looked for {path.parent / summary_from}; "
            "it is relative to this grid file)"
        )
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
                overrides = grid.overrides(regime, model)
                settings = {**overrides, **shrink, "seed": seed}
                if smoke:  # keep the regimes' relative widths: 1/4 becomes the smoke scale's 1/16
                    settings["width_mult"] = overrides.get("width_mult", 1.0) * SMOKE_WIDTH_FACTOR
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


def _malformed(document: dict) -> str | None:
    """What in a results document the report cannot read (a hand edit, a bad merge), else None."""
    if not isinstance(document.get("settings", {}), dict):
        return "settings is not an object"
    for key in ("finished", "machine"):
        if document.get(key) is not None and not isinstance(document[key], str):
            return f"{key} is not a string"
    summary = document.get("summary", {})
    if not isinstance(summary, dict):
        return "summary is not an object"
    for key in ("final_test_acc", "best_test_acc", "images_per_second"):
        if summary.get(key) is not None and not is_real(summary[key]):
            return f"summary.{key} is {summary[key]!r}, not a number"
    metrics = document.get("metrics", [])
    if not isinstance(metrics, list):
        return "metrics is not a list"
    for number, record in enumerate(metrics, start=1):
        if not isinstance(record, dict) or not is_real(record.get("step")):
            return f"metrics record {number} has no numeric step"
    return None


def load_recorded(plan: GridPlan, run: GridRun) -> dict | None:
    """The results file of ``run`` if present; :class:`ConfigError` if it was made with other settings."""
    path = results_path(plan, run)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg}); delete it to rerun that run") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} does not hold a JSON object; delete it to rerun that run")
    problem = _malformed(document)
    if problem:
        raise ConfigError(
            f"{path} is not a results file as the sweep writes it ({problem}); delete it to rerun that run"
        )
    saved = document.get("settings", {})
    differing = sorted(k for k in set(saved) | set(run.settings) if saved.get(k) != run.settings.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} there vs {run.settings.get(k)!r} now" for k in differing[:4])
        raise ConfigError(
            f"{path} was made with different settings ({details}); move it away or use another --results folder"
        )
    return document


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
