"""A run killed again and again (SIGKILL at a step, SIGKILL inside a checkpoint write, SIGTERM and
SIGKILL at random moments) and resumed each time ends bit for bit where an uninterrupted run ends,
with the same metrics records, none missing and none repeated; a resume may change the run's length
only where its schedule allows it."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
import torch
from engine_helpers import PYTHON, TRAIN_SCRIPT, subprocess_env, tiny_overrides

from cli_helpers import folder_snapshot
from sphereconv.engine import load_config, train
from sphereconv.engine.atomic import TEMP_PREFIX
from sphereconv.engine.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
)
from sphereconv.errors import ConfigError

# 288 training images in batches of 32: 9 steps per epoch, so checkpoints every 10 steps fall in
# the middle of epochs and the data position must be restored exactly.
TOTAL_STEPS = 60
# Keys of a metrics record that must be reproduced exactly (timings naturally differ).
DETERMINISTIC_KEYS = ("step", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "skipped_steps")
# Upper bound for one training subprocess (startup ~5 s on a loaded 2-core machine).
PROCESS_TIMEOUT_S = 120


def _overrides(out, **extra):
    settings = dict(
        iterations=TOTAL_STEPS,
        train_subset=288,
        test_subset=100,
        eval_batch_size=100,
        eval_every=10,
        checkpoint_every=10,
        keep_checkpoints=3,
        augment="crop_flip",
        loss="ga_softmax",
        loss_kwargs={"margin": 2.0},
        lr_milestones=[0.5, 0.8],
    )
    return tiny_overrides(out, **{**settings, **extra})


def _command(overrides, *options):
    return [PYTHON, str(TRAIN_SCRIPT), json.dumps(overrides), *map(str, options)]


def _run(overrides, *options):
    return subprocess.run(
        _command(overrides, *options), env=subprocess_env(), capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S
    )


def _run_and_signal(overrides, signum, delay_s):
    """Start a run, wait until its loop has started, wait ``delay_s`` more, send ``signum``."""
    process = subprocess.Popen(
        _command(overrides), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("STARTED"), (line, process.stderr.read())
        time.sleep(delay_s)
        if process.poll() is None:
            process.send_signal(signum)
        out, err = process.communicate(timeout=PROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, line + out, err


def _steps(out):
    return [s for s, _ in list_checkpoints(checkpoint_dir(out))]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_tensors(a, b, what):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what}: max difference {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def _assert_checkpoints_match(out, reference_out, stage):
    for step, path in list_checkpoints(checkpoint_dir(out)):
        expected = load_checkpoint(checkpoint_dir(reference_out) / path.name)
        actual = load_checkpoint(path)
        for key in ("model", "loss", "optimizer", "scheduler", "loader"):
            _assert_same_tensors(expected[key], actual[key], f"{stage}: checkpoint {step}: {key}")


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path):
    chooser = random.Random(1234)
    reference_out, out = tmp_path / "reference", tmp_path / "killed"
    # The reference keeps a checkpoint of every step to compare each stage's checkpoints with.
    reference = train(load_config(None, _overrides(reference_out, checkpoint_every=1, keep_checkpoints=TOTAL_STEPS)))
    assert reference["steps"] == TOTAL_STEPS

    # 1. SIGKILL right after step 23: checkpoints 10 and 20 survive.
    result = _run(_overrides(out), "--kill-at-step", 23)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert _steps(out) == [10, 20]
    assert [r["step"] for r in _metrics(out)] == [10, 20]
    _assert_checkpoints_match(out, reference_out, "after the SIGKILL at step 23")

    # 2. Resume; SIGKILL inside the write of checkpoint 40 (complete temporary file, no rename).
    resumed = _overrides(out, resume=True)
    result = _run(resumed, "--kill-in-checkpoint-write", 40)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "STARTED 20" in result.stdout
    assert _steps(out) == [10, 20, 30]
    assert [p for p in checkpoint_dir(out).iterdir() if p.name.startswith(TEMP_PREFIX)]
    _assert_checkpoints_match(out, reference_out, "after the SIGKILL in a checkpoint write")
    # The record of step 40 exists; the next resume (from 30) cuts it back.
    assert [r["step"] for r in _metrics(out)] == [10, 20, 30, 40]

    # 3. Resume from 30; SIGTERM at a random moment: the run checkpoints and exits cleanly.
    code, stdout, stderr = _run_and_signal(resumed, signal.SIGTERM, chooser.uniform(0.0, 0.4))
    assert code == 0, stderr
    assert "STARTED 30" in stdout
    summary = json.loads(stdout.split("SUMMARY ", 1)[1])
    assert summary["interrupted"] == "SIGTERM", summary
    stopped_at = summary["steps"]
    assert 30 < stopped_at < TOTAL_STEPS and _steps(out)[-1] == stopped_at
    assert not [p for p in checkpoint_dir(out).iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert not (out / "summary.json").exists()
    _assert_checkpoints_match(out, reference_out, "after SIGTERM")

    # 4. Resume; SIGKILL at a random moment.
    code, stdout, stderr = _run_and_signal(resumed, signal.SIGKILL, chooser.uniform(0.0, 0.6))
    assert f"STARTED {stopped_at}" in stdout
    assert code in (-signal.SIGKILL, 0), stderr
    _assert_checkpoints_match(out, reference_out, "after the random SIGKILL")

    # 5. Resume to the end.
    result = _run(resumed)
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout.split("SUMMARY ", 1)[1])
    assert final["steps"] == TOTAL_STEPS and final["interrupted"] is None

    # Same weights, optimizer, scheduler, loss module (GA-Softmax annealing counter) and data position.
    _assert_checkpoints_match(out, reference_out, "at the end")
    assert _steps(out)[-1] == TOTAL_STEPS
    # Metrics continue without gap or duplicate and with the same values.
    ref_records, records = _metrics(reference_out), _metrics(out)
    assert [r["step"] for r in records] == list(range(10, TOTAL_STEPS + 1, 10))
    for ref_record, record in zip(ref_records, records):
        assert {k: ref_record[k] for k in DETERMINISTIC_KEYS} == {k: record[k] for k in DETERMINISTIC_KEYS}
    assert final["final_test_acc"] == reference["final_test_acc"]
    assert final["best_test_acc"] == reference["best_test_acc"]


def test_resume_may_not_stretch_a_schedule_defined_by_the_run_length(tmp_path):
    out = tmp_path / "run"
    settings = dict(iterations=6, eval_every=0, checkpoint_every=3, schedule="cosine")
    train(load_config(None, tiny_overrides(out, **settings)))
    before = folder_snapshot(out)
    with pytest.raises(ConfigError, match=r"iterations=8 gives 8 steps, but schedule='cosine' spans the run's 6 steps"):
        train(load_config(None, tiny_overrides(out, **{**settings, "iterations": 8, "resume": True})))
    with pytest.raises(ConfigError, match=r"epochs=0.25 gives 2 steps, .* already at step 6"):
        train(
            load_config(None, tiny_overrides(out, **{**settings, "iterations": None, "epochs": 0.25, "resume": True}))
        )
    assert folder_snapshot(out) == before
    # Changing only how often it checkpoints is allowed, and recorded with the step it applies from.
    summary = train(load_config(None, tiny_overrides(out, **{**settings, "checkpoint_every": 2, "resume": True})))
    assert summary["amendments"] == [{"step": 6, "changes": {"checkpoint_every": {"from": 3, "to": 2}}}]


def test_lengthened_step_schedule_keeps_its_drops_where_the_original_length_put_them(tmp_path):
    # docs/guide/training.md: a lengthened run keeps the schedule it started with; the added steps of
    # a finished step-schedule run train at its final learning rate.
    out = tmp_path / "run"
    settings = dict(iterations=6, eval_every=0, checkpoint_every=3, schedule="step", lr=1e-3)
    settings.update(lr_milestones=[0.5], lr_gamma=0.1, loss="ga_softmax")
    train(load_config(None, tiny_overrides(out, **settings)))
    summary = train(load_config(None, tiny_overrides(out, **{**settings, "iterations": 12, "resume": True})))
    assert summary["amendments"] == [{"step": 6, "changes": {"iterations": {"from": 6, "to": 12}}}]
    state = load_checkpoint(list_checkpoints(checkpoint_dir(out))[-1][1])
    assert state["step"] == 12
    assert dict(state["scheduler"]["milestones"]) == {3: 1}  # 0.5 of the original 6 steps, not of 12
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert int(state["loss"]["anneal_iterations"]) == 6
