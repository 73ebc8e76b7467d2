#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install sphereconv into it.
#
#   bash scripts/setup_env.sh [EXTRAS]     e.g. dev (tests, ruff, mypy), docs (mkdocs), or dev,docs
#
# Safe to re-run: an existing .venv is reused and pip only installs what is missing (so a re-run needs
# no network once everything is installed). A .venv without pip (half-created, or made by another tool)
# gets it; one that still cannot be used (no Python >= 3.10 with pip) is made afresh.
# Also installs Debian's Fashion-MNIST package (dataset-fashion-mnist) where apt exists and we are
# root (or have passwordless sudo); elsewhere the data is downloaded on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"
venv=".venv"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup: $python not found; install Python >= 3.10 (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
fi
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c "import pip" >/dev/null 2>&1; then
    echo "setup: installing pip into $venv"
    "$venv/bin/python" -m ensurepip >/dev/null 2>&1 || true
fi
if ! "$venv/bin/python" -c "import sys, pip; sys.exit(sys.version_info < (3, 10))" >/dev/null 2>&1; then
    if ! "$python" -c "import sys; sys.exit(sys.version_info < (3, 10))"; then
        echo "setup: $python is Python $("$python" -c 'import platform; print(platform.python_version())'); sphereconv needs >= 3.10 (choose one with PYTHON=python3.X)" >&2
        exit 1
    fi
    echo "setup: creating virtual environment in $venv"
    "$python" -m venv --clear "$venv" || {
        echo "setup: 'python3 -m venv' failed; on Debian install it with: apt-get install python3-venv" >&2
        exit 1
    }
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)

# PyTorch first. torch==2.13.0 is the release these machines keep on local disk (a CPU build); on
# other machines pip takes that release from PyPI, or any release >= 2.4 where it has no 2.13.0.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing PyTorch"
    "${pip[@]}" install "torch==2.13.0" 2>/dev/null || "${pip[@]}" install "torch>=2.4"
fi

echo "setup: installing sphereconv${extras:+[$extras]}"
# Built with the venv's setuptools (the build-system requirement in pyproject.toml) rather than in an
# isolated build environment, which pip would fill from the package index on every run.
"${pip[@]}" install "setuptools>=77"
if [ -n "$extras" ]; then
    "${pip[@]}" install --no-build-isolation -e ".[$extras]"
else
    "${pip[@]}" install --no-build-isolation -e .
fi

# Fashion-MNIST from Debian's package, where we can.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(false); fi
    fi
    if [ "${sudo[*]:-}" != "false" ]; then
        echo "setup: installing Debian package dataset-fashion-mnist"
        { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
            || echo "setup: apt-get could not install dataset-fashion-mnist; the data will be downloaded on first use" >&2
    else
        echo "setup: not root, skipping apt; the data will be downloaded on first use" >&2
    fi
fi
# Assigned first: a failing command substitution inside echo's arguments would not stop the script.
versions="$("$venv/bin/python" -c 'import torch, sphereconv; print("torch", torch.__version__, "sphereconv", sphereconv.__version__)')"
echo "setup: ready ($versions)"
