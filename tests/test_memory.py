"""Freed memory kept for reuse: no page faults in a steady training-like loop, the user's opt-outs, and
the command line making the setting."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from sphereconv import _memory
from sphereconv.cli import main as cli_main

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="glibc's malloc only",
)

# Allocate, touch and free blocks of 4, 8 and 12 MiB as a training step does with its activations;
# prints the minor page faults per pass after two warm-up passes.
_LOOP = textwrap.dedent(
    """
    import resource, sys, torch
    from sphereconv._memory import keep_freed_memory
    print(keep_freed_memory())
    def passes(count):
        for _ in range(count):
            for i in range(6):
                x = torch.empty(2**20 * (1 + i % 3)).fill_(1.0)
                y = torch.empty(2**18).fill_(2.0)
                del x
    passes(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    passes(5)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """
)


def _run_loop(**env: str) -> tuple[str, float]:
    clean = {
        k: v for k, v in os.environ.items() if k not in (*_memory._GLIBC_MALLOC_ENV, _memory.KEEP_FREED_MEMORY_ENV)
    }
    result = subprocess.run(
        [sys.executable, "-c", _LOOP], env={**clean, **env}, capture_output=True, text=True, check=True, timeout=120
    )
    made, faults = result.stdout.split()
    return made, float(faults)


@glibc
def test_kept_memory_takes_no_page_faults_in_a_steady_loop():
    made, faults = _run_loop()
    assert made == "True"
    # with glibc's defaults this loop maps its blocks again at every pass (about 400 faults here)
    assert faults <= 2, faults


@glibc
@pytest.mark.parametrize(
    "env",
    [
        {"SPHERECONV_KEEP_FREED_MEMORY": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
    ids=["opt-out", "malloc-env", "tunables"],
)
def test_the_users_own_malloc_settings_are_left_alone(env):
    made, _ = _run_loop(**env)
    assert made == "False"


def test_the_command_line_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append(True))
    assert cli_main.main(["list-models"]) == 0
    assert calls == [True]
    assert "spherenet9" in capsys.readouterr().out
