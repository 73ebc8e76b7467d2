"""Aggregation over seeds, iterations-to-accuracy, the report table and the plots, on synthetic runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from png_checks import CURVE_PLOT_SIZE, assert_png

from sphereconv.cli.main import main
from sphereconv.errors import ConfigError, SphereconvError
from sphereconv.experiments import paper
from sphereconv.experiments.definitions import EXPERIMENTS, Variant, get_experiment
from sphereconv.experiments.overlay import collect_curves, overlay_runs, run_label
from sphereconv.experiments.plots import aggregate_curves, plot_curves, plot_features2d, plot_sweep
from sphereconv.experiments.report import ReportContext, render_table, write_report
from sphereconv.experiments.results import (
    ResultsError,
    RunResult,
    iterations_to_reach,
    read_metrics,
    summarise_runs,
)


def write_run(run_dir: Path, accs: list[float], losses: list[float] | None = None, every: int = 10, **summary) -> Path:
    """A fake finished run: metrics.jsonl with one record per evaluation and a summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    losses = losses or [2.0 / (i + 1) for i in range(len(accs))]
    with (run_dir / "metrics.jsonl").open("w") as handle:
        for i, (acc, loss) in enumerate(zip(accs, losses), start=1):
            handle.write(
                json.dumps(
                    {"step": i * every, "epoch": i, "train_loss": loss, "test_acc": acc, "lr": 1e-3, "seconds": i}
                )
                + "\n"
            )
    document = {
        "final_test_acc": accs[-1],
        "best_test_acc": max(accs),
        "steps": len(accs) * every,
        "images_per_second": 100.0,
    }
    document.update(summary)
    (run_dir / "summary.json").write_text(json.dumps(document))
    return run_dir


def test_iterations_to_reach_is_the_first_evaluation_at_or_above_the_threshold():
    metrics = [
        {"step": 10, "test_acc": 0.5},
        {"step": 20, "test_acc": 0.8},
        {"step": 30, "test_acc": 0.79},
        {"step": 40, "test_acc": 0.9},
    ]
    assert iterations_to_reach(metrics, 0.8) == 20
    assert iterations_to_reach(metrics, 0.85) == 40
    assert iterations_to_reach(metrics, 0.95) is None
    assert iterations_to_reach([{"step": 5, "train_loss": 1.0}], 0.1) is None


def test_summary_over_seeds_gives_mean_sample_std_and_reach_counts(tmp_path):
    runs = [
        RunResult.load(write_run(tmp_path / "seed0", [0.6, 0.8, 0.9]), 0),
        RunResult.load(write_run(tmp_path / "seed1", [0.5, 0.7, 0.8]), 1),
    ]
    summary = summarise_runs(runs, (0.7, 0.9, 0.99))
    assert summary["seeds"] == 2
    assert summary["final_test_acc_mean"] == pytest.approx(0.85)
    assert summary["final_test_acc_std"] == pytest.approx(math.sqrt(0.005))  # sample std of 0.9, 0.8
    assert summary["best_test_acc_mean"] == pytest.approx(0.85)
    assert summary["iterations_to"]["0.7"] == pytest.approx(20.0)  # both seeds pass 70% at step 20
    assert summary["iterations_to"]["0.9"] == pytest.approx(30.0)  # only seed0 reaches 90%, at step 30
    assert summary["reached"] == {"0.7": 2, "0.9": 1, "0.99": 0}
    assert summary["iterations_to"]["0.99"] is None
    assert summary["images_per_second"] == pytest.approx(100.0)


def test_summary_of_one_seed_has_zero_spread(tmp_path):
    run = RunResult.load(write_run(tmp_path / "seed0", [0.2, 0.4]), 0)
    summary = summarise_runs([run], (0.3,))
    assert summary["final_test_acc_std"] == 0.0 and summary["final_test_acc_mean"] == pytest.approx(0.4)


def test_broken_metrics_file_is_a_one_line_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "test_acc": 0.5}\n{not json\n')
    with pytest.raises(ResultsError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_metrics(tmp_path)
    with pytest.raises(ResultsError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "missing")
    assert issubclass(ResultsError, SphereconvError)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"step": "abc", "test_acc": 0.5}\n', "metrics.jsonl:1 is not a metrics record"),
        (b'{"step": null, "test_acc": 0.5}\n', "metrics.jsonl:1 is not a metrics record"),
        (b'{"step": [1], "test_acc": 0.5}\n', "metrics.jsonl:1 is not a metrics record"),
        (b'{"step": 1}\n{"step": 1e400}\n', "metrics.jsonl:2 is not a metrics record"),
        (b"\xff\xfe\x00 not text", "metrics.jsonl is not a text file"),
    ],
)
def test_plot_of_a_metrics_file_with_a_bad_step_or_bytes_is_one_line(tmp_path, capsys, content, message):
    # Was a ValueError / TypeError / OverflowError / UnicodeDecodeError traceback from int() or the decoder.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(content)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.png").exists()


