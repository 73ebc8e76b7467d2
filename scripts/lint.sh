#!/usr/bin/env bash
# Static checks, configured in pyproject.toml ([tool.ruff], [tool.mypy]): ruff's linter and
# formatter check over src/ and tests/, and mypy over the sphereconv package. All three run even if
# one fails; the exit code is non-zero on any finding. Installs the dev extra when a tool is missing.
#
#   bash scripts/lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/mypy ]; then
    bash scripts/setup_env.sh dev
fi

status=0
echo "lint: ruff check"
.venv/bin/ruff check src tests docs/_ext || status=1
echo "lint: ruff format --check"
.venv/bin/ruff format --check src tests docs/_ext || status=1
echo "lint: mypy"
.venv/bin/mypy || status=1
exit "$status"
