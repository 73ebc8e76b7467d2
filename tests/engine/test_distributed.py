"""Data-parallel training on the CPU with gloo: two ranks under ``torchrun`` end with identical
weights, and when one rank dies the other stops with an error within bounded time."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from engine_helpers import PYTHON, TRAIN_SCRIPT, free_port, subprocess_env, tiny_overrides, torchrun_command

from cli_helpers import folder_snapshot
from sphereconv.engine.checkpoint import checkpoint_dir, load_checkpoint

# Seconds every collective may wait for a peer before failing (SPHERECONV_DIST_TIMEOUT).
COLLECTIVE_TIMEOUT_S = 20
# A surviving rank must be gone well within this bound.
EXIT_BOUND_S = 60
# Wall-clock limit of one torchrun invocation (startup of two processes on a loaded machine).
RUN_TIMEOUT_S = 180


def _env() -> dict:
    env = subprocess_env()
    env["SPHERECONV_DIST_TIMEOUT"] = str(COLLECTIVE_TIMEOUT_S)
    return env


def _torchrun(overrides: dict, *options) -> list[str]:
    return torchrun_command(TRAIN_SCRIPT, overrides, *options)


def test_two_ranks_hold_identical_weights(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(out, iterations=6, eval_every=3, checkpoint_every=3, augment="crop_flip")
    result = subprocess.run(
        _torchrun(overrides, "--dump-dir", tmp_path), env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"summary_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(summaries) == 2 and all(s["world_size"] == 2 for s in summaries)
    # Both ranks report the same (all-reduced) test accuracy over the whole test subset.
    assert summaries[0]["final_test_acc"] == summaries[1]["final_test_acc"]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    saved = load_checkpoint(checkpoint_dir(out) / "step_00000006.pt")["model"]
    assert rank0.keys() == rank1.keys() == saved.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key
    # Only rank 0 wrote the metrics: one record per evaluation.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]


# Two-rank runs of the exit test: with the old teardown about half of them aborted under
# --starve-gloo-workers (6 of 12, 2026-12-07), so four miss the fault once in sixteen.
CLEAN_EXIT_RUNS = 4


def test_finished_runs_exit_cleanly_when_gloo_workers_lag(tmp_path):
    """A run that finished must exit 0 on every rank even when the gloo worker threads get no core
    until the main thread waits: a worker still releasing the last collective's Python tensors
    when the interpreter exits aborted the process after the summary was written (exit code -6)."""
    for attempt in range(CLEAN_EXIT_RUNS):
        overrides = tiny_overrides(tmp_path / f"run{attempt}", iterations=4, eval_every=2, checkpoint_every=2)
        result = subprocess.run(
            _torchrun(overrides, "--starve-gloo-workers"),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert result.returncode == 0, f"attempt {attempt}: {result.stderr[-3000:]}"
        assert result.stdout.count("SUMMARY") == 2


def test_dead_rank_makes_the_others_exit(tmp_path):
    overrides = tiny_overrides(tmp_path / "run", iterations=200, eval_every=0, checkpoint_every=0)
    started = time.monotonic()
    result = subprocess.run(
        _torchrun(overrides, "--exit-rank", 1, "--exit-at-step", 3),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert "rank 1 exiting at step 3" in result.stdout
    assert result.returncode != 0
    assert "SUMMARY" not in result.stdout  # rank 0 did not carry on alone
    assert time.monotonic() - started < EXIT_BOUND_S


def test_surviving_rank_fails_on_its_own_within_bounded_time(tmp_path):
    """Without torchrun's supervision: rank 0 must notice the dead peer itself and exit with an error."""
    overrides = tiny_overrides(tmp_path / "run", iterations=200, eval_every=0, checkpoint_every=0)
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [PYTHON, str(TRAIN_SCRIPT), json.dumps(overrides), "--exit-rank", "1", "--exit-at-step", "3"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        survivor, dying = processes
        dying.wait(timeout=RUN_TIMEOUT_S)
        died_at = time.monotonic()
        out, err = survivor.communicate(timeout=RUN_TIMEOUT_S)
        waited = time.monotonic() - died_at
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert dying.returncode == 3
    assert survivor.returncode not in (0, None), out
    assert waited < EXIT_BOUND_S
    assert "SUMMARY" not in out
    assert "sphereconv.errors.SphereconvError: rank 0 lost contact with another data-parallel rank" in err


def test_ranks_that_see_different_run_folders_refuse_to_resume(tmp_path):
    """A rank that does not see the run's checkpoints (a node without the shared file system) must
    not start from step 0 beside a rank 0 that resumes: it would train other weights in silence."""
    out = tmp_path / "run"
    overrides = tiny_overrides(out, iterations=4, eval_every=2, checkpoint_every=2)
    result = subprocess.run(_torchrun(overrides), env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    before = folder_snapshot(out)
    resumed = {**overrides, "iterations": 6, "resume": True}
    result = subprocess.run(
        _torchrun(resumed, "--rank-out", 1, tmp_path / "elsewhere"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode != 0
    assert "SUMMARY" not in result.stdout
    assert "found different checkpoints to resume from" in result.stderr, result.stderr[-3000:]
    assert "rank 0: step 4, rank 1: step 0" in result.stderr
    assert folder_snapshot(out) == before


def test_environment_is_checked(monkeypatch):
    from sphereconv.engine.distributed import collective_timeout, setup_distributed
    from sphereconv.errors import ConfigError

    monkeypatch.setenv("SPHERECONV_DIST_TIMEOUT", "45")
    assert collective_timeout().total_seconds() == 45
    for bad in ("soon", "-3", "inf"):
        monkeypatch.setenv("SPHERECONV_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="SPHERECONV_DIST_TIMEOUT"):
            collective_timeout()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="RANK=5, WORLD_SIZE=2"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    context = setup_distributed("cpu")
    assert not context.enabled and context.is_main and context.device.type == "cpu"
