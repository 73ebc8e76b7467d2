"""``batch_size`` is global: under a real 2-rank ``torchrun`` (gloo, CPU) each rank consumes half of
it at every step and the job as a whole exactly ``batch_size`` images per step."""

from __future__ import annotations

import json
import subprocess

from engine_helpers import ENGINE_TESTS, subprocess_env, tiny_overrides, torchrun_command

BATCH_COUNT_SCRIPT = ENGINE_TESTS / "batch_count_script.py"
# Ranks of the job.
WORLD_SIZE = 2
# Wall-clock limit of the torchrun invocation (startup of two processes on a loaded machine).
RUN_TIMEOUT_S = 180


def _run_counting(tmp_path, batch_size: int, steps: int) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(
        tmp_path / "run", batch_size=batch_size, iterations=steps, eval_every=0, checkpoint_every=0, test_subset=20
    )
    command = torchrun_command(BATCH_COUNT_SCRIPT, overrides, tmp_path, ranks=WORLD_SIZE)
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_batch_size_is_split_evenly_over_the_ranks(tmp_path):
    batch_size, steps = 32, 3
    result = _run_counting(tmp_path, batch_size, steps)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [json.loads((tmp_path / f"batches_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert [c["world_size"] for c in counts] == [WORLD_SIZE] * WORLD_SIZE
    for count in counts:
        assert count["steps"] == list(range(1, steps + 1))
        assert count["images_per_step"] == [batch_size // WORLD_SIZE] * steps, count
    job_images_per_step = [sum(images) for images in zip(*(c["images_per_step"] for c in counts))]
    assert job_images_per_step == [batch_size] * steps


def test_batch_size_not_divisible_by_the_ranks_is_refused(tmp_path):
    result = _run_counting(tmp_path, batch_size=31, steps=1)
    assert result.returncode != 0
    assert "batch_size=31 must be divisible by the 2" in result.stderr
    assert not list(tmp_path.glob("batches_rank*.json"))
