"""Where a run stands: counters a resumed run continues, and the progress bar that shows them.

The run is measured as in Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, Sec. 5): test
accuracy every ``eval_every`` optimizer steps, the best and the final one reported. Between two
evaluations a :class:`TrainingWindow` totals the training loss, accuracy and throughput that the
next metrics record reports. :class:`RunProgress` is saved in every checkpoint as plain Python
numbers (``weights_only``-loadable) under the flat keys that checkpoints have always used.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tqdm.auto import tqdm

from .step import StepResult

# Steps between refreshes of the progress bar's loss / accuracy / images-per-second.
PROGRESS_REFRESH_STEPS = 10
# Checkpoint keys of the TrainingWindow fields (the checkpoint stores progress flat).
_WINDOW_KEYS = {
    "loss_sum": "window_loss",
    "correct": "window_correct",
    "images": "window_images",
    "seconds": "window_seconds",
    "all_images": "window_steps_images",
}


@dataclass
class TrainingWindow:
    """Training totals since the last evaluation."""

    loss_sum: float = 0.0
    """Sum of loss times images over the steps that were not skipped."""
    correct: float = 0.0
    """Correct training predictions of those steps."""
    images: float = 0.0
    """Images of those steps."""
    seconds: float = 0.0
    """Time spent in training steps (evaluation excluded)."""
    all_images: float = 0.0
    """Images of all steps, skipped ones included (for the throughput)."""

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.images if self.images else None

    @property
    def train_accuracy(self) -> float | None:
        return self.correct / self.images if self.images else None

    @property
    def images_per_second(self) -> float | None:
        return self.all_images / self.seconds if self.seconds > 0 else None


@dataclass
class RunProgress:
    """Counters of a run that a resume continues (the step itself is the checkpoint's ``step``)."""

    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient, in total."""
    consecutive_nonfinite: int = 0
    """Length of the current run of skipped steps."""
    window: TrainingWindow = field(default_factory=TrainingWindow)
    seconds: float = 0.0
    """Wall time of the run so far, over all its resumed parts."""
    train_seconds: float = 0.0
    """Time in training steps so far."""
    images_seen: float = 0.0
    """Images of all steps so far."""
    best_test_acc: float | None = None
    best_step: int | None = None
    last_eval: dict[str, Any] | None = None
    """The latest metrics record."""
    _clock: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)

    def start_clock(self) -> None:
        """Count wall time from now on, on top of the seconds already recorded."""
        self._clock = (time.perf_counter(), self.seconds)

    def tick(self) -> None:
        """Bring :attr:`seconds` up to now (after :meth:`start_clock`)."""
        if self._clock is not None:
            started, before = self._clock
            self.seconds = before + time.perf_counter() - started

    def record_step(self, result: StepResult, seconds: float) -> None:
        """Add one step that took ``seconds``; a skipped one counts images and time but no loss."""
        window = self.window
        self.train_seconds += seconds
        window.seconds += seconds
        self.images_seen += result.images
        window.all_images += result.images
        if result.skipped:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        else:
            self.consecutive_nonfinite = 0
            window.loss_sum += result.loss_sum
            window.correct += result.correct
            window.images += result.images
        self.tick()

    def record_evaluation(self, record: dict[str, Any]) -> None:
        """Keep ``record`` (with ``step`` and ``test_acc``) as the latest, update the best, open a new window."""
        if self.best_test_acc is None or record["test_acc"] > self.best_test_acc:
            self.best_test_acc, self.best_step = record["test_acc"], record["step"]
        self.last_eval = record
        self.window = TrainingWindow()

    @property
    def images_per_second(self) -> float | None:
        """Training throughput of the whole run."""
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else None

    def to_state(self) -> dict[str, Any]:
        """Plain-data form for a checkpoint (flat keys, as checkpoints have always stored them)."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("window", "_clock")}
        state.update({key: getattr(self.window, name) for name, key in _WINDOW_KEYS.items()})
        state["last_eval"] = copy.deepcopy(self.last_eval)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RunProgress:
        """Inverse of :meth:`to_state`; keys missing from an older checkpoint keep their defaults."""
        window = TrainingWindow(**{name: float(state[key]) for name, key in _WINDOW_KEYS.items() if key in state})
        names = [f.name for f in fields(cls) if f.name not in ("window", "_clock")]
        values = {name: copy.deepcopy(state[name]) for name in names if name in state}
        return cls(window=window, **values)


class ProgressBar:
    """A tqdm bar over the run's steps showing the window's loss, accuracy and images per second."""

    def __init__(self, total: int, initial: int, enabled: bool, description: str) -> None:
        self._bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc=description
        )

    @property
    def enabled(self) -> bool:
        return not self._bar.disable

    def advance(self, step: int, total: int, window: TrainingWindow) -> None:
        """Count one step; refresh the figures every :data:`PROGRESS_REFRESH_STEPS` and at the end."""
        if not self.enabled:
            return
        self._bar.update(1)
        if step % PROGRESS_REFRESH_STEPS == 0 or step == total:
            postfix = {}
            if window.images:
                postfix["loss"] = f"{window.train_loss:.4f}"
                postfix["acc"] = f"{window.train_accuracy:.3f}"
            if window.seconds > 0:
                postfix["img/s"] = f"{window.images_per_second:.0f}"
            self._bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        """Print ``text`` above the bar (only when the bar is shown)."""
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
