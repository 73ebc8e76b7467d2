#!/usr/bin/env bash
# The full-width reference recipe on Fashion-MNIST on one CUDA GPU, in at most ~8 minutes on an
# H100/H200: CNN-9, SphereNet-9 cosine and SphereNet-9 sigmoid (k=0.3), full width (128/192/256),
# Adam 1e-3 with the reference step decay (lr / 10 at 34/64 and 54/64), batch 128, pad-4 crop +
# flip, 10 epochs (4688 iterations), evaluated on the full 10k test set every 500 iterations
# (configs/sweeps/gpu_reference.yaml). Runs go seed by seed (cnn, cosine, sigmoid for seed 0, then
# seed 1, ...); at the time limit the run in progress is checkpointed and stopped, and the report
# covers every finished run. Running the script again with the same OUTPUT_DIR continues.
#
# Writes OUTPUT_DIR/gpu_reference/{report.md, test_acc_F10.png, runs/*.json} (the table and curves
# for docs/RESULTS.md), OUTPUT_DIR/gpu_reference/train/ (run folders, checkpoints) and
# OUTPUT_DIR/gpu_recipe.log.
#
# Usage: benchmarks/gpu_recipe.sh [OUTPUT_DIR]   (default: $OUT, else ./gpu_recipe_out)
#        TIME_LIMIT=seconds (default 400) caps the training; DATA_DIR=folder holding Fashion-MNIST's
#        four IDX .gz files, where the usual places (e.g. /usr/share/datasets/fashion-mnist) lack
#        them; SPHERECONV_SCALE=smoke runs a few iterations per model instead (a check of the
#        script on any machine, CPU included).
# Needs: python3 with torch (CUDA), PyYAML and matplotlib; the package is used from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_recipe_out}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
log="$out/gpu_recipe.log"
scale=()
device=cuda
if [ -n "${SPHERECONV_SCALE:-}" ]; then scale=(--scale "$SPHERECONV_SCALE"); device=auto; fi
data=()
if [ -n "${DATA_DIR:-}" ]; then data=(--data-dir "$DATA_DIR"); fi

{
  echo "== environment ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$log"

echo "== training (time limit ${TIME_LIMIT:-400} s)" | tee -a "$log"
status=0
# SIGTERM at the limit: the engine finishes its step, writes a checkpoint and stops; the report
# is rewritten from the finished runs either way.
timeout --signal=TERM --kill-after=30 "${TIME_LIMIT:-400}" \
  "$python" -m sphereconv.cli.main reproduce --grid configs/sweeps/gpu_reference.yaml "${scale[@]}" "${data[@]}" \
    --device "$device" --no-progress --out "$out" --results "$out/gpu_reference" 2>&1 | tee -a "$log" || status=$?
echo "== done (status $status; 124 = time limit reached, finished runs are in the report)" | tee -a "$log"
ls "$out/gpu_reference/runs" 2>/dev/null | tee -a "$log" || true
echo "report: $out/gpu_reference/report.md" | tee -a "$log"
if [ "$status" -eq 124 ] && ls "$out/gpu_reference/runs"/*.json >/dev/null 2>&1; then exit 0; fi
exit "$status"
