"""``sphereconv train --resume`` is a contract and checkpoints carry their own SHA-256, on a real
Fashion-MNIST subset: settings that define the run cannot change on resume (one line, folder byte
for byte unchanged, a plain ``--resume`` still works), allowed changes are recorded as amendments,
and a checkpoint with one flipped byte is refused by ``eval`` and skipped by ``--resume``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY, folder_snapshot, run_cli
from sphereconv.engine.checkpoint import (
    HEADER_BYTES,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """``train T --iterations 6 --checkpoint-every 3 --out R``: checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("contract") / "R"
    code, _, err = run_cli("train", *TINY, "--iterations", 6, "--checkpoint-every", 3, "--out", out)
    assert code == 0, err
    assert [s for s, _ in list_checkpoints(checkpoint_dir(out))] == [3, 6]
    return out


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "R"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--iterations", 8, "--optimizer", "sgd"], "optimizer='adam' there but 'sgd' here"),  # was KeyError 'momentum'
        (
            ["--iterations", 8, "--schedule", "onecycle"],
            "schedule='step' there but 'onecycle' here",
        ),  # was KeyError 'max_lr'
        (["--lr", 0.5], "lr=0.001 there but 0.5 here"),  # was recorded but not applied
        (["--seed", 5], "seed=0 there but 5 here"),  # was recorded but not applied
    ],
    ids=["optimizer", "schedule", "lr", "seed"],
)
def test_changing_what_the_run_computes_on_resume_is_refused_and_changes_nothing(run, flags, named):
    before = folder_snapshot(run)
    code, out, err = run_cli("train", *TINY, *flags, "--resume", "--out", run)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("sphereconv: error: cannot resume the run in")
    assert named in err and "may change only iterations, epochs" in err
    assert folder_snapshot(run) == before
    # The run is still usable without remembering its original flags.
    code, out, err = run_cli("train", "--resume", "--out", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["amendments"] == [] and summary["seed"] == 0


def test_allowed_changes_are_recorded_as_amendments_and_the_config_stays(run):
    config_text = (run / "config.yaml").read_bytes()
    code, _, err = run_cli("train", *TINY, "--resume", "--iterations", 9, "--eval-every", 3, "--out", run)
    assert code == 0, err
    assert (run / "config.yaml").read_bytes() == config_text  # immutable once written
    expected = [{"step": 6, "changes": {"iterations": {"from": 6, "to": 9}, "eval_every": {"from": 500, "to": 3}}}]
    assert json.loads((run / "amendments.json").read_text()) == expected
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["amendments"] == expected
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [6, 9]
    # A plain resume continues the amended run (9 steps) and adds no amendment.
    code, _, err = run_cli("train", "--resume", "--out", run)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 9
    assert json.loads((run / "amendments.json").read_text()) == expected
    # The run cannot become shorter than the steps it has done.
    before = folder_snapshot(run)
    code, _, err = run_cli("train", "--resume", "--iterations", 4, "--out", run)
    assert code == 2 and "iterations=4 gives 4 steps" in err and "already at step 9" in err
    assert folder_snapshot(run) == before


def test_flipped_byte_in_a_checkpoint_is_refused_by_eval_and_skipped_by_resume(run, caplog):
    newest = checkpoint_dir(run) / "step_00000006.pt"
    original = load_checkpoint(newest)["model"]
    data = bytearray(newest.read_bytes())
    position = HEADER_BYTES + (len(data) - HEADER_BYTES) * 2 // 3  # inside the tensor data
    data[position] ^= 0x10
    newest.write_bytes(bytes(data))

    code, out, err = run_cli("eval", run, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "step_00000006.pt" in err and "corrupt" in err and "SHA-256" in err

    code, _, err = run_cli("train", "--resume", "--out", run)
    assert code == 0, err
    assert "skipping checkpoint of step 6" in caplog.text
    # Resumed from step 3, the run ends bit for bit where the intact run ended.
    redone = load_checkpoint(newest)["model"]
    assert all(torch.equal(original[key], redone[key]) for key in original)
