"""``sphereconv inspect`` on a tiny real run (SphereNet-9 and CNN-9, width 1/16, real Fashion-MNIST)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from png_checks import assert_png  # noqa: E402

from cli_helpers import run_cli  # noqa: E402
from sphereconv.cli import inspect as inspect_cli  # noqa: E402
from sphereconv.engine.layer_stats import COS_BINS, LAYER_STATS_FILE, read_layer_stats  # noqa: E402

# Pixel size of the inspect plots (10 x 4.5 inches at 100 dpi, cli/inspect.py).
INSPECT_PLOT_SIZE = (1000, 450)
PLOTS = ("cos_theta.png", "activations.png", "gradients.png")
# SphereNet-9: 9 conv layers and fc6.
SPHERENET9_CONVS = 10


def tiny_run(out: Path, operator: str, layer_stats_every: int | None) -> Path:
    argv = [
        "train",
        "--model",
        "spherenet9",
        "--operator",
        operator,
        "--width-mult",
        "0.0625",
        "--dataset",
        "fashion-mnist",
        "--train-subset",
        "256",
        "--test-subset",
        "100",
        "--iterations",
        "4",
        "--batch-size",
        "32",
        "--eval-every",
        "4",
        "--checkpoint-every",
        "4",
        "--device",
        "cpu",
        "--seed",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    if layer_stats_every is not None:
        argv += ["--layer-stats-every", str(layer_stats_every)]
    rc, _, stderr = run_cli(*argv)
    assert rc == 0, stderr
    return out


@pytest.fixture(scope="module")
def sphere_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("inspect") / "sphere", "cosine", layer_stats_every=1)


def test_inspect_run_directory(sphere_run, tmp_path):
    recorded = read_layer_stats(sphere_run / LAYER_STATS_FILE)
    assert [r["iteration"] for r in recorded] == [0, 1, 2, 3]

    out = tmp_path / "plots"
    argv = ["inspect", str(sphere_run), "--out", str(out), "--batches", "2", "--batch-size", "16"]
    rc, stdout, stderr = run_cli(*argv)
    assert rc == 0, stderr
    summary = json.loads((out / "layer_stats.json").read_text())
    assert summary["step"] == 4 and summary["batches"] == 2 and summary["operator"] == "cosine"
    assert summary["num_classes"] == 10
    layers = summary["layers"]
    assert len(layers) == SPHERENET9_CONVS
    assert all(row["kind"] == "sphere:cosine" for row in layers)
    first_out_channels = 8  # 128 x 1/16
    for row in layers:
        q = row["cos_quantiles"]
        assert all(-1.0 <= v <= 1.0 for v in q) and q == sorted(q)
        assert len(row["cos_hist"]) == COS_BINS
        assert row["grad_norm"] > 0 and row["weight_norm"] > 0 and row["act_std"] >= 0
    # Two batches of 16 images, 8 channels on 28 x 28: every (filter, patch) pair is counted once.
    assert sum(layers[0]["cos_hist"]) == 2 * 16 * first_out_channels * 28 * 28
    assert f"{SPHERENET9_CONVS} layers" in stdout

    for name in PLOTS:
        assert_png(out / name, INSPECT_PLOT_SIZE)
    # The run recorded statistics while training, so the curves over iterations are drawn too.
    pixels = assert_png(out / "over_iterations.png", INSPECT_PLOT_SIZE)
    assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50  # heat maps, not just lines


def test_inspect_checkpoint_file_of_cnn(tmp_path):
    run = tiny_run(tmp_path / "cnn", "none", layer_stats_every=None)
    checkpoint = sorted((run / "checkpoints").glob("*.pt"))[-1]
    # A file left behind by an earlier run in the same folder is not this run's history.
    (run / LAYER_STATS_FILE).write_text('{"iteration": 0, "loss": 2.3, "layers": []}\n')
    rc, _, stderr = run_cli("inspect", str(checkpoint), "--batches", "1")
    assert rc == 0, stderr
    out = run / "inspect"  # default: next to the run
    layers = json.loads((out / "layer_stats.json").read_text())["layers"]
    assert len(layers) == SPHERENET9_CONVS and {row["kind"] for row in layers} == {"plain"}
    assert all(-1.0 <= v <= 1.0 for row in layers for v in row["cos_quantiles"])
    for name in PLOTS:
        assert_png(out / name, INSPECT_PLOT_SIZE)
    assert not (out / "over_iterations.png").exists()  # this run recorded nothing during training


def test_inspect_leaves_the_weights_unchanged(sphere_run, tmp_path):
    checkpoint = sorted((sphere_run / "checkpoints").glob("*.pt"))[-1]
    before = checkpoint.read_bytes()
    rc, _, stderr = run_cli("inspect", str(checkpoint), "--out", str(tmp_path), "--batches", "1")
    assert rc == 0, stderr
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    "make_target, message",
    [
        (lambda tmp: tmp / "missing_run", "does not exist"),
        (lambda tmp: tmp / "missing.pt", "does not exist"),
        (lambda tmp: tmp, "holds no checkpoint"),
    ],
)
def test_inspect_missing_run_or_checkpoint_is_one_line_error(tmp_path, make_target, message):
    target = make_target(tmp_path)
    rc, stdout, stderr = run_cli("inspect", str(target))
    assert rc == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sphereconv: error:"), stderr
    assert message in lines[0] and str(target) in lines[0]


def test_over_iterations_marks_chance_for_the_number_of_classes(sphere_run, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(inspect_cli, "_save", lambda figure, path, title: figures.append(figure) or path)
    history = read_layer_stats(sphere_run / LAYER_STATS_FILE)
    inspect_cli.plot_over_iterations(history, tmp_path / "over_iterations.png", "CIFAR-100", 100)
    loss_axes = figures[0].axes[0]
    chance = [line.get_ydata()[0] for line in loss_axes.lines if line.get_linestyle() == "--"]
    assert chance == [pytest.approx(math.log(100))] and "ln 100" in loss_axes.get_ylabel()


def test_inspect_batch_of_one_with_batch_norm_is_one_line_error(sphere_run, tmp_path):
    # Training-mode BatchNorm cannot normalise one value per channel (fc6 is 1 x 1).
    rc, stdout, stderr = run_cli("inspect", str(sphere_run), "--out", str(tmp_path), "--batch-size", "1")
    assert rc == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sphereconv: error:") and "batch_size=1" in lines[0], stderr


def test_inspect_rejects_zero_batches(sphere_run):
    rc, _, stderr = run_cli("inspect", str(sphere_run), "--batches", "0")
    assert rc == 2 and "--batches" in stderr and len(stderr.strip().splitlines()) == 1


def test_inspect_corrupt_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "step_00000001.pt"
    bad.write_bytes(torch.randn(4).numpy().tobytes())
    rc, _, stderr = run_cli("inspect", str(bad))
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and str(bad) in stderr
