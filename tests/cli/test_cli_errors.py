"""User errors end with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sphereconv import __version__
from sphereconv.cli import main as cli_main
from sphereconv.cli import train as train_command
from sphereconv.cli.main import main
from sphereconv.errors import SphereconvError


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sphereconv: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_datasets(tmp_path, monkeypatch):
    """Hide every dataset search root except the system one (which has no MNIST)."""
    monkeypatch.delenv("SPHERECONV_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "empty_data"
    empty.mkdir()
    return empty


def test_version_and_help_exit_zero(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sphereconv {__version__}"
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--config",
        "--model",
        "--operator",
        "--epochs",
        "--iterations",
        "--amp",
        "--resume",
        "--dry-run",
        "--margin",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "--dataset", "imagenet-21k", "--dry-run"], ["dataset", "'imagenet-21k'", "fashion-mnist"]),
        (["train", "--model", "resnet9000", "--dry-run"], ["model", "'resnet9000'", "spherenet9"]),
        (["train", "--epochs", "1", "--iterations", "5"], ["--epochs and --iterations are mutually exclusive"]),
        (["train", "--amp", "fp8", "--dry-run"], ["amp", "'fp8'", "bf16"]),
        (["train", "--amp", "fp16", "--device", "cpu", "--dry-run"], ["fp16", "CUDA"]),
        (["train", "--operator", "tangent", "--dry-run"], ["operator", "'tangent'"]),
        (["train", "--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["train", "--lr", "fast"], ["--lr", "'fast'"]),
        (["train", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
        (["reproduce", "imagenet"], ["invalid choice: 'imagenet'", "convergence"]),
        (["reproduce", "operators", "--scale", "huge"], ["invalid choice: 'huge'", "smoke"]),
        (["reproduce", "operators", "--seeds", "0"], ["--seeds", "positive integer"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        ([], ["required: COMMAND"]),
        (["eval", "no/such/checkpoint.pt"], ["no/such/checkpoint.pt"]),
        (["plot", "no/such/run", "--out", "x.png"], ["no/such/run does not exist"]),
        (["plot", "no/such/run", "--out", "x.png", "--metric", "accuracy"], ["--metric", "'accuracy'"]),
    ],
)
def test_user_errors_are_one_line(argv, fragments, capsys):
    rc = main(argv)
    assert_one_line_error(rc, capsys.readouterr().err, *fragments)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["reproduce", "operators", "--dry-run", "--out", "{file}"], ["--out", "'{file}', which is a file"]),
        (["reproduce", "operators", "--dry-run", "--out", "{file}/x"], ["--out", "below '{file}', which is a file"]),
        (["reproduce", "operators", "--dry-run", "--out", ""], ["--out", "empty path"]),
        (["reproduce", "--grid", "quickstart", "--dry-run", "--results", "{file}"], ["--results", "'{file}'"]),
        (["reproduce", "--grid", "{folder}"], ["grid file '{folder}' is a folder, not a grid file"]),
        (["inspect", "{folder}", "--out", "{file}"], ["--out", "'{file}', which is a file"]),
        (["inspect", "{folder}", "--data-dir", "{folder}/missing"], ["--data-dir", "'{folder}/missing'"]),
        (["inspect", "{folder}", "--device", "gpu"], ["--device", "'gpu'", "cuda:N"]),
        (["plot", "{file}", "--out", "{folder}/p.png"], ["run directory {file} is a file, not a folder"]),
        (["plot", "{folder}", "--out", "{folder}"], ["--out", "'{folder}', which is a folder"]),
        (["plot", "{folder}", "--out", "{file}/p.png"], ["--out", "below '{file}', which is a file"]),
        (["export", "{folder}", "--out", "{folder}"], ["--out", "'{folder}', which is a folder"]),
        (["export", "{folder}", "--out", "{file}/net.onnx"], ["--out", "below '{file}', which is a file"]),
        (["train", "--out", "{file}/run", "--iterations", "1"], ["'{file}/run' lies below '{file}', which is a file"]),
        # A missing --data-dir fell back to the other search places and trained on what they held.
        (["train", "--data-dir", "{folder}/missing", "--dry-run"], ["data_dir='{folder}/missing'", "existing folder"]),
        (["train", "--data-dir", "{file}", "--dry-run"], ["data_dir='{file}'", "existing folder"]),
        (["reproduce", "operators", "--dry-run", "--data-dir", "{folder}/missing"], ["data_dir='{folder}/missing'"]),
        (["bench", "--json", ""], ["--json", "empty path"]),
        (["bench", "--json", "{folder}"], ["--json", "'{folder}', which is a folder"]),
        (["reproduce", "operators", "--dry-run", "--device", "gpu"], ["--device", "'gpu'", "cuda:N"]),
    ],
)
def test_paths_of_the_wrong_kind_are_one_line_naming_them(argv, fragments, tmp_path, capsys):
    # Checked before any work is done (measuring, training, exporting), and named as given.
    paths = {"file": str(tmp_path / "a_file"), "folder": str(tmp_path / "a_folder")}
    Path(paths["file"]).write_text("")
    Path(paths["folder"]).mkdir()
    rc = main([word.format(**paths) for word in argv])
    assert_one_line_error(rc, capsys.readouterr().err, *(fragment.format(**paths) for fragment in fragments))


def test_bad_yaml_and_unknown_config_key_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [spherenet9\nlr: 1e-3\n")
    assert_one_line_error(
        main(["train", "--config", str(bad), "--dry-run"]), capsys.readouterr().err, "not valid YAML", "bad.yaml"
    )
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: spherenet9\n")
    assert_one_line_error(
        main(["train", "--config", str(typo), "--dry-run"]), capsys.readouterr().err, "unknown key 'modle'", "model"
    )
    missing = tmp_path / "missing.yaml"
    assert_one_line_error(
        main(["train", "--config", str(missing), "--dry-run"]),
        capsys.readouterr().err,
        "missing.yaml",
        "does not exist",
    )


def test_missing_data_without_download_is_one_line_with_the_fix(no_datasets, tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(no_datasets),
        "--iterations",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    line = assert_one_line_error(main(argv), capsys.readouterr().err, "mnist")
    assert "download" in line.lower()


def test_dry_run_prints_the_resolved_config_with_overrides(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: spherenet18\niterations: 500\nlr: 0.01\n")
    rc = main(
        [
            "train",
            "--config",
            str(config),
            "--epochs",
            "2",
            "--lr",
            "0.003",
            "--margin",
            "1.5",
            "--loss",
            "ga_softmax",
            "--no-progress",
            "--dry-run",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "model: spherenet18" in captured.out and "lr: 0.003" in captured.out
    assert (
        "epochs: 2.0" in captured.out and "iterations: null" in captured.out
    )  # --epochs replaces the file's iterations
    assert "margin: 1.5" in captured.out and "progress: false" in captured.out


def test_only_given_flags_become_overrides():
    parser = cli_main.build_parser()
    args = parser.parse_args(["train", "--model", "spherenet36", "--no-progress", "--compile"])
    assert train_command.overrides_from_args(args) == {"model": "spherenet36", "progress": False, "compile": True}
    assert train_command.overrides_from_args(parser.parse_args(["train"])) == {}


def test_interrupt_exits_1_and_debug_reraises(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "run", interrupted)
    assert main(["train"]) == 1
    assert capsys.readouterr().err.strip() == "sphereconv: interrupted"
    monkeypatch.setenv("SPHERECONV_DEBUG", "1")
    reraised = False
    try:  # (pytest.raises does not catch KeyboardInterrupt)
        main(["train"])
    except KeyboardInterrupt:
        reraised = True
    assert reraised


def test_debug_variable_shows_the_traceback_of_user_errors(monkeypatch):
    monkeypatch.setenv("SPHERECONV_DEBUG", "1")
    with pytest.raises(SphereconvError, match="'nope'"):
        main(["train", "--dataset", "nope", "--dry-run"])


def test_real_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [\n")
    env = {k: v for k, v in os.environ.items() if k != "SPHERECONV_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "sphereconv.cli.main", "train", "--config", str(bad), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert_one_line_error(proc.returncode, proc.stderr, "not valid YAML")
    assert proc.stdout == ""


def test_bench_is_wired_in(capsys):
    assert main(["bench", "--help"]) == 0
    assert "bench" in capsys.readouterr().out
