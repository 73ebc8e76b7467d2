"""Every ``sphereconv reproduce`` experiment end to end at smoke scale on real Fashion-MNIST."""

from __future__ import annotations

import json
import re

import pytest
from png_checks import CURVE_PLOT_SIZE, assert_png

from sphereconv.cli.main import main
from sphereconv.engine import save_config
from sphereconv.errors import ConfigError
from sphereconv.experiments import runner
from sphereconv.experiments.definitions import EXPERIMENTS, get_experiment
from sphereconv.experiments.plots import DPI, FEATURE_PANEL_INCHES
from sphereconv.experiments.runner import DIVERGED_FILE, execute_plan, plan_experiment


def reproduce(out, *args: str) -> int:
    """``sphereconv reproduce ... --scale smoke`` in this process (data found in the system folder)."""
    return main(["reproduce", *args, "--scale", "smoke", "--device", "cpu", "--no-progress", "--out", str(out)])


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_runs_end_to_end_at_smoke_scale(name, tmp_path, capsys):
    rc = reproduce(tmp_path, name)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    experiment = get_experiment(name)
    out = tmp_path / name
    report = (out / "report.md").read_text()
    assert f"`{name}`" in report.splitlines()[0]
    table_rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([^`]+)`", row).group(1) for row in table_rows] == experiment.variant_names()
    results = json.loads((out / "results.json").read_text())
    assert results["scale"] == "smoke" and results["dataset"] == "fashion-mnist"
    for variant in results["variants"]:
        (run,) = variant["runs"]
        assert 0.0 <= run["final_test_acc"] <= 1.0 and run["steps"] == 8
        assert (tmp_path / name / variant["name"] / "seed0" / "summary.json").is_file()
    for plot in ("test_acc.png", "train_loss.png"):
        assert_png(out / plot, CURVE_PLOT_SIZE)
        assert f"]({plot})" in report
    if experiment.sweep_label:
        assert_png(out / "sweep.png", CURVE_PLOT_SIZE)
    if experiment.features2d:
        width = int(FEATURE_PANEL_INCHES * DPI * len(experiment.variants))
        assert_png(out / "features2d.png", (width, round((FEATURE_PANEL_INCHES + 0.6) * DPI)))
        assert "not available here" in report  # no MNIST on this machine: says it used Fashion-MNIST
    assert f"report: {out / 'report.md'}" in captured.out


def test_seeds_resume_and_skip(tmp_path, capsys):
    assert reproduce(tmp_path, "convergence", "--seeds", "2") == 0
    capsys.readouterr()
    report = (tmp_path / "convergence" / "report.md").read_text()
    assert "(mean ± std)" in report and re.search(r"\| \d+\.\d\d ± \d+\.\d\d \|", report)
    results = json.loads((tmp_path / "convergence" / "results.json").read_text())
    assert [len(v["runs"]) for v in results["variants"]] == [2, 2]
    seeds = {run["seed"] for v in results["variants"] for run in v["runs"]}
    assert seeds == {0, 1}

    # A run killed after its last checkpoint (no summary yet) is resumed; finished ones skipped.
    killed = tmp_path / "convergence" / "cnn9" / "seed1"
    (killed / "summary.json").unlink()
    assert reproduce(tmp_path, "convergence", "--seeds", "2") == 0
    log = capsys.readouterr().out
    assert log.count("already finished, skipped") == 3
    assert "convergence/cnn9/seed1 (resumed)" in log
    assert (killed / "summary.json").is_file()

    # Finished runs made with other settings are never mixed in silently.
    rc = reproduce(tmp_path, "convergence", "--iterations", "6", "--seeds", "2")
    err = capsys.readouterr().err
    assert rc == 2 and "holds a finished run with different settings" in err and "iterations: 8 there vs 6 now" in err


@pytest.mark.parametrize(
    ("left_behind", "named"), [("checkpoint", "an unfinished run"), ("diverged", "a diverged run")]
)
def test_an_unfinished_or_diverged_run_of_other_settings_is_refused_not_continued(
    tmp_path, monkeypatch, left_behind, named
):
    # A run stopped part-way at --iterations 8: resumed at --iterations 16 it would keep the
    # learning-rate drops of 8 iterations (a lengthened resume keeps its schedule) and be reported
    # beside runs of the new length; a diverged one would stand in for a run never trained.
    earlier = plan_experiment("convergence", "quick", out=tmp_path, iterations=8).runs[0]
    save_config(earlier.config, earlier.out / "config.yaml")
    if left_behind == "checkpoint":
        (earlier.out / "checkpoints").mkdir()
        (earlier.out / "checkpoints" / "step_00000004.pt").write_bytes(b"")
    else:
        (earlier.out / DIVERGED_FILE).write_text(json.dumps({"error": "loss is nan"}) + "\n")
    trained = []
    monkeypatch.setattr(runner, "train_run", lambda run, status: trained.append(run.out) or "trained")
    now = plan_experiment("convergence", "quick", out=tmp_path, iterations=16)
    assert now.runs[0].out == earlier.out and runner.run_status(now.runs[0]) in ("partial", "diverged")
    with pytest.raises(ConfigError) as info:
        execute_plan(now, log=lambda line: None)
    message = str(info.value)
    assert f"holds {named} with different settings" in message and "iterations: 8 there vs 16 now" in message
    assert trained == []
    # The same settings continue it as before.
    if left_behind == "checkpoint":
        execute_plan(plan_experiment("convergence", "quick", out=tmp_path, iterations=8), log=lambda line: None)
        assert trained[0] == earlier.out


def test_report_of_an_experiment_whose_runs_all_diverged(tmp_path):
    # features2d with every run diverged: the report stopped with matplotlib's "cannot write empty
    # image" (a feature plot of no panels) after all the training was done.
    plan = plan_experiment("features2d", "smoke", out=tmp_path)
    for run in plan.runs:
        save_config(run.config, run.out / "config.yaml")
        (run.out / DIVERGED_FILE).write_text(json.dumps({"error": "loss is nan"}) + "\n")
    execute_plan(plan, log=lambda line: None)  # nothing to train: every run is skipped as diverged
    report = runner.write_outputs(plan, "test").read_text()
    assert report.count("diverged and is left out: loss is nan") == len(plan.runs)
    assert_png(
        tmp_path / "features2d" / "features2d.png",
        (int(FEATURE_PANEL_INCHES * DPI), round((FEATURE_PANEL_INCHES + 0.6) * DPI)),
    )
    assert "](features2d.png)" in report


def test_dry_run_plans_every_experiment_without_training(tmp_path, capsys):
    assert main(["reproduce", "all", "--scale", "smoke", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name, experiment in EXPERIMENTS.items():
        assert f"{name}: {len(experiment.variants)} run(s) at scale 'smoke'" in out
    assert not any(tmp_path.iterdir())


def test_scales_resolve_to_valid_configs_with_the_intended_recipe(tmp_path):
    paper = plan_experiment("convergence", "paper", out=tmp_path)
    config = paper.runs[0].config
    assert (config.dataset, config.iterations, config.batch_size, config.eval_every) == ("cifar10", 64000, 128, 500)
    assert config.lr_milestones == pytest.approx([34000 / 64000, 54000 / 64000]) and config.optimizer == "adam"
    resnet = plan_experiment("resnet", "paper", out=tmp_path)
    assert {r.config.augment for r in resnet.runs} == {"crop_flip"}
    width = plan_experiment("width", "quick", out=tmp_path, iterations=50)
    assert sorted({r.config.width_mult for r in width.runs}) == pytest.approx([0.25 * 0.125, 0.25 * 0.5, 0.25])
    assert {r.config.eval_every for r in width.runs} == {50 // 15}
    narrow = plan_experiment("width", "quick", out=tmp_path, width_mult=0.5)
    assert sorted({r.config.width_mult for r in narrow.runs}) == pytest.approx([0.5 * 0.125, 0.5 * 0.5, 0.5])
    spherenorm = plan_experiment("spherenorm", "small", out=tmp_path, seeds=2)
    assert sorted({r.config.batch_size for r in spherenorm.runs}) == [2, 8, 32, 128]
    assert len(spherenorm.runs) == 2 * len(get_experiment("spherenorm").variants)
    assert all(r.out == tmp_path / "spherenorm" / r.variant.name / f"seed{r.seed}" for r in spherenorm.runs)


def test_features_of_a_folder_run_trained_at_another_image_size(tmp_path):
    # Feature extraction rebuilt the network at the folder's own image size, not the run's
    # --image-size: a shape error on fc6 for every folder run trained resized.
    from PIL import Image

    from sphereconv.data import load_dataset
    from sphereconv.engine import load_config, train
    from sphereconv.experiments.features import extract_features

    images, labels = load_dataset("fashion-mnist", "test", progress=False)
    root = tmp_path / "png"
    for split, indices in (("train", range(0, 40)), ("test", range(40, 60))):
        for index in indices:
            folder = root / split / f"class_{int(labels[index])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index, 0].numpy()).save(folder / f"{index}.png")
    overrides = dict(
        dataset="folder", data_dir=str(root), image_size=12, feature_dim=2, width_mult=0.0625, batch_size=8,
        iterations=2, eval_every=2, checkpoint_every=2, progress=False, device="cpu", out=str(tmp_path / "run"),
    )  # fmt: skip
    train(load_config(None, overrides))
    features, feature_labels, config, info = extract_features(tmp_path / "run")
    assert features.shape == (20, 2) and config.image_size == 12 and info.image_size in (12, (12, 12))
    assert len(feature_labels) == 20 and set(feature_labels.tolist()) <= set(range(len(info.class_names)))
