"""The user guide's examples run as written.

Every ```python block of a page in docs/guide/ is executed, in order and in one namespace per page
(a later block may use what an earlier one built), from an empty working directory. The examples
are sized to take seconds on a CPU. Those that train need Fashion-MNIST, which scripts/setup_env.sh
installs (Debian's dataset-fashion-mnist); where it cannot be found the page is skipped, not failed.

Every ```yaml block is a training config that must load. The ``sphereconv train`` (but ``--resume``,
which needs a run) and ``sphereconv reproduce EXPERIMENT`` commands of the ```bash blocks are run
with ``--dry-run``: they must be accepted as written.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cli_helpers import run_cli
from sphereconv.engine import load_config
from sphereconv.errors import DatasetError

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)
PAGES = sorted(GUIDE.glob("*.md"))


def blocks(page: Path, lang: str) -> list[str]:
    return [m["body"] for m in FENCE.finditer(page.read_text(encoding="utf-8")) if m["lang"] == lang]


def guide_commands(subcommand: str) -> list[list[str]]:
    """The guide's ``sphereconv SUBCOMMAND ...`` lines, split into words, comments removed."""
    commands = []
    for page in PAGES:
        for body in blocks(page, "bash"):
            for line in body.splitlines():
                words = shlex.split(line, comments=True)
                if words[:2] == ["sphereconv", subcommand]:
                    commands.append(words[1:])
    return commands


def test_the_guide_has_examples():
    assert {page.name for page in PAGES} >= {"layers.md", "converting.md", "losses.md", "training.md"}
    assert all(blocks(page, "python") for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"guide_{page.stem}"}
    for number, source in enumerate(blocks(page, "python"), start=1):
        code = compile(source, f"{page.name} (python block {number})", "exec")
        try:
            exec(code, namespace)
        except DatasetError as error:
            pytest.skip(f"{page.name} block {number} needs a dataset that is not installed: {error}")


@pytest.mark.parametrize("page", [page for page in PAGES if blocks(page, "yaml")], ids=lambda page: page.name)
def test_yaml_configs_load(page, tmp_path):
    for number, source in enumerate(blocks(page, "yaml"), start=1):
        path = tmp_path / f"{page.stem}_{number}.yaml"
        path.write_text(source, encoding="utf-8")
        load_config(path)


@pytest.mark.parametrize("argv", [c for c in guide_commands("train") if "--resume" not in c], ids=shlex.join)
def test_train_commands_are_accepted(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(*argv, "--dry-run")
    assert code == 0, stderr


@pytest.mark.parametrize("argv", [c for c in guide_commands("reproduce") if "--grid" not in c], ids=shlex.join)
def test_reproduce_commands_are_accepted(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(*(a for a in argv if a != "--dry-run"), "--dry-run")
    assert code == 0, stderr
