"""Helpers shared by the engine tests: small real-data configs and subprocess settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENGINE_TESTS = Path(__file__).resolve().parent
TRAIN_SCRIPT = ENGINE_TESTS / "train_script.py"
PYTHON = sys.executable


def tiny_overrides(out: Path, **extra) -> dict:
    """A SphereNet-9 at 1/16 width on 256 real Fashion-MNIST training and 200 test images."""
    values = dict(
        model="spherenet9",
        width_mult=0.0625,
        dataset="fashion-mnist",
        train_subset=256,
        test_subset=200,
        batch_size=32,
        iterations=12,
        eval_every=6,
        checkpoint_every=6,
        eval_batch_size=200,
        progress=False,
        out=str(out),
        device="cpu",
    )
    values.update(extra)
    return values


def subprocess_env() -> dict:
    """Environment of training subprocesses: one thread each, the package importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    src = str(ENGINE_TESTS.parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
