"""Run a reproduction: every variant of an experiment for every seed, then the report.

Runs go to ``OUT/EXPERIMENT/<variant>/seed<k>/`` (a normal ``sphereconv train`` output). A run
whose ``summary.json`` exists is not trained again, a run with checkpoints continues from the
newest one, so an interrupted ``sphereconv reproduce`` picks up where it stopped. A run found
there with different settings (another scale or length, say), whether finished, diverged or
stopped after a checkpoint, is never mixed in or continued silently: it is an error naming the
differing keys.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..configs import preset_path
from ..engine.checkpoint import checkpoint_dir
from ..errors import ConfigError, DatasetError, TrainingDivergedError
from .definitions import Experiment, Variant, get_experiment
from .features import features2d_panels
from .plots import plot_curves, plot_features2d, plot_sweep
from .report import ReportContext, describe_machine, write_report
from .results import SUMMARY_FILE, RunResult, series, summarise_runs, thresholds_for
from .scales import Scale, get_scale

if TYPE_CHECKING:
    from ..engine.config import TrainConfig

DIVERGED_FILE = "diverged.json"
# Keys that do not change what a run computes; a finished run is reused even if they differ.
EXECUTION_KEYS = frozenset(
    {
        "out",
        "resume",
        "overwrite",
        "progress",
        "device",
        "data_dir",
        "download",
        "tensorboard",
        "eval_batch_size",
        "checkpoint_every",
        "keep_checkpoints",
        "compile",
        "channels_last",
    }
)
# Digit datasets for the 2-D feature experiment (NIPS 2017 Sec. 5.4 uses MNIST), best first.
DIGIT_DATASETS = ("mnist",)


@dataclass
class PlannedRun:
    """One training run of a reproduction: variant, seed, output directory, validated config."""

    variant: Variant
    seed: int
    out: Path
    config: TrainConfig


@dataclass
class Plan:
    """All runs of a reproduction plus what the report needs to say about them."""

    experiment: Experiment
    scale: Scale
    out: Path
    runs: list[PlannedRun]
    dataset: str
    device: str
    seeds: int
    notes: list[str]
    config_file: Path | None


def _same_files(name: str, other: str, data_dir: str | None) -> bool:
    """True if the test files found for dataset ``name`` are those of dataset ``other``.

    MNIST and Fashion-MNIST use identical file names, so a folder of one passes a name-based
    search for the other.
    """
    from ..data.discovery import find_split_files
    from ..data.registry import DATASETS

    if name not in DATASETS or other not in DATASETS:
        return False
    found = [find_split_files(DATASETS[n], "test", data_dir).directory for n in (name, other)]
    return found[0] is not None and found[0] == found[1]


def _digits_dataset(fallback: str, data_dir: str | None, download: bool) -> tuple[str, str]:
    """MNIST when its files can be found (or downloaded), else ``fallback``, plus a note saying which."""
    from ..data import load_dataset

    for name in DIGIT_DATASETS:
        if _same_files(name, fallback, data_dir):
            return (
                fallback,
                f"{name} is not available here (the files found are {fallback}'s); "
                f"the features were learned on {fallback} instead",
            )
        try:
            load_dataset(name, "test", data_dir=data_dir, download=download, progress=False)
        except DatasetError:
            hint = "" if download else "; pass --download to fetch it"
            return (
                fallback,
                f"{name} is not available here (no {name} files found{hint}), "
                f"so the features were learned on {fallback} instead",
            )
        return name, f"features learned on {name} (digits)"
    return fallback, f"features learned on {fallback}"


def plan_experiment(
    name: str,
    scale: str = "small",
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    seeds: int | None = None,
    out: str | Path = "runs/reproduce",
    device: str | None = None,
    iterations: int | None = None,
    width_mult: float | None = None,
    download: bool = False,
    progress: bool = True,
) -> Plan:
    """Resolve and validate the config of every run without training anything.

    ``iterations`` and ``width_mult`` replace the scale's (the width experiment's factors then
    apply to the given width). Raises :class:`ConfigError` for an unknown experiment or scale, a
    non-positive seed count or iteration count, or any invalid resulting config.
    """
    from ..engine import load_config
    from ..engine.config import resolve_device_name

    experiment = get_experiment(name)
    preset = get_scale(scale)
    if seeds is None:
        seeds = preset.default_seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"invalid seeds={seeds!r}: expected a positive integer")
    file_name = experiment.scale_config_files.get(preset.name, preset.config_file)
    config_file = preset_path(file_name) if file_name else None

    base = dict(preset.overrides)
    base.update(experiment.scale_overrides.get(preset.name, {}))
    notes: list[str] = []
    if iterations is not None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"invalid iterations={iterations!r}: expected a positive integer")
        base["iterations"] = iterations
        base["eval_every"] = max(1, iterations // preset.evaluations_per_run)
    for key, value in (
        ("data_dir", data_dir),
        ("device", device),
        ("download", download or None),
        ("width_mult", width_mult),
    ):
        if value is not None:
            base[key] = value
    base["progress"] = progress
    if dataset is not None:
        base["dataset"] = dataset
    elif experiment.prefers_digits:
        fallback = load_config(config_file, base).dataset
        base["dataset"], note = _digits_dataset(fallback, data_dir, download)
        if note:
            notes.append(note)
    resolved_base = load_config(config_file, base)

    out = Path(out) / experiment.name
    runs = []
    for variant in experiment.variants:
        overrides = {**base, **variant.overrides}
        if variant.width_factor != 1.0:
            overrides["width_mult"] = resolved_base.width_mult * variant.width_factor
        for seed in range(seeds):
            run_dir = out / variant.name / f"seed{seed}"
            config = load_config(config_file, {**overrides, "seed": seed, "out": str(run_dir)})
            runs.append(PlannedRun(variant, seed, run_dir, config))
    device_name = resolve_device_name(resolved_base.device)
    return Plan(experiment, preset, out, runs, resolved_base.dataset, device_name, seeds, notes, config_file)


def _comparable(values: dict) -> dict:
    """Config values that decide what a run computes, normalised through YAML."""
    return yaml.safe_load(yaml.safe_dump({k: v for k, v in values.items() if k not in EXECUTION_KEYS}))


# How the refusal of a run made with other settings names it, by its status (see run_status).
_STATUS_WORDS = {"finished": "a finished run", "diverged": "a diverged run", "partial": "an unfinished run"}


def check_run_matches(run: PlannedRun, status: str = "finished") -> None:
    """:class:`ConfigError` if ``run.out`` holds a run made with settings other than ``run.config``'s.

    Checked for finished and diverged runs (which are reused) and for partial ones before they are
    resumed: a resume may lengthen a run, but the lengthened run keeps the learning-rate schedule
    and margin annealing of its first length, so it computes neither the old run nor a new one.
    Any other ``status`` (see :func:`run_status`) has nothing there to reuse or continue.
    """
    if status not in _STATUS_WORDS:
        return
    from ..engine.config import config_to_dict
    from ..engine.run_dir import resumed_config_values

    saved_values = resumed_config_values(run.out)  # config.yaml with the run's amendments
    if saved_values is None:
        return
    saved = _comparable(saved_values)
    wanted = _comparable(config_to_dict(run.config))
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} there vs {wanted.get(k)!r} now" for k in differing[:4])
        raise ConfigError(
            f"{run.out} holds {_STATUS_WORDS[status]} with different settings ({details}); "
            "pass another --out or delete that directory"
        )


def run_status(run: PlannedRun) -> str:
    """``finished``, ``diverged``, ``partial`` (has checkpoints), ``stale`` (other files) or ``new``."""
    if (run.out / SUMMARY_FILE).is_file():
        return "finished"
    if (run.out / DIVERGED_FILE).is_file():
        return "diverged"
    checkpoints = checkpoint_dir(run.out)
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return "partial"
    if run.out.is_dir() and any(run.out.iterdir()):
        return "stale"
    return "new"


def train_run(run: PlannedRun, status: str) -> str:
    """Train (or continue, if ``status`` is ``partial``) one run; returns a one-line outcome."""
    from ..engine import train

    config = dataclasses.replace(run.config, resume=status == "partial", overwrite=status == "stale")
    try:
        summary = train(config)
    except TrainingDivergedError as exc:
        (run.out / DIVERGED_FILE).write_text(json.dumps({"error": str(exc)}) + "\n")
        return f"diverged ({exc})"
    if summary.get("interrupted"):
        # The engine stopped on a signal after saving a checkpoint: stop the whole reproduction;
        # running the same command again resumes this run.
        raise KeyboardInterrupt(summary["interrupted"])
    return f"final {_percent(summary.get('final_test_acc'))}, best {_percent(summary.get('best_test_acc'))}"


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def execute_plan(plan: Plan, log: Callable[[str], None] = print) -> None:
    """Train every run of ``plan`` that has not finished yet."""
    total = len(plan.runs)
    for index, run in enumerate(plan.runs, start=1):
        status = run_status(run)
        tag = f"[{index}/{total}] {plan.experiment.name}/{run.variant.name}/seed{run.seed}"
        check_run_matches(run, status)
        if status == "finished":
            log(f"{tag}: already finished, skipped")
            continue
        if status == "diverged":
            log(f"{tag}: diverged earlier, skipped")
            continue
        started = time.perf_counter()
        outcome = train_run(run, status)
        resumed = " (resumed)" if status == "partial" else ""
        log(f"{tag}{resumed}: {outcome} in {time.perf_counter() - started:.0f} s")


def _collect(plan: Plan) -> tuple[list[tuple[Variant, list[RunResult], dict]], list[str]]:
    thresholds = thresholds_for(plan.dataset)
    collected, notes = [], []
    for variant in plan.experiment.variants:
        runs = []
        for run in (r for r in plan.runs if r.variant is variant):
            if run_status(run) == "diverged":
                error = json.loads((run.out / DIVERGED_FILE).read_text()).get("error", "")
                notes.append(f"`{variant.name}` seed {run.seed} diverged and is left out: {error}")
                continue
            runs.append(RunResult.load(run.out, run.seed))
        collected.append((variant, runs, summarise_runs(runs, thresholds)))
    return collected, notes


def write_outputs(plan: Plan, command: str) -> Path:
    """Plots, ``report.md`` and ``results.json`` of a fully trained plan; returns the report path."""
    collected, notes = _collect(plan)
    images = []
    for metric in ("test_acc", "train_loss"):
        groups = {variant.name: [series(r.metrics, metric) for r in runs] for variant, runs, _ in collected}
        plot_curves(
            groups,
            plan.out / f"{metric}.png",
            metric=metric,
            title=f"{plan.experiment.title} ({plan.dataset}, {plan.scale.name})",
        )
        images.append(f"{metric}.png")
    if plan.experiment.sweep_label:
        points: dict[str, list] = {}
        for variant, runs, _ in collected:
            if runs and variant.sweep_value is not None:
                points.setdefault(variant.group or variant.name, []).append(
                    (variant.sweep_value, [r.final_test_acc for r in runs])
                )
        plot_sweep(
            points,
            plan.out / "sweep.png",
            xlabel=plan.experiment.sweep_label,
            log_x=plan.experiment.sweep_log,
            title=plan.experiment.title,
        )
        images.append("sweep.png")
    if plan.experiment.features2d:
        panels, class_names = features2d_panels(
            [(variant.label, runs[0].path) for variant, runs, _ in collected if runs]
        )
        plot_features2d(
            panels, plan.out / "features2d.png", class_names=class_names, title=f"2-D test features ({plan.dataset})"
        )
        images.append("features2d.png")
    context = ReportContext(
        command=command,
        scale=plan.scale.name,
        dataset=plan.dataset,
        device=plan.device,
        seeds=plan.seeds,
        thresholds=thresholds_for(plan.dataset),
        notes=plan.notes + notes,
        machine=describe_machine(plan.device),
    )
    return write_report(plan.out, plan.experiment, context, collected, images)


def default_command(plan: Plan) -> str:
    """The ``sphereconv reproduce`` command line equivalent to ``plan`` (for the report)."""
    return (
        f"sphereconv reproduce {plan.experiment.name} --scale {plan.scale.name} "
        f"--seeds {plan.seeds} --out {plan.out.parent}"
    )


def run_experiment(
    name: str, scale: str = "small", *, command: str | None = None, log: Callable[[str], None] = print, **options
) -> Path:
    """Plan, train (skipping finished runs) and report one experiment; returns ``report.md``'s path.

    ``options`` are those of :func:`plan_experiment` (dataset, data_dir, seeds, out, device,
    iterations, width_mult, download, progress).
    """
    plan = plan_experiment(name, scale, **options)
    log(
        f"{plan.experiment.name}: {len(plan.experiment.variants)} variant(s) x {plan.seeds} seed(s) at scale "
        f"'{plan.scale.name}' on {plan.dataset} -> {plan.out}"
    )
    for note in plan.notes:
        log(f"note: {note}")
    execute_plan(plan, log)
    return write_outputs(plan, command or default_command(plan))
