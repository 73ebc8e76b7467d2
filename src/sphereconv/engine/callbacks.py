"""Hooks into a training run: subclass :class:`Callback` and pass instances to :func:`~sphereconv.engine.train`.

The run follows Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, Sec. 5); callbacks observe it
(metrics, layer statistics) or inject faults in tests, and may replace a batch before its step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Hooks into :func:`train`; override any subset of the methods (all no-ops here).

    ``on_batch`` may return a replacement ``(images, labels)`` for the step about to run.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once the model, optimizer and data are ready (and state is resumed)."""

    def on_batch(self, step: int, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor] | None:
        """Called before step ``step`` (1-based) with its batch."""
        return None

    def on_step_end(self, step: int, info: dict[str, Any]) -> None:
        """Called after step ``step`` with ``loss``, ``skipped`` and ``lr``."""

    def on_evaluate(self, step: int, record: dict[str, Any]) -> None:
        """Called after each evaluation with the record written to ``metrics.jsonl``."""

    def on_checkpoint(self, step: int, path: Any) -> None:
        """Called after a checkpoint was written (rank 0) or would have been (other ranks: ``None``)."""

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Called with the summary when the run ends (completed or interrupted)."""


class PrintProgress(Callback):
    """Prints where a run stands, for a run without a progress bar (a log file): one line when
    training starts and one per evaluation, flushed at once, from the main process only."""

    def __init__(self) -> None:
        self._total = 0
        self._is_main = True

    def on_train_start(self, trainer: Trainer) -> None:
        self._total, self._is_main = trainer.total_steps, trainer.ctx.is_main
        if self._is_main:
            epochs = trainer.total_steps / trainer.steps_per_epoch
            resumed = f", resuming at step {trainer.step}" if trainer.step else ""
            print(f"training {trainer.total_steps} steps ({epochs:.4g} epochs){resumed}", flush=True)

    def on_evaluate(self, step: int, record: dict[str, Any]) -> None:
        if self._is_main:
            values = " ".join(
                f"{key} {record[key]:.4f}"
                for key in ("train_loss", "test_loss", "test_acc")
                if record.get(key) is not None
            )
            print(f"step {step}/{self._total}: {values}", flush=True)
