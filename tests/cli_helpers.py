"""Helpers shared by tests that drive the command line in-process and compare run folders."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from sphereconv.cli.main import main

# Tiny training flags (width 1/16, 256 training and 128 test images of real Fashion-MNIST, CPU):
# enough to write checkpoints and summaries in a second or two.
TINY = [
    "--width-mult",
    "0.0625",
    "--train-subset",
    "256",
    "--test-subset",
    "128",
    "--batch-size",
    "16",
    "--device",
    "cpu",
    "--no-progress",
]


# Keys every metrics.jsonl record and every summary.json of a training run carries.
METRIC_KEYS = {
    "step",
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "seconds",
    "images_per_second",
}
SUMMARY_KEYS = {
    "final_test_acc",
    "best_test_acc",
    "best_step",
    "steps",
    "images_per_second",
    "model",
    "operator",
    "dataset",
    "loss",
    "seed",
    "seconds",
    "skipped_steps",
}


def run_cli(*argv) -> tuple[int, str, str]:
    """``sphereconv ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def folder_snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}
