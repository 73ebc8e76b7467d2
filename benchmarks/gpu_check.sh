#!/usr/bin/env bash
# Checks and times the fused SphereConv on a CUDA machine, in about 3-5 minutes on one H100/H200:
#   1. the CPU-side tests of the fused path (tests/nn/test_fused.py, incl. Triton's interpreter);
#   2. benchmarks/gpu_check.py: Triton kernels on fp32/bf16/fp16 storage, fused vs reference in
#      fp32 (TF32 off), TF32, bf16 and fp16 autocast against a float64 truth, torch.compile, and
#      the peak memory of one layer;
#   3. sphereconv bench --device cuda --models --reference (layers and SphereNet-9 training steps).
# Usage: benchmarks/gpu_check.sh [OUTPUT_DIR]   (default: ./gpu_check_out; $OUT when set)
# Needs: python3 with torch (CUDA) and triton; the package is used from src/ (no install needed).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
status=0

echo "== environment" | tee "$out/gpu_check.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$out/gpu_check.log" || true
"$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    2>&1 | tee -a "$out/gpu_check.log"

echo "== 1. tests/nn/test_fused.py" | tee -a "$out/gpu_check.log"
timeout 180 "$python" -m pytest -q -p no:cacheprovider tests/nn/test_fused.py 2>&1 | tail -n 5 | tee -a "$out/gpu_check.log" \
    || status=1

echo "== 2. benchmarks/gpu_check.py" | tee -a "$out/gpu_check.log"
timeout 240 "$python" benchmarks/gpu_check.py 2>&1 | grep -v '^W[0-9]' | tee -a "$out/gpu_check.log" || status=1

echo "== 3. sphereconv bench --device cuda --models --reference" | tee -a "$out/gpu_check.log"
timeout 240 "$python" -m sphereconv.cli.main bench --device cuda --models --reference --json "$out/bench_cuda.json" \
    2>&1 | grep -v '^  timing' | tee -a "$out/gpu_check.log" || status=1

echo "== done (status $status); log and JSON in $out" | tee -a "$out/gpu_check.log"
exit $status
