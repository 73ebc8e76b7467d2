"""The README's quick start, run exactly as written (the main job at smoke scale)."""

from __future__ import annotations

import os
import re
import subprocess
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


@pytest.mark.slow
def test_main_job_runs_as_written_at_smoke_scale(tmp_path):
    main_job = _quick_start_commands()[0]
    env = dict(os.environ, SPHERECONV_SCALE="smoke", SPHERECONV_OUT=str(tmp_path / "quickstart"))
    proc = subprocess.run(main_job, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
