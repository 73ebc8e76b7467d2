"""``sphereconv train`` / ``eval`` / ``plot`` / ``list-*`` on a real Fashion-MNIST subset."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from png_checks import CURVE_PLOT_SIZE, assert_png  # noqa: E402

from cli_helpers import METRIC_KEYS, SUMMARY_KEYS  # noqa: E402
from sphereconv.cli.main import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short SphereNet-9 run (width 1/8, 512 images, 30 iterations) shared by the tests below."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("train") / "run"
    argv = [
        "train",
        "--config",
        str(ROOT / "configs" / "fashion_mnist_quick.yaml"),
        "--operator",
        "cosine",
        "--width-mult",
        "0.125",
        "--train-subset",
        "512",
        "--test-subset",
        "256",
        "--iterations",
        "30",
        "--batch-size",
        "32",
        "--eval-every",
        "10",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--no-progress",
        "--out",
        str(out),
    ]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    torch.set_num_threads(previous)
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue()


def test_train_writes_config_metrics_and_summary(trained_run):
    out, stdout = trained_run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model"], config["operator"], config["width_mult"], config["iterations"], config["seed"]) == (
        "spherenet9",
        "cosine",
        0.125,
        30,
        3,
    )
    assert config["dataset"] == "fashion-mnist" and config["epochs"] is None  # --iterations replaced nothing else
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for record in records:
        assert METRIC_KEYS <= set(record), set(record)
        assert 0.0 <= record["test_acc"] <= 1.0
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns something
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), set(summary)
    assert summary["steps"] == 30 and summary["final_test_acc"] == pytest.approx(records[-1]["test_acc"])
    assert summary["best_test_acc"] == pytest.approx(max(r["test_acc"] for r in records))
    assert f"done: final test acc {100 * summary['final_test_acc']:.2f}%" in stdout and str(out) in stdout
    # Without the progress bar, the output says where the run stands: a start line, one per evaluation.
    lines = stdout.splitlines()
    assert lines[0] == f"training 30 steps ({30 / 16:.4g} epochs)"  # 512 images of batch 32: 16 steps an epoch
    logged = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in logged] == ["step 10/30", "step 20/30", "step 30/30"]
    assert logged[-1].endswith(f"test_acc {records[-1]['test_acc']:.4f}")


def test_eval_reproduces_the_final_test_accuracy(trained_run, capsys):
    out, _ = trained_run
    summary = json.loads((out / "summary.json").read_text())
    checkpoints = sorted((out / "checkpoints").glob("*.pt"))
    assert checkpoints
    for target in (str(out), str(checkpoints[-1])):  # a run directory means its newest checkpoint
        assert main(["eval", target, "--device", "cpu", "--test-subset", "256"]) == 0
        line = capsys.readouterr().out
        match = re.search(r"test accuracy: (\d+\.\d\d)% \(256 fashion-mnist test images", line)
        assert match, line
        assert float(match.group(1)) == pytest.approx(100 * summary["final_test_acc"], abs=0.01)


def test_plot_overlays_a_finished_run(trained_run, tmp_path, capsys):
    out, _ = trained_run
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "--out", str(png), "--metric", "train_loss"]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert_png(png, CURVE_PLOT_SIZE)


def test_train_refuses_to_overwrite_an_existing_run(trained_run, capsys):
    out, _ = trained_run
    rc = main(
        [
            "train",
            "--config",
            str(ROOT / "configs" / "fashion_mnist_quick.yaml"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "already holds a training run" in err and "--resume" in err


def test_list_commands(capsys):
    assert main(["list-models"]) == 0
    models = capsys.readouterr().out.split()
    assert {"spherenet9", "spherenet18", "spherenet36", "spherenet69", "sphere_resnet32"} <= set(models)
    assert main(["list-datasets"]) == 0
    datasets = capsys.readouterr().out
    assert "fashion-mnist  (10 classes, 1 channel(s), 28x28)" in datasets and "cifar100  (100 classes" in datasets


def test_every_preset_config_validates(capsys):
    from sphereconv.engine import load_config
    from sphereconv.models import list_models

    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(presets) >= 6
    for path in presets:
        config = load_config(path, {})
        assert config.model in list_models(), path
        assert main(["train", "--config", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    names = {p.stem for p in presets}
    assert {
        "spherenet9_cifar10",
        "cnn9_cifar10",
        "sphere_resnet32_cifar10plus",
        "spherenet9_cifar100",
        "fashion_mnist_quick",
    } <= names
    reference = load_config(ROOT / "configs" / "spherenet9_cifar10.yaml", {})
    assert (reference.optimizer, reference.lr, reference.iterations, reference.batch_size) == ("adam", 1e-3, 64000, 128)
    assert [round(f * 64000) for f in reference.lr_milestones] == [34000, 54000]
