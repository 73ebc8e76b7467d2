#!/usr/bin/env bash
# The main job: train a SphereNet-9 and its CNN-9 baseline on Fashion-MNIST, evaluate both, and
# write a markdown report with a convergence plot to runs/quickstart/convergence/.
#
#   bash scripts/quickstart.sh
#
# SPHERECONV_SCALE=smoke runs a one-minute version of the same job (used by the test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
scale="${SPHERECONV_SCALE:-quick}"
out="${SPHERECONV_OUT:-runs/quickstart}"
.venv/bin/sphereconv reproduce convergence --scale "$scale" --dataset fashion-mnist --download --out "$out"
echo "report: $out/convergence/report.md"