def test_report_table_shows_mean_std_thresholds_and_paper_values():
    variant = Variant("cnn", "CNN-9", {"operator": "none"}, paper.CNN9_SOFTMAX)
    other = Variant("cosine", "SphereNet-9 cosine", {"operator": "cosine"})
    summary = {
        "seeds": 3,
        "final_test_acc_mean": 0.8512,
        "final_test_acc_std": 0.0031,
        "best_test_acc_mean": 0.86,
        "best_test_acc_std": 0.002,
        "images_per_second": 1234.0,
        "iterations_to": {"0.8": 300.0, "0.9": None},
        "reached": {"0.8": 2, "0.9": 0},
    }
    table = render_table([(variant, summary), (other, summary)], (0.8, 0.9), seeds=3)
    lines = table.splitlines()
    assert "paper best / final % (CIFAR-10)" in lines[0] and "iters to 80%" in lines[0] and "iters to 90%" in lines[0]
    assert "85.12 ± 0.31" in lines[2] and "86.00 ± 0.20" in lines[2]
    assert "300 (2/3 seeds)" in lines[2] and "| — |" in lines[2]
    assert "90.86 / 90.61" in lines[2]
    assert lines[3].rstrip().endswith("| — |")  # no paper value for that variant
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_write_report_creates_markdown_and_json(tmp_path):
    experiment = get_experiment("convergence")
    runs = [RunResult.load(write_run(tmp_path / "r" / "seed0", [0.5, 0.9]), 0)]
    context = ReportContext(
        command="sphereconv reproduce convergence",
        scale="smoke",
        dataset="fashion-mnist",
        device="cpu",
        seeds=1,
        thresholds=(0.8,),
    )
    collected = [(v, runs, summarise_runs(runs, (0.8,))) for v in experiment.variants]
    report = write_report(tmp_path / "out", experiment, context, collected, ["test_acc.png"])
    text = report.read_text()
    assert "sphereconv reproduce convergence" in text and "![test_acc](test_acc.png)" in text
    assert "| `cnn9` |" in text and "90.00" in text and paper.CONVERGENCE_NOTE in text
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [v["name"] for v in document["variants"]] == ["cnn9", "spherenet9_cosine"]
    assert document["variants"][0]["paper"] == {"best": 90.86, "final": 90.61, "dataset": "CIFAR-10"}
    assert document["variants"][0]["runs"][0]["final_test_acc"] == pytest.approx(0.9)


def test_every_experiment_has_unique_filesystem_safe_variant_names():
    assert set(EXPERIMENTS) == {
        "operators",
        "orthogonality",
        "width",
        "depth",
        "spherenorm",
        "learnable",
        "resnet",
        "features2d",
        "convergence",
    }
    for experiment in EXPERIMENTS.values():
        names = experiment.variant_names()
        assert len(names) == len(set(names)) >= 2, experiment.name
        assert all(n.replace("_", "").replace(".", "").isalnum() for n in names), names
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; choose one of: operators"):
        get_experiment("nope")


def test_experiment_grids_cover_the_papers_ablations():
    operators = get_experiment("operators")
    combos = {(v.overrides.get("operator"), v.overrides.get("loss")) for v in operators.variants}
    for op in ("linear", "cosine", "sigmoid"):
        for loss in ("softmax", "weight_normalized", "ga_softmax"):
            assert (op, loss) in combos
    assert ("none", "softmax") in combos and ("learnable_sigmoid", "softmax") in combos
    assert {v.overrides.get("sigmoid_k") for v in operators.variants} >= {0.1, 0.3, 0.7}
    depth = get_experiment("depth")
    assert {v.overrides["model"] for v in depth.variants} == {"spherenet9", "spherenet18", "spherenet36", "spherenet69"}
    assert {v.overrides["batch_norm"] for v in depth.variants} == {True, False}
    spherenorm = get_experiment("spherenorm")
    assert min(v.overrides["batch_size"] for v in spherenorm.variants) == 2
    assert max(v.overrides["batch_size"] for v in spherenorm.variants) == 128
    assert {v.group for v in spherenorm.variants} == {"BatchNorm", "SphereNorm", "SphereNorm + BatchNorm"}


def test_aggregate_curves_takes_mean_min_max_over_seeds():
    steps, mean, low, high = aggregate_curves([([10, 20], [0.2, 0.4]), ([10, 20, 30], [0.4, 0.6, 0.8])])
    assert steps.tolist() == [10, 20, 30]
    assert mean.tolist() == pytest.approx([0.3, 0.5, 0.8])
    assert low.tolist() == pytest.approx([0.2, 0.4, 0.8]) and high.tolist() == pytest.approx([0.4, 0.6, 0.8])


