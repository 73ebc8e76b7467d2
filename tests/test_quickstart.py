"""The README's quick start, run exactly as written (the main job at smoke scale), and the set-up script it runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    assert block, "README's quick start has no code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    main_job, test_command = commands
    assert "quickstart" in main_job
    assert test_command in (ROOT / ".ci" / "run").read_text()


def _setup_in_a_copy(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """Run scripts/setup_env.sh from a copy in ``tmp_path`` (it works in its own folder), with no package index."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "setup_env.sh", tmp_path / "scripts")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {**variables, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}
    script = str(tmp_path / "scripts" / "setup_env.sh")
    return subprocess.run(["bash", script], cwd="/", env=env, capture_output=True, text=True, timeout=300)


def test_setup_refuses_a_python_older_than_3_10_before_making_a_venv(tmp_path):
    old_python = tmp_path / "python3.9"
    old_python.write_text(
        "#!/bin/sh\n"
        '[ "$1" = -c ] && exec "$REAL_PYTHON" -c "import sys, platform; sys.version_info = (3, 9, 18); '
        'platform.python_version = lambda: \'3.9.18\'; exec(sys.argv[1])" "$2"\n'
        'exec "$REAL_PYTHON" "$@"\n'
    )
    old_python.chmod(0o755)
    proc = _setup_in_a_copy(tmp_path, PYTHON=str(old_python), REAL_PYTHON=sys.executable)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is Python 3.9.18; sphereconv needs >= 3.10" in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_completes_a_half_created_venv_and_fails_when_pip_does(tmp_path):
    # What an interrupted `python3 -m venv`, or one run before python3-venv was installed, leaves.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / ".venv"], check=True)
    proc = _setup_in_a_copy(tmp_path, PYTHON=sys.executable)
    assert "setup: installing pip into .venv" in proc.stdout
    assert subprocess.run([tmp_path / ".venv" / "bin" / "python", "-c", "import pip"]).returncode == 0
    # With no package index PyTorch cannot be installed: the script stops there with pip's status.
    assert proc.returncode != 0 and "setup: ready" not in proc.stdout, proc.stdout + proc.stderr
    assert "setup: installing sphereconv" not in proc.stdout


@pytest.mark.slow
def test_main_job_runs_as_written_at_smoke_scale(tmp_path):
    # Run from another folder with a relative SPHERECONV_OUT: the output lands where the user stands.
    main_job = _quick_start_commands()[0].replace("scripts/", f"{ROOT}/scripts/")
    env = dict(os.environ, SPHERECONV_SCALE="smoke", SPHERECONV_OUT="quickstart")
    proc = subprocess.run(main_job, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report_dir = tmp_path / "quickstart" / "quickstart"
    report = (report_dir / "report.md").read_text()
    assert f"report: {tmp_path / 'quickstart' / 'quickstart' / 'report.md'}" in proc.stdout
    # The main job's answer at a glance: the paired difference with its interval, both seeds ...
    row = next(line for line in report.splitlines() if line.startswith("| `S` | cosine vs cnn |"))
    assert "| 2 |" in row and re.search(r"\[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", row), row
    # ... and what the committed full sweep has found, with a link to the results page.
    assert "What the full sweep" in report and "docs/RESULTS.md" in report
    # The same in plain words, at the top of the report and on the terminal.
    assert "- In regime `S`, SphereNet-9 cosine ended " in report.split("## Verdicts")[0]
    assert "In regime `S`, SphereNet-9 cosine ended " in proc.stdout and "these numbers mean nothing" in proc.stdout
    pngs = list(report_dir.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_readme_python_api_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    namespace["loss"].backward()
    assert namespace["loss"].ndim == 0 and bool(namespace["loss"].isfinite())
    from sphereconv.nn import SphereConv2d

    assert any(isinstance(m, SphereConv2d) for m in namespace["resnet"].modules())
