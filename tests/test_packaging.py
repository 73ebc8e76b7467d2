"""The built wheel works on its own: installed into a fresh virtual environment outside the checkout,
its command line reproduces an experiment and finds the preset configs (package data) by name.

The fresh environment gets the dependencies (torch, numpy, ...) through a ``.pth`` file naming the
test environment's site-packages, so nothing is downloaded; ``sphereconv`` itself is imported from
the wheel's installation, which the test checks. The data is the real Fashion-MNIST the rest of
the suite uses, found in the same system folder.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from: the package sources and the files pyproject.toml names.
SOURCES = ("src", "pyproject.toml", "README.md", "LICENSE")
# Copy the sources without the editable install's metadata and caches.
IGNORED = shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc")

pytestmark = pytest.mark.slow  # builds a wheel and runs 13 tiny training runs (about a minute)


def run(argv: list[str | os.PathLike], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [os.fspath(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin`` folder of a fresh virtual environment holding the wheel built from this checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=IGNORED)
        else:
            shutil.copy2(ROOT / name, source / name)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            tmp / "dist",
            source,
        ],
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("sphereconv-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel], cwd=tmp)
    fresh_site = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    )
    # The dependencies come from this environment (appended to sys.path: the wheel's copy comes first).
    dependency_dirs = dict.fromkeys(
        [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    )
    (fresh_site / "test_dependencies.pth").write_text("\n".join(dependency_dirs) + "\n")
    return venv / "bin"


def test_the_installed_package_is_the_wheel(installed, tmp_path):
    code = (
        "import sphereconv, sphereconv.configs as c; "
        "print(sphereconv.__file__); print(c.preset_path('spherenet9_cifar10')); print(c.find_grid('quickstart'))"
    )
    package_file, preset, grid = run([installed / "python", "-c", code], cwd=tmp_path).stdout.split()
    assert Path(package_file).is_relative_to(installed.parent), package_file  # not the checkout's src/
    assert Path(preset).is_relative_to(installed.parent) and Path(preset).is_file()
    assert Path(grid).is_relative_to(installed.parent) and Path(grid).is_file()  # the quick start's grid
    # Every preset and grid of the checkout ships.
    shipped, checkout = Path(package_file).parent / "configs", ROOT / "src" / "sphereconv" / "configs"
    for pattern in ("*.yaml", "sweeps/*.yaml"):
        assert sorted(p.name for p in shipped.glob(pattern)) == sorted(p.name for p in checkout.glob(pattern)), pattern
    assert (Path(package_file).parent / "py.typed").is_file()
    # The C++ kernels' source ships as package data and builds from the installed copy.
    assert (Path(package_file).parent / "nn" / "csrc" / "cpu_kernels.cpp").is_file()
    kernels = "from sphereconv.nn import _cpu_kernels as k; print(k.load() is not None, k.load_error())"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    proc = subprocess.run([installed / "python", "-c", kernels], cwd=tmp_path, env=env, capture_output=True, text=True)
    if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
        assert proc.stdout.split()[0] == "True", proc.stdout + proc.stderr


def test_reproduce_runs_from_the_wheel(installed, tmp_path):
    out = tmp_path / "runs"
    proc = run(
        [
            installed / "sphereconv",
            "reproduce",
            "operators",
            "--scale",
            "smoke",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            out,
        ],
        cwd=tmp_path,
    )
    report = out / "operators" / "report.md"
    assert f"report: {report}" in proc.stdout
    assert "`operators`" in report.read_text().splitlines()[0]
    assert (out / "operators" / "results.json").is_file() and (out / "operators" / "test_acc.png").is_file()


def test_train_finds_a_preset_by_name_from_the_wheel(installed, tmp_path):
    proc = run([installed / "sphereconv", "train", "--config", "spherenet9_cifar10", "--dry-run"], cwd=tmp_path)
    assert "model: spherenet9" in proc.stdout and "dataset: cifar10" in proc.stdout
    assert "config is valid" in proc.stdout
    # The paper scale's base configs are presets too.
    proc = run([installed / "sphereconv", "reproduce", "operators", "--scale", "paper", "--dry-run"], cwd=tmp_path)
    assert "at scale 'paper'" in proc.stdout and "iterations=64000" in proc.stdout
