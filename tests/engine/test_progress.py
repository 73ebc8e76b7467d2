"""Run progress (engine/progress.py): step and evaluation bookkeeping, and the checkpoint form,
which stays the flat dictionary that checkpoints have always stored."""

from __future__ import annotations

import io

import pytest
import torch

from sphereconv.engine.progress import RunProgress, TrainingWindow
from sphereconv.engine.step import StepResult

# The progress dictionary as checkpoints store it (written by the trainer before RunProgress).
OLD_FORMAT = {
    "skipped_steps": 1,
    "consecutive_nonfinite": 0,
    "window_loss": 12.5,
    "window_correct": 20.0,
    "window_images": 32.0,
    "window_seconds": 0.75,
    "window_steps_images": 64.0,
    "seconds": 9.5,
    "train_seconds": 4.25,
    "images_seen": 384.0,
    "best_test_acc": 0.625,
    "best_step": 6,
    "last_eval": {"step": 6, "test_acc": 0.625, "test_loss": 1.1, "train_loss": 1.3, "train_acc": 0.5},
}


def _step(loss_sum=8.0, correct=3, images=4, skipped=False):
    return StepResult(loss_sum=loss_sum, correct=correct, images=images, skipped=skipped, stop_requested=False)


def test_steps_fill_the_window_and_skipped_steps_count_only_images_and_time():
    progress = RunProgress()
    progress.record_step(_step(), 0.5)
    progress.record_step(_step(loss_sum=float("nan"), correct=0, skipped=True), 0.5)
    window = progress.window
    assert (progress.skipped_steps, progress.consecutive_nonfinite) == (1, 1)
    assert window.train_loss == 2.0 and window.train_accuracy == 0.75 and window.images_per_second == 8.0
    assert progress.images_seen == 8.0 and progress.train_seconds == 1.0 and progress.images_per_second == 8.0
    progress.record_step(_step(), 0.5)
    assert progress.consecutive_nonfinite == 0 and progress.skipped_steps == 1
    assert TrainingWindow().train_loss is None and TrainingWindow().images_per_second is None


def test_evaluations_keep_the_best_and_open_a_new_window():
    progress = RunProgress()
    progress.record_step(_step(), 1.0)
    progress.record_evaluation({"step": 5, "test_acc": 0.5})
    progress.record_evaluation({"step": 10, "test_acc": 0.4})
    assert (progress.best_test_acc, progress.best_step) == (0.5, 5)
    assert progress.last_eval == {"step": 10, "test_acc": 0.4} and progress.window == TrainingWindow()


def test_clock_continues_the_seconds_of_a_resumed_run():
    progress = RunProgress(seconds=100.0)
    progress.tick()
    assert progress.seconds == 100.0  # no clock started: unchanged
    progress.start_clock()
    progress.tick()
    assert 100.0 <= progress.seconds < 110.0


def test_state_round_trips_through_a_weights_only_load():
    progress = RunProgress()
    progress.record_step(_step(), 0.25)
    progress.record_step(_step(skipped=True), 0.25)
    progress.record_evaluation({"step": 2, "test_acc": 0.75, "train_loss": None})
    progress.record_step(_step(loss_sum=2.0), 0.25)
    state = progress.to_state()
    assert set(state) == set(OLD_FORMAT)
    buffer = io.BytesIO()
    torch.save({"progress": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["progress"]
    assert RunProgress.from_state(loaded) == progress
    state["last_eval"]["test_acc"] = 0.0  # the state is a copy
    assert progress.last_eval["test_acc"] == 0.75


def test_old_format_progress_loads():
    progress = RunProgress.from_state(OLD_FORMAT)
    assert progress.skipped_steps == 1 and progress.best_step == 6 and progress.best_test_acc == 0.625
    assert progress.window == TrainingWindow(loss_sum=12.5, correct=20.0, images=32.0, seconds=0.75, all_images=64.0)
    assert progress.seconds == 9.5 and progress.images_seen == 384.0 and progress.last_eval["step"] == 6
    assert progress.to_state() == OLD_FORMAT


@pytest.mark.parametrize("state", [{}, {"skipped_steps": 2, "seconds": 3.0}])
def test_keys_missing_from_an_older_checkpoint_take_their_defaults(state):
    progress = RunProgress.from_state(state)
    assert progress.skipped_steps == state.get("skipped_steps", 0) and progress.seconds == state.get("seconds", 0.0)
    assert progress.best_test_acc is None and progress.window == TrainingWindow()
