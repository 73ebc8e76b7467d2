"""``sphereconv reproduce --grid``: order, results files, skipping, resuming and the report (smoke scale)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from png_checks import CURVE_PLOT_SIZE, assert_png

from sphereconv.cli.main import main
from sphereconv.engine import save_config
from sphereconv.errors import ConfigError
from sphereconv.experiments import sweep
from sphereconv.experiments.grid import load_grid, plan_grid, results_path, select_runs
from sphereconv.experiments.grid_report import summary_of_other_grid, write_grid_report
from sphereconv.experiments.sweep import describe_plan, execute_grid

ROOT = Path(__file__).resolve().parents[2]
CLAIMS = ROOT / "configs" / "sweeps" / "claims.yaml"

TINY_GRID = {
    "name": "tiny",
    "title": "Tiny grid",
    "seeds": [0, 1],
    "baseline": "cnn",
    "base": {
        "model": "spherenet9",
        "model_kwargs": {"bn_momentum": 0.1},
        "dataset": "fashion-mnist",
        "iterations": 600,
    },
    "models": {
        "cnn": {"label": "CNN-9", "operator": "none"},
        "cosine": {"label": "SphereNet-9 cosine", "operator": "cosine"},
    },
    "regimes": {"A": {"label": "regime A", "width_mult": 0.25}},
    "stages": [{"regime": "A", "models": ["cnn", "cosine"]}],
}


def write_grid(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**TINY_GRID, **changes}))
    return path


def grid_main(grid: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "reproduce",
            "--grid",
            str(grid),
            "--scale",
            "smoke",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_claims_grid_is_the_registered_protocol(tmp_path):
    plan = plan_grid(load_grid(CLAIMS), out=tmp_path, progress=False)
    assert len(plan.runs) == 60 and plan.results_dir == Path("docs/results/sweep")
    # Paired order: CNN and cosine alternate seed by seed before anything else runs.
    assert [r.run_id for r in plan.runs[:6]] == [
        "S-cnn-s0",
        "S-cosine-s0",
        "S-cnn-s1",
        "S-cosine-s1",
        "S-cnn-s2",
        "S-cosine-s2",
    ]
    assert [r.run_id for r in plan.runs[6:8]] == ["S-linear-s0", "S-sigmoid-s0"]
    first = plan.runs[0].planned.config
    assert (first.width_mult, first.batch_size, first.augment, first.iterations, first.eval_every) == (
        0.25,
        128,
        "crop_flip",
        600,
        100,
    )
    assert first.test_subset is None and first.train_subset is None  # full 10k test set, all 60k images
    for run in plan.runs:
        config = run.planned.config
        assert config.model_kwargs == {"bn_momentum": 0.1} and config.loss == "softmax"
        assert (config.optimizer, config.lr, config.lr_milestones) == ("adam", 1e-3, [34 / 64, 54 / 64])
        assert (config.weight_decay, config.sphere_weight_decay, config.orthogonality) == (5e-4, 0.0, 1e-4)
    regimes = {r.regime.name: r.planned.config for r in plan.runs}
    assert (regimes["Q"].batch_size, regimes["Q"].iterations, regimes["Q"].augment) == (32, 1500, "none")
    assert (regimes["L"].iterations, regimes["WL"].width_mult, regimes["WL"].iterations) == (3000, 0.5, 3000)
    assert {r.seed for r in plan.runs} == {0, 1, 2}
    # A smoke run never writes into the committed results folder.
    assert plan_grid(load_grid(CLAIMS), out=tmp_path, smoke=True, progress=False).results_dir == tmp_path / "claims"


@pytest.mark.slow  # five smoke-scale trainings (a few seconds each): the resume path needs real checkpoints
def test_grid_runs_skips_resumes_and_reports(tmp_path, capsys):
    grid = write_grid(tmp_path / "tiny.yaml")
    out, results = tmp_path / "out", tmp_path / "results"
    # Split between two workers by --only: each trains its cells, numbered by their place in the grid.
    assert grid_main(grid, out, "--results", str(results), "--only", "A/cosine") == 0
    log = capsys.readouterr().out
    assert [line.split(":")[0] for line in log.splitlines() if line.startswith("[")] == [
        "[2/4] A-cosine-s0",
        "[4/4] A-cosine-s1",
    ]
    assert grid_main(grid, out, "--results", str(results), "--only", "A/cnn") == 0
    log = capsys.readouterr().out
    assert [line.split(":")[0] for line in log.splitlines() if line.startswith("[")] == [
        "[1/4] A-cnn-s0",
        "[3/4] A-cnn-s1",
    ]
    files = sorted(p.name for p in (results / "runs").iterdir())
    assert files == ["A-cnn-s0.json", "A-cnn-s1.json", "A-cosine-s0.json", "A-cosine-s1.json"]
    document = json.loads((results / "runs" / "A-cosine-s1.json").read_text())
    assert document["settings"]["operator"] == "cosine" and document["settings"]["seed"] == 1
    assert document["metrics"][-1]["step"] == 8 and 0 <= document["summary"]["final_test_acc"] <= 1
    assert (results / "runs" / "A-cosine-s1.json").stat().st_size < 10_000
    report = (results / "report.md").read_text()
    assert "| `A` | cosine vs cnn | 2 |" in report and "pending (2/3 paired seeds)" in report
    assert "| `A` | CNN-9 | 2/2 |" in report
    assert_png(results / "test_acc_A.png", CURVE_PLOT_SIZE)

    # Pre-seeded results folder: a fresh training folder trains nothing.
    assert grid_main(grid, tmp_path / "elsewhere", "--results", str(results)) == 0
    assert capsys.readouterr().out.count("skipped") == 4 and not (tmp_path / "elsewhere" / "tiny" / "train").exists()

    # A run killed after a checkpoint (no summary, no results file yet) resumes from it.
    killed = out / "tiny" / "train" / "A-cnn-s1"
    (killed / "summary.json").unlink()
    (results / "runs" / "A-cnn-s1.json").unlink()
    assert any((killed / "checkpoints").iterdir())
    assert grid_main(grid, out, "--results", str(results)) == 0
    log = capsys.readouterr().out
    assert "A-cnn-s1: resumed:" in log and log.count("skipped") == 3
    assert json.loads((results / "runs" / "A-cnn-s1.json").read_text())["summary"]["steps"] == 8

    # A results file made with other settings is refused, naming the setting.
    changed = write_grid(tmp_path / "changed.yaml", regimes={"A": {"label": "regime A", "width_mult": 0.5}})
    assert grid_main(changed, out, "--results", str(results)) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "width_mult" in err


@pytest.mark.slow  # six tiny trainings: the effect plot needs two regimes with a SphereNet and a CNN each
def test_report_has_paired_effect_plots_and_the_other_grids_summary(tmp_path, capsys):
    # A sweep sized by its own file (no --scale smoke), as the committed one is.
    tiny = {
        **TINY_GRID["base"],
        "train_subset": 256,
        "test_subset": 128,
        "iterations": 8,
        "batch_size": 16,
        "eval_every": 4,
        "schedule": "constant",
    }
    sweep = write_grid(
        tmp_path / "sweep.yaml",
        name="sweep",
        seeds=[0],
        results=str(tmp_path / "committed"),
        base=tiny,
        regimes={"A": {"label": "narrow", "width_mult": 0.0625}, "B": {"label": "wide", "width_mult": 0.125}},
        stages=[{"regime": "A", "models": ["cnn", "cosine"]}, {"regime": "B", "models": ["cnn", "cosine"]}],
    )
    assert (
        main(["reproduce", "--grid", str(sweep), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")])
        == 0
    )
    report = (tmp_path / "committed" / "report.md").read_text()
    assert "![effect against width multiplier](effect_width.png)" in report
    assert_png(tmp_path / "committed" / "effect_width.png", CURVE_PLOT_SIZE)
    quick = write_grid(tmp_path / "quick.yaml", name="quick", seeds=[0], summary_from="sweep.yaml")
    assert grid_main(quick, tmp_path / "q") == 0
    assert "report: " in capsys.readouterr().out
    quick_report = (tmp_path / "q" / "quick" / "report.md").read_text()
    summary = quick_report.split("What the full sweep", 1)[1]
    assert summary.count("SphereNet-9 cosine vs CNN-9: pending (1/3 paired seeds)") == 2  # regimes A and B
    assert "4 of 4 runs finished" in quick_report and "`B` (width 0.125, batch 16" in quick_report


def record(plan, accuracies: dict[tuple[str, str, int], float]) -> None:
    """Results files for the runs of ``plan`` named in ``accuracies`` ((regime, model, seed) -> final
    test accuracy), as the sweep writes them (no training)."""
    for run in plan.runs:
        accuracy = accuracies.get((run.regime.name, run.model.name, run.seed))
        if accuracy is None:
            continue
        path = results_path(plan, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "grid": plan.grid.name,
            "regime": run.regime.name,
            "model": run.model.name,
            "seed": run.seed,
            "settings": run.settings,
            "finished": "2026-11-29 10:00 UTC",
            "summary": {"final_test_acc": accuracy, "best_test_acc": accuracy, "images_per_second": 100.0},
            "metrics": [{"step": 10, "test_acc": accuracy}],
        }
        path.write_text(json.dumps(document))


def in_short_section(report: Path) -> str:
    text = report.read_text()
    return text[text.index("## In short") : text.index("## Verdicts")]


def test_report_opens_with_each_difference_in_plain_words(tmp_path):
    sweep_file = write_grid(
        tmp_path / "sweep.yaml",
        name="sweep",
        seeds=[0, 1, 2],
        results=str(tmp_path / "committed"),
        regimes={"A": {"label": "narrow", "width_mult": 0.25}, "B": {"label": "wide", "width_mult": 0.5}},
        stages=[{"regime": "A", "models": ["cnn", "cosine"]}, {"regime": "B", "models": ["cnn", "cosine"]}],
    )
    sweep = plan_grid(load_grid(sweep_file), out=tmp_path / "out", progress=False)
    # A: the SphereNet below in every pair (a verdict); B: one pair up, one down (an interval across zero).
    record(sweep, {("A", "cnn", s): 0.87 for s in range(3)})
    record(sweep, {("A", "cosine", 0): 0.855, ("A", "cosine", 1): 0.86, ("A", "cosine", 2): 0.858})
    record(sweep, {("B", "cnn", 0): 0.88, ("B", "cnn", 1): 0.885, ("B", "cnn", 2): 0.882})
    record(sweep, {("B", "cosine", 0): 0.886, ("B", "cosine", 1): 0.881, ("B", "cosine", 2): 0.884})
    opening = in_short_section(write_grid_report(sweep, "test"))
    assert "- In regime `A`, SphereNet-9 cosine ended 1.23 points below CNN-9 (85.77% vs 87.00%" in opening
    assert (
        "3 seed pair(s)): the whole interval is below zero, so at this size the SphereNet is less accurate." in opening
    )
    assert "In regime `B`, SphereNet-9 cosine ended 0.13 points above CNN-9" in opening
    assert "the interval includes zero, so no difference is detectable." in opening

    # A quick grid repeating regime A (same settings) with 2 seeds, summarising the sweep.
    quick_file = write_grid(
        tmp_path / "quick.yaml",
        name="quick",
        seeds=[0, 1],
        results=str(tmp_path / "quick"),
        summary_from="sweep.yaml",
        regimes={"A": {"label": "narrow", "width_mult": 0.25}},
    )
    quick = plan_grid(load_grid(quick_file), out=tmp_path / "out", progress=False)
    record(quick, {("A", "cnn", 0): 0.87, ("A", "cnn", 1): 0.872, ("A", "cosine", 0): 0.861, ("A", "cosine", 1): 0.875})
    opening = in_short_section(write_grid_report(quick, "test"))
    assert (
        "ended 0.30 points below CNN-9" in opening
        and "2 seed pair(s)): with 2 seed pairs the interval is wide" in opening
    )
    assert (
        "The full sweep ran the same regime `A` with 3 seed pairs: SphereNet-9 cosine 1.23 points below CNN-9"
        in opening
    )
    assert (
        "the sweep has 2 finished comparison(s) of 3 or more seed pairs: 1 with no detectable difference, " in opening
    )
    assert "1 with the SphereNet less accurate" in opening

    # The same regime name with other settings is not presented as the same regime.
    other_file = write_grid(
        tmp_path / "other.yaml",
        name="other",
        seeds=[0],
        results=str(tmp_path / "other"),
        summary_from="sweep.yaml",
        regimes={"A": {"label": "narrow", "width_mult": 0.125}},
    )
    other = plan_grid(load_grid(other_file), out=tmp_path / "out", progress=False)
    record(other, {("A", "cnn", 0): 0.86, ("A", "cosine", 0): 0.85})
    opening = in_short_section(write_grid_report(other, "test"))
    assert "one seed pair gives no interval" in opening and "ran the same regime" not in opening
    assert "2 finished comparison(s)" in opening


def test_an_effect_from_one_seed_pair_is_shown_without_an_interval(tmp_path):
    grid = write_grid(
        tmp_path / "sweep.yaml",
        seeds=[0, 1, 2],
        regimes={"A": {"label": "narrow", "width_mult": 0.25}, "B": {"label": "wide", "width_mult": 0.5}},
        stages=[{"regime": "A", "models": ["cnn", "cosine"]}, {"regime": "B", "models": ["cnn", "cosine"]}],
    )
    plan = plan_grid(load_grid(grid), out=tmp_path / "out", results=tmp_path / "r", progress=False)
    record(plan, {("A", "cnn", s): 0.87 for s in range(3)})
    record(plan, {("A", "cosine", 0): 0.855, ("A", "cosine", 1): 0.86, ("A", "cosine", 2): 0.858})
    record(plan, {("B", "cnn", 0): 0.88, ("B", "cosine", 0): 0.886})  # one pair so far
    report = write_grid_report(plan, "test").read_text()
    width_line = next(line for line in report.splitlines() if line.startswith("- **The gain grows with width**"))
    assert "0.25 -> -1.23 [" in width_line and "0.5 -> +0.60 (one seed pair, no interval)" in width_line
    assert "nan" not in report
    # The opening quotes the accuracies of the paired seeds, which differ by the difference it states.
    record(plan, {("B", "cnn", 1): 0.80, ("B", "cnn", 2): 0.80})  # CNN seeds without a SphereNet pair
    opening = in_short_section(write_grid_report(plan, "test"))
    assert "In regime `B`, SphereNet-9 cosine ended 0.60 points above CNN-9 (88.60% vs 88.00% final" in opening


def test_two_regimes_at_one_width_are_not_called_a_trend_with_width(tmp_path):
    # Regimes that differ only in a setting the effect groups do not name (here the learning rate)
    # were two points at width 0.25 of one "trend": "The gain grows with width ...: 0.25 -> ..., 0.25 -> ...".
    grid = write_grid(
        tmp_path / "lr.yaml",
        regimes={"A": {"width_mult": 0.25}, "B": {"width_mult": 0.25, "lr": 0.01}},
        stages=[{"regime": "A", "models": ["cnn", "cosine"]}, {"regime": "B", "models": ["cnn", "cosine"]}],
    )
    plan = plan_grid(load_grid(grid), out=tmp_path / "out", results=tmp_path / "r", progress=False)
    record(plan, {("A", "cnn", 0): 0.87, ("A", "cosine", 0): 0.86, ("B", "cnn", 0): 0.80, ("B", "cosine", 0): 0.82})
    report = write_grid_report(plan, "test").read_text()
    assert "- **The gain grows with width:** pending" in report
    assert "0.25 -> " not in report and not (tmp_path / "r" / "effect_width.png").exists()


def test_the_other_grids_summary_says_when_its_results_folder_is_not_found(tmp_path, monkeypatch):
    sweep = write_grid(tmp_path / "sweep.yaml", name="sweep", results="committed")  # relative to the working directory
    plan = plan_grid(load_grid(sweep), out=tmp_path / "out", results=tmp_path / "committed", progress=False)
    record(plan, {("A", "cnn", 0): 0.8})
    monkeypatch.chdir(tmp_path)
    assert "1 of 4 runs finished" in "\n".join(summary_of_other_grid(sweep, tmp_path / "quick"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = "\n".join(summary_of_other_grid(sweep, tmp_path / "quick"))
    assert "results folder `committed` is not found from the working directory" in text
    assert "No run of the sweep has finished yet" not in text


def test_dry_run_plan_shows_progress_and_who_trains(tmp_path):
    plan = plan_grid(load_grid(write_grid(tmp_path / "tiny.yaml")), out=tmp_path / "out", results=tmp_path / "r")
    record(plan, {("A", "cnn", 0): 0.8})
    partial = plan.runs[1]  # A-cosine-s0: a checkpoint at step 200, and a live process holding its lock
    (partial.planned.out / "checkpoints").mkdir(parents=True)
    (partial.planned.out / "checkpoints" / "step_00000200.pt").write_bytes(b"")
    (partial.planned.out.parent / f"{partial.run_id}.lock").write_text(str(os.getpid()))
    gone = plan.runs[2]  # A-cnn-s1: a lock file left by a process that no longer exists
    gone_lock = gone.planned.out.parent / f"{gone.run_id}.lock"
    gone_lock.write_text("999999999")
    lines = describe_plan(plan)
    assert lines[0].startswith("    1. A-cnn-s0: recorded;")
    iterations = partial.planned.config.iterations
    assert (
        f"2. A-cosine-s0: partial (checkpoint at step 200 of {iterations:,}), being trained by process {os.getpid()};"
        in (lines[1])
    )
    assert lines[2].startswith("    3. A-cnn-s1: new;") and not gone_lock.exists()
    assert lines[-1] == "  1 recorded, 1 partial, 2 new (of 4 runs)"


def finished_run_dir(run) -> None:
    """The run directory ``sphereconv train`` leaves for ``run``: its config, metrics and summary (no training)."""
    save_config(run.planned.config, run.planned.out / "config.yaml")
    (run.planned.out / "metrics.jsonl").write_text(json.dumps({"step": 8, "test_acc": 0.5}) + "\n")
    (run.planned.out / "summary.json").write_text(json.dumps({"final_test_acc": 0.5, "best_test_acc": 0.5}))


def test_a_finished_run_of_other_settings_in_the_training_folder_is_not_recorded(tmp_path):
    # A smoke run leaves its training folder where the full-size run of the same grid trains.
    grid = load_grid(write_grid(tmp_path / "tiny.yaml"))
    smoke = plan_grid(grid, out=tmp_path / "out", results=tmp_path / "smoke", smoke=True, progress=False)
    finished_run_dir(smoke.runs[0])
    full = plan_grid(grid, out=tmp_path / "out", results=tmp_path / "full", progress=False)
    assert full.runs[0].planned.out == smoke.runs[0].planned.out
    with pytest.raises(ConfigError) as info:
        execute_grid(full, "test", log=lambda line: None, runs=full.runs[:1])
    assert "holds a finished run with different settings" in str(info.value) and "iterations" in str(info.value)
    assert not results_path(full, full.runs[0]).exists()
    assert not (full.runs[0].planned.out.parent / f"{full.runs[0].run_id}.lock").exists()
    # The same finished run is recorded for the plan whose settings it has.
    execute_grid(smoke, "test", log=lambda line: None, runs=smoke.runs[:1])
    document = json.loads(results_path(smoke, smoke.runs[0]).read_text())
    assert document["summary"]["final_test_acc"] == 0.5 and document["settings"] == smoke.runs[0].settings


def test_an_unfinished_run_of_other_settings_in_the_training_folder_is_not_continued(tmp_path, monkeypatch, capsys):
    # A smoke run stopped after a checkpoint: resuming it under the full-size settings would lengthen
    # it with the smoke run's schedule and record it as a full-size run.
    grid = load_grid(write_grid(tmp_path / "tiny.yaml"))
    smoke = plan_grid(grid, out=tmp_path / "out", results=tmp_path / "smoke", smoke=True, progress=False)
    run_dir = smoke.runs[0].planned.out
    save_config(smoke.runs[0].planned.config, run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "step_00000004.pt").write_bytes(b"")
    trained = []
    monkeypatch.setattr(sweep, "train_run", lambda run, status: trained.append(run.out) or "trained")
    full = plan_grid(grid, out=tmp_path / "out", results=tmp_path / "full", progress=False)
    with pytest.raises(ConfigError) as info:
        execute_grid(full, "test", log=lambda line: None, runs=full.runs[:1])
    assert "holds an unfinished run with different settings" in str(info.value) and "iterations" in str(info.value)
    assert trained == [] and not results_path(full, full.runs[0]).exists()
    assert not (run_dir.parent / f"{full.runs[0].run_id}.lock").exists()
    # The dry run said "partial (checkpoint at step 4 of 600)" for it: it stops as the real run does.
    argv = ["reproduce", "--grid", str(grid.path), "--out", str(tmp_path / "out"), "--results", str(tmp_path / "full")]
    assert main([*argv, "--dry-run"]) == 2
    assert "holds an unfinished run with different settings" in capsys.readouterr().err
    assert main([*argv, "--dry-run", "--scale", "smoke"]) == 0
    assert "1. A-cnn-s0: partial (checkpoint at step 4 of 8)" in capsys.readouterr().out


def test_dry_run_does_not_call_a_results_file_of_other_settings_recorded(tmp_path, capsys):
    # A smoke run of a grid without its own results folder writes where the full-size run reads.
    grid = write_grid(tmp_path / "tiny.yaml")
    smoke = plan_grid(load_grid(grid), out=tmp_path / "out", smoke=True, progress=False)
    record(smoke, {("A", "cnn", 0): 0.5})
    argv = ["reproduce", "--grid", str(grid), "--out", str(tmp_path / "out"), "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "A-cnn-s0.json was made with different settings" in err and "batch_size: 16 there" in err
    assert main([*argv, "--scale", "smoke"]) == 0
    assert "1. A-cnn-s0: recorded;" in capsys.readouterr().out


def test_a_results_file_that_is_not_an_object_is_a_one_line_error(tmp_path):
    plan = plan_grid(load_grid(write_grid(tmp_path / "tiny.yaml")), out=tmp_path / "out", results=tmp_path / "r")
    record(plan, {("A", "cnn", 0): 0.8, ("A", "cosine", 0): 0.81})
    results_path(plan, plan.runs[1]).write_text("[]\n")
    with pytest.raises(ConfigError, match="A-cosine-s0.json does not hold a JSON object"):
        write_grid_report(plan, "test")
    # A file without the time it finished is still reported.
    path = results_path(plan, plan.runs[1])
    document = {**json.loads(results_path(plan, plan.runs[0]).read_text()), "model": "cosine"}
    document["settings"] = plan.runs[1].settings
    del document["finished"]
    path.write_text(json.dumps(document))
    assert "runs finished: 2 of 4, between" in write_grid_report(plan, "test").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(summary=[0.8]), "summary is not an object"),
        (lambda d: d["summary"].update(final_test_acc="0.8"), "summary.final_test_acc is '0.8', not a number"),
        (lambda d: d.update(metrics={"step": 10}), "metrics is not a list"),
        (lambda d: d["metrics"].append({"step": "20", "test_acc": 0.9}), "metrics record 2 has no numeric step"),
        (lambda d: d.update(finished=20261129), "finished is not a string"),
    ],
)
def test_a_results_file_with_fields_of_the_wrong_type_is_a_one_line_error(tmp_path, edit, message):
    # A hand-edited or badly merged results file was a TypeError / AttributeError / ValueError
    # traceback from the statistics or the report; the sweep's own files still load.
    grid = write_grid(tmp_path / "tiny.yaml", results=str(tmp_path / "r"))
    plan = plan_grid(load_grid(grid), out=tmp_path / "out")
    record(plan, {("A", "cnn", 0): 0.8, ("A", "cosine", 0): 0.81})
    assert "runs finished: 2 of 4" in write_grid_report(plan, "test").read_text()
    path = results_path(plan, plan.runs[1])
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as info:
        write_grid_report(plan, "test")
    text = str(info.value)
    assert "A-cosine-s0.json is not a results file" in text and message in text and "\n" not in text
    # A report summarising this grid leaves the file out and says so.
    summary = "\n".join(summary_of_other_grid(grid, tmp_path))
    assert "1 of 4 runs finished" in summary and "1 results file(s) unreadable or made with settings" in summary


def test_only_selects_cells_and_names_what_a_bad_selector_may_say(tmp_path, capsys):
    plan = plan_grid(load_grid(CLAIMS), out=tmp_path, progress=False)
    assert [r.run_id for r in select_runs(plan, "Q/linear,Q/sigmoid")] == [
        f"Q-{model}-s{seed}" for seed in (0, 1, 2) for model in ("linear", "sigmoid")
    ]
    assert [r.run_id for r in select_runs(plan, "WL")] == [f"WL-{m}-s{s}" for s in (0, 1, 2) for m in ("cnn", "cosine")]
    assert select_runs(plan, None) == plan.runs
    for only, message in (
        ("XL", "names regime 'XL'; grid claims has regimes S, Q, L, WS, WL, FS"),
        ("Q/mlp", "names model 'mlp'; grid claims has models cnn, cosine, linear, sigmoid"),
        ("FS/sigmoid", "no stage of grid claims runs 'FS/sigmoid'"),
        ("WL/linear", "no stage of grid claims runs 'WL/linear'"),
    ):
        with pytest.raises(ConfigError) as info:
            select_runs(plan, only)
        assert message in str(info.value) and f"--only {only!r}" in str(info.value)

    # The dry run lists only the selected runs, numbered by their place in the whole grid.
    grid = write_grid(tmp_path / "tiny.yaml")
    assert (
        main(["reproduce", "--grid", str(grid), "--dry-run", "--out", str(tmp_path / "o"), "--only", "A/cosine"]) == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    ")]
    assert [line.split(":")[0].strip() for line in lines] == ["2. A-cosine-s0", "4. A-cosine-s1"]
    assert main(["reproduce", "--grid", str(grid), "--dry-run", "--only", "B"]) == 2
    assert "invalid --only 'B'" in capsys.readouterr().err
    assert main(["reproduce", "convergence", "--only", "A"]) == 2
    assert "--only A applies only with --grid" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"regims": {}}, "unknown key(s) regims"),
        ({"stages": []}, "stages is empty"),
        ({"stages": [{"regime": "Z", "models": ["cnn"]}]}, "stage 1 names regime 'Z'"),
        ({"stages": [{"regime": "A", "models": ["mlp"]}]}, "stage 1 models must be a list drawn from: cnn, cosine"),
        ({"baseline": "vgg"}, "baseline 'vgg' is not a model"),
        ({"seeds": [0, -1]}, "seeds must be a non-empty list"),
        ({"regimes": {"A": {"label": "A", "width_mult": -1}}}, "regime 'A', model 'cnn'"),
        (
            {"base": {**TINY_GRID["base"], "iterations": None}},
            "regime 'A' sets no iterations (its runs would last epochs=10)",
        ),
        # These were TypeError tracebacks, and a missing summary_from stopped the grid only after its
        # first run had trained (when the first report was written).
        ({"stages": [{"regime": ["A"], "models": ["cnn"]}]}, "stage 1 names regime ['A']"),
        ({"stages": [{"regime": "A", "models": [["cnn"]]}]}, "stage 1 models must be a list drawn from"),
        ({"results": 5}, "results must be a path (a string); got 5"),
        ({"summary_from": ["claims.yaml"]}, "summary_from must be a path (a string)"),
        ({"summary_from": "clams.yaml"}, "summary_from 'clams.yaml' is not a grid file"),
        # Names with "-" gave clashing run ids (regime "A-x" with model "cnn" vs regime "A" with
        # model "x-cnn"); "/" made nested folders and could not be selected with --only.
        ({"regimes": {"A-x": {"width_mult": 0.25}}}, "regimes name 'A-x' may use only letters, digits"),
        ({"regimes": {"A/x": {"width_mult": 0.25}}}, "regimes name 'A/x' may use only letters, digits"),
        ({"models": {"..": {"operator": "none"}}}, "models name '..' may use only letters, digits"),
    ],
)
def test_bad_grid_files_get_one_line_errors(tmp_path, changes, message):
    path = write_grid(tmp_path / "bad.yaml", **changes)
    with pytest.raises(ConfigError, match=None) as info:
        plan_grid(load_grid(path), out=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_grid_and_experiment_flags_conflict_clearly(tmp_path, capsys):
    grid = write_grid(tmp_path / "tiny.yaml")
    assert main(["reproduce", "convergence", "--grid", str(grid)]) == 2
    assert "either an experiment" in capsys.readouterr().err
    assert main(["reproduce", "--grid", str(grid), "--iterations", "5"]) == 2
    assert "--iterations 5 cannot be combined with --grid" in capsys.readouterr().err
    assert main(["reproduce", "--grid", str(grid), "--scale", "quick"]) == 2
    assert "only --scale smoke applies" in capsys.readouterr().err
    assert main(["reproduce"]) == 2
    assert "name an experiment" in capsys.readouterr().err
    assert main(["reproduce", "--grid", str(grid), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert "1. A-cnn-s0: new; operator=none width_mult=0.25" in capsys.readouterr().out


def test_a_lock_held_by_another_users_live_process_is_kept(tmp_path, monkeypatch):
    # os.kill(pid, 0) raises PermissionError for a live process of another user: it holds the run.
    plan = plan_grid(load_grid(write_grid(tmp_path / "tiny.yaml")), out=tmp_path / "out", results=tmp_path / "r")
    run = plan.runs[0]
    lock = run.planned.out.parent / f"{run.run_id}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("4242")

    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    lines = describe_plan(plan)
    assert "being trained by process 4242" in lines[0] and lock.exists()


def test_an_empty_lock_file_left_by_a_crash_does_not_hold_its_run_for_ever(tmp_path):
    # A lock file created just before a crash or power cut can come back empty: it read as held by
    # "process 0" (os.kill(0, 0) succeeds) for ever, so every later grid skipped that run.
    plan = plan_grid(load_grid(write_grid(tmp_path / "tiny.yaml")), out=tmp_path / "out", results=tmp_path / "r")
    run = plan.runs[0]
    lock = run.planned.out.parent / f"{run.run_id}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    # Just created (its process is about to write its id): held.
    assert "being trained by process" in describe_plan(plan)[0] and lock.exists()
    old = lock.stat().st_mtime - 2 * sweep.EMPTY_LOCK_SECONDS
    os.utime(lock, (old, old))
    assert "being trained" not in describe_plan(plan)[0] and not lock.exists()
    lock.write_text("")
    os.utime(lock, (old, old))
    assert sweep._claim(run) and lock.read_text() == str(os.getpid())
