"""The files of a training run directory and the TensorBoard log.

``sphereconv train --out DIR`` writes (rank 0 only):

- ``config.yaml``: the resolved :class:`~sphereconv.engine.config.TrainConfig`;
- ``metrics.jsonl``: one JSON object per evaluation (every ``eval_every`` steps and at the end),
  following the reference code's evaluation every 500 iterations (Liu et al. 2017, Sec. 5);
- ``summary.json``: final and best test accuracy and run facts, written when the run completes;
- ``checkpoints/``: see :mod:`.checkpoint`;
- ``tensorboard/``: event files when TensorBoard logging is on.

On resume the metrics file is cut back to the records up to the checkpoint's step (dropping any
record a killed run wrote after its last checkpoint, and a half-written last line), so the resumed
run's records continue it without gap or duplicate.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from .atomic import atomic_write_text
from .checkpoint import checkpoint_dir, list_checkpoints
from .config import TrainConfig, save_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"


def _json_value(value: Any) -> Any:
    # JSON has no NaN/Infinity: write them as null so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False)


class RunDirectory:
    """Reads and writes the files of one run directory (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, writable: bool = True) -> None:
        self.path = Path(out)
        self.writable = writable
        self._tensorboard = None

    @property
    def checkpoints(self) -> Path:
        """The checkpoint directory."""
        return checkpoint_dir(self.path)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    def holds_run(self) -> bool:
        """True when the directory already holds (part of) a training run."""
        return (self.metrics_path.exists() or self.summary_path.exists()
                or bool(list_checkpoints(self.checkpoints)))

    def check_fresh_start(self, config: TrainConfig) -> None:
        """Refuse to start a new run over an existing one unless ``overwrite`` is set."""
        if not config.resume and not config.overwrite and self.holds_run():
            raise ConfigError(
                f"out={str(self.path)!r} already holds a training run; pass resume (--resume) to continue it, "
                "overwrite (--overwrite) to replace it, or choose another out directory")

    def clear(self) -> None:
        """Delete the files of a previous run (checkpoints, metrics, summary, TensorBoard events)."""
        if not self.writable:
            return
        for _, path in list_checkpoints(self.checkpoints):
            path.unlink(missing_ok=True)
        self.metrics_path.unlink(missing_ok=True)
        self.summary_path.unlink(missing_ok=True)
        events = self.path / TENSORBOARD_DIR
        if events.is_dir():
            for entry in events.iterdir():
                if entry.is_file() and entry.name.startswith("events.out.tfevents"):
                    entry.unlink(missing_ok=True)

    def prepare(self, config: TrainConfig) -> None:
        """Create the directories and write ``config.yaml``."""
        if not self.writable:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        save_config(config, self.path / CONFIG_FILE)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only well-formed records with ``step <= last_step`` (atomically)."""
        if not self.writable or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl`` (skipping a half-written last line)."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one evaluation record (flushed and fsynced) and mirror it to TensorBoard."""
        if not self.writable:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(_dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._tensorboard is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        if not self.writable:
            return
        text = json.dumps({k: _json_value(v) for k, v in summary.items()}, indent=2, allow_nan=False) + "\n"
        atomic_write_text(self.summary_path, text)

    def open_tensorboard(self, start_step: int) -> None:
        """Start TensorBoard logging; events after ``start_step`` from a killed run are purged."""
        if not self.writable:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(log_dir=str(self.path / TENSORBOARD_DIR),
                                          purge_step=start_step + 1 if start_step > 0 else None)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
