#!/usr/bin/env bash
# The main job: SphereNet-9 (cosine) against its CNN-9 baseline on Fashion-MNIST, 2 seeds each, in
# regime S of the pre-registered sweep (width 1/4, batch 128, crop+flip, 600 iterations, full 10k
# test set; the grid "quickstart" shipped in src/sphereconv/configs/sweeps/). About 13 minutes on 2
# CPU cores. The report gives the measured difference with its 95% interval and what the full sweep
# (docs/RESULTS.md) found so far.
#
#   bash scripts/quickstart.sh
#
# SPHERECONV_OUT=DIR puts the runs and the report in DIR (a relative DIR is taken from where the
# script is run; by default runs/quickstart in the repository). SPHERECONV_SCALE=smoke runs a
# one-minute version of the same job (used by the test suite).
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
out="${SPHERECONV_OUT:-runs/quickstart}"
if [ -n "${SPHERECONV_OUT:-}" ] && [ "${out#/}" = "$out" ]; then out="$caller/$out"; fi
scale=()
if [ -n "${SPHERECONV_SCALE:-}" ]; then scale=(--scale "$SPHERECONV_SCALE"); fi
# Prints the measured difference and the full sweep's findings in plain words, then the report's path.
# (${scale[@]+...}: bash before 4.4, as on macOS, calls an empty array unbound under set -u.)
.venv/bin/sphereconv reproduce --grid quickstart ${scale[@]+"${scale[@]}"} --download --out "$out"
