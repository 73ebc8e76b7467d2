#!/usr/bin/env bash
# Run the whole test suite from scratch: sets up .venv with the dev extras, then runs pytest.
#
#   bash scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
# One BLAS thread per process: the suite runs two pytest workers (and torchrun spawns two ranks).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --timeout 900 "$@"