def test_curve_sweep_and_feature_plots_are_real_images(tmp_path):
    groups = {
        "cnn": [([10, 20, 30], [0.3, 0.5, 0.6]), ([10, 20, 30], [0.35, 0.55, 0.62])],
        "sphere": [([10, 20, 30], [0.4, 0.6, 0.7])],
    }
    assert_png(plot_curves(groups, tmp_path / "curves.png", metric="test_acc", title="t"))
    sweep = {
        "BatchNorm": [(2, [0.5, 0.55]), (8, [0.7]), (32, [0.8])],
        "SphereNorm": [(2, [0.6]), (8, [0.72]), (32, [0.79])],
    }
    assert_png(plot_sweep(sweep, tmp_path / "sweep.png", xlabel="batch", log_x=True))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    features = np.stack([np.cos(labels), np.sin(labels)], 1) * rng.uniform(1, 3, (500, 1))
    pixels = assert_png(
        plot_features2d([("cnn", features, labels), ("sphere", features / 3, labels)], tmp_path / "f.png"), size=None
    )
    assert pixels.shape[1] == 800 and pixels.shape[0] == 460


def test_a_plot_is_replaced_whole_not_rewritten_in_place(tmp_path):
    # Two grid workers rewrite the same report plots after their runs; written in place, two writes
    # at once interleave into a PNG that is neither. Replaced by rename, a reader (or the other
    # writer) keeps the whole old file, and no temporary file stays behind.
    out = tmp_path / "curves.png"
    plot_curves({"a": [([1, 2], [0.1, 0.2])]}, out)
    with open(out, "rb") as reader:
        before = reader.read()
        plot_curves({"a": [([1, 2, 3], [0.1, 0.2, 0.3])]}, out)
        reader.seek(0)
        assert reader.read() == before  # the open file is the old one, untouched
    assert out.read_bytes() != before
    assert_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_plot_of_groups_without_values_still_writes_a_labelled_image(tmp_path):
    path = plot_curves({"a": [([], [])]}, tmp_path / "empty.png", metric="test_acc")
    assert_png(path, CURVE_PLOT_SIZE)


def test_overlay_keeps_different_runs_of_the_same_name_apart(tmp_path):
    # `plot e1/run e2/run` drew one line "run", the mean of two different runs with their range
    # shaded as if they were two seeds of one run.
    write_run(tmp_path / "e1" / "run", [0.3, 0.6])
    write_run(tmp_path / "e2" / "run", [0.5, 0.9])
    groups = collect_curves([tmp_path / "e1" / "run", tmp_path / "e2" / "run"], "test_acc")
    assert {label: len(curves) for label, curves in groups.items()} == {"e1/run": 1, "e2/run": 1}
    for name in ("r1", "r2"):
        write_run(tmp_path / name / "conv" / "seed0", [0.4, 0.7])
    for roots in (["r1/conv/seed0", "r2/conv/seed0"], ["r1/conv", "r2/conv"]):
        groups = collect_curves([tmp_path / root for root in roots], "test_acc")
        assert {label: len(curves) for label, curves in groups.items()} == {"r1/conv": 1, "r2/conv": 1}
    # Seeds of one run given one by one are still one line.
    write_run(tmp_path / "r1" / "conv" / "seed1", [0.45, 0.75])
    groups = collect_curves([tmp_path / "r1" / "conv" / "seed0", tmp_path / "r1" / "conv" / "seed1"], "test_acc")
    assert {label: len(curves) for label, curves in groups.items()} == {"conv": 2}


def test_overlay_groups_seeds_of_a_reproduce_directory(tmp_path):
    root = tmp_path / "convergence"
    write_run(root / "cnn9" / "seed0", [0.3, 0.6])
    write_run(root / "cnn9" / "seed1", [0.35, 0.65])
    write_run(root / "spherenet9_cosine" / "seed0", [0.4, 0.7])
    single = write_run(tmp_path / "my_run", [0.1, 0.2])
    groups = collect_curves([root], "test_acc")
    assert sorted(groups) == ["cnn9", "spherenet9_cosine"] and len(groups["cnn9"]) == 2
    assert run_label(single, single) == "my_run"
    assert run_label(root / "cnn9" / "seed0", root / "cnn9" / "seed0") == "cnn9"
    assert_png(overlay_runs([root, single], tmp_path / "overlay.png", metric="train_loss"))
    with pytest.raises(ResultsError, match="does not exist"):
        overlay_runs([tmp_path / "convergence" / "cnn9" / "nothing"], tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="no finished runs"):
        overlay_runs([tmp_path / "empty"], tmp_path / "x.png")
    with pytest.raises(ResultsError, match="must name a .png"):
        overlay_runs([root], tmp_path / "x.jpg")
