#!/usr/bin/env bash
# Everything the fused SphereConv needs checked and timed on a CUDA machine, in one go, in at most
# 8 minutes on one H100/H200 (a global deadline caps every step's timeout):
#   1. sphereconv selftest --device cuda (every operator and layer, every dtype, vs the reference);
#   2. sphereconv bench --device cuda --models in fp32 (with --reference) and in bf16, peak memory;
#   3. a 2-epoch SphereNet-9 (cosine) vs CNN-9 training run on Fashion-MNIST at full width,
#      batch 128, and a summary of accuracy, images/s and their ratio;
#   4. the tests that skip on a CPU or are about the GPU path (CUDA, Triton, the first-use self-check);
#   5. benchmarks/gpu_check.py (Triton kernels vs ATen, TF32/bf16/fp16 vs a float64 truth,
#      torch.compile, peak memory of one layer).
# Every step writes its log under $OUT; summary.txt lists each step's status and seconds.
#
# Usage: benchmarks/gpu_check.sh [--dry-run]
#   OUT        output folder (default: ./gpu_check_out)
#   PYTHON     interpreter with torch (CUDA) and triton (default: .venv/bin/python if its torch sees a GPU,
#              else python3);
#              the package is used from src/, no install needed
#   DATA_DIR   folder holding Fashion-MNIST's IDX files (default: shared/fashion-mnist if present,
#              else the package's own search, which includes /usr/share/datasets/fashion-mnist)
#   --dry-run  the same steps on the CPU at toy sizes, to check the script itself without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        *) echo "usage: benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
    esac
done

out="${OUT:-gpu_check_out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then  # the project's venv if its torch can run here (a CPU build cannot on a GPU)
    PYTHON=python3
    if [[ -x .venv/bin/python ]] && { ((dry_run)) || .venv/bin/python -c \
            "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }; then
        PYTHON=.venv/bin/python
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
sc=("$PYTHON" -m sphereconv.cli.main)
data_args=()
if [[ -z "${DATA_DIR:-}" && -d shared/fashion-mnist ]]; then DATA_DIR="$PWD/shared/fashion-mnist"; fi
if [[ -n "${DATA_DIR:-}" ]]; then data_args=(--data-dir "$DATA_DIR"); fi

# The whole script must end within 8 minutes: each step gets at most what is left of it.
TOTAL_BUDGET_S=470
start_s=$SECONDS
status=0
summary="$out/summary.txt"
: > "$summary"

# step NAME TIMEOUT_S COMMAND...: run COMMAND with its output in $out/NAME.log, record status and time.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((TOTAL_BUDGET_S - (SECONDS - start_s)))
    if ((left < 10)); then
        echo "$name: SKIPPED (8-minute budget spent)" | tee -a "$summary"
        status=1
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (timeout ${limit}s): $*" | tee "$out/$name.log"
    local t0=$SECONDS rc=0
    # SIGTERM at the limit, SIGKILL 5 s later: a step that traps SIGTERM (training checkpoints on it)
    # or is stuck inside a CUDA call cannot outlive the deadline.
    timeout --kill-after=5 "$limit" "$@" >> "$out/$name.log" 2>&1 || rc=$?
    tail -n 25 "$out/$name.log"
    local verdict="ok"
    # 124: stopped by SIGTERM at the limit; 137 after the limit: killed by the SIGKILL that followed
    if ((rc == 124 || (rc == 137 && SECONDS - t0 >= limit))); then
        verdict="TIMEOUT"
    elif ((rc != 0)); then
        verdict="FAILED (exit $rc)"
    fi
    ((rc != 0)) && status=1
    echo "$name: $verdict in $((SECONDS - t0)) s" | tee -a "$summary"
}

if ((dry_run)); then
    device=cpu
    bench_fp32=(--shape 2x8x8x8 --models --model-batch 4 --model-width-mult 0.0625 --repeats 1 --warmup 0)
    bench_bf16=("${bench_fp32[@]}")
    train_size=(--width-mult 0.0625 --iterations 4 --batch-size 16 --train-subset 256 --test-subset 128)
    pytest_mode=(--collect-only -q)
else
    device=cuda
    bench_fp32=(--models --reference)
    bench_bf16=(--models)
    train_size=(--width-mult 1 --epochs 2 --batch-size 128)
    pytest_mode=(-q -rs)
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  dry_run: $dry_run  device: $device"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton: not installed"
    git rev-parse HEAD 2>/dev/null || echo "git: not a checkout"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

# 1. The installation check (exit code 1 on any failed case).
step selftest 150 "${sc[@]}" selftest --device "$device"

# 2. Layer and training-step timings with peak memory, fp32 (TF32 as torch's default) and bf16.
step bench_fp32 100 "${sc[@]}" bench --device "$device" --dtypes fp32 "${bench_fp32[@]}" --json "$out/bench_fp32.json"
step bench_bf16 80 "${sc[@]}" bench --device "$device" --dtypes bf16 "${bench_bf16[@]}" --json "$out/bench_bf16.json"

# 3. SphereNet-9 (cosine) vs CNN-9 on Fashion-MNIST, same seed and recipe (Adam 1e-3, batch 128).
for operator in cosine none; do
    step "train_$operator" 75 "${sc[@]}" train --model spherenet9 --operator "$operator" --dataset fashion-mnist \
        "${data_args[@]}" "${train_size[@]}" --optimizer adam --lr 1e-3 --schedule constant --device "$device" \
        --seed 0 --no-progress --overwrite --out "$out/train_$operator"
done
"$PYTHON" - "$out" <<'EOF' | tee "$out/train_summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for operator in ("cosine", "none"):
    path = out / f"train_{operator}" / "summary.json"
    if path.exists():
        runs[operator] = json.loads(path.read_text())
for operator, s in runs.items():
    print(f"{operator:7s} test acc {s['final_test_acc']:.4f}  train loss {s['final_train_loss']:.4f}  "
          f"{s['images_per_second']:.0f} images/s  {s['steps']} steps  {s['train_seconds']:.1f} s  ({s['device']})")
if len(runs) == 2:
    ratio = runs["cosine"]["images_per_second"] / runs["none"]["images_per_second"]
    print(f"SphereNet-9 / CNN-9 images/s: {ratio:.2f}x (target >= 0.85x)")
else:
    print("training summary incomplete: see train_cosine.log and train_none.log")
EOF

# 4. Tests that skip without a GPU or are about it (CUDA, Triton, the first-use self-check).
xdist=()
if "$PYTHON" -c "import xdist" 2>/dev/null && ((!dry_run)); then xdist=(-n 4); fi
step pytest_cuda 120 "$PYTHON" -m pytest "${pytest_mode[@]}" "${xdist[@]}" -p no:cacheprovider tests \
    -k "cuda or triton or gpu or selfcheck or self_check" --junitxml "$out/pytest_cuda.xml"

# 5. Kernel-level checks (needs a GPU; its CPU variant needs Triton's interpreter).
if ((!dry_run)); then
    step gpu_check_py 90 "$PYTHON" benchmarks/gpu_check.py
else  # Triton's interpreter takes several minutes for these checks on a CPU
    echo "gpu_check_py: SKIPPED (dry run; on a CPU: TRITON_INTERPRET=1 $PYTHON benchmarks/gpu_check.py --cpu-interpret)" \
        | tee -a "$summary"
fi

echo "== done in $((SECONDS - start_s)) s, status $status; everything is in $out" | tee -a "$summary"
exit $status
