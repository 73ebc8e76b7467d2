"""Helpers shared by the engine tests: small real-data configs and subprocess settings."""

from __future__ import annotations

import json
import os
import socket
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


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: Path, overrides: dict, *arguments, ranks: int = 2) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) of ``script`` on ``ranks`` local processes,
    with the config ``overrides`` as JSON and ``arguments`` after it; no restarts."""
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--max_restarts",
        "0",
        str(script),
        json.dumps(overrides),
        *map(str, arguments),
    ]
