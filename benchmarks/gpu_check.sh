#!/usr/bin/env bash
# One prepared GPU check: install, per-config kernel table, GPU tests, benchmarks; results in OUTDIR.
#   bash benchmarks/gpu_check.sh OUTDIR
# For a machine with a CUDA GPU and no network, torch and triton already installed (torch 2.11 +
# triton 3.6 work). Installs albef_fast without dependencies or build isolation: the Python part
# first (seconds), the C++/CUDA extension in the background while the Triton table runs.
# Each stage has its own time limit (545 s together: run with timeout_s >= 580). GPU_CHECK_SMOKE=1
# runs the same steps on the CPU at tiny shapes (to test the script).
# OUTDIR receives device.txt install.log tests.txt (+ tests/pytest_<k>.log) bench.txt,
# itc_<gpu>.csv, itc_<gpu>_sweep.png, triton_configs_<gpu>.csv.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
NAME=gpu_check
source "$(dirname "$0")/gpu_common.sh"
SMOKE=${GPU_CHECK_SMOKE:-0}
TUNED=${TMPDIR:-/tmp}/albef_fast_tuned.json

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  DEV=(--device cpu --queue 256 --dim 32 --reps 2)
  TABLE=(--device cpu --queue 256 --dim 32 --batch 8 --precision tf32 --jobs 0 --waves 1
         --configs "16,16,16,0,0,1;16,16,32,1,1,1")
  SWEEP=(--batch 8,16); PREC=fp32
  TESTS=(--workers 2 tests/test_triton.py -k "fp32 and 5-37-24 or details")
else
  DEV=(--device cuda)
  TABLE=(--batch 64,512 --precision bf16,f16s,tf32,fp32 --jobs 16)  # saved after each block: bf16 first
  SWEEP=(--sweep); PREC=fp32,tf32,bf16
  # the GPU tests (ITC paths, state ops, CUDA graph capture, torch.compile) in 14 processes: a
  # single one ran out of its stage compiling kernel variants in run 4
  TESTS=(--workers 14 tests/test_cuda_state.py tests/test_triton.py tests/test_itc_loss.py tests/test_ops.py)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi

# per-test limits where pytest-timeout is installed, so that one slow test cannot eat its stage
$PY -c "import pytest_timeout" 2>/dev/null && TESTS=(--timeout 90 "${TESTS[@]}")

stamp "device"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

install_package 60
stamp "install: the extension, in the background"
(MAX_JOBS=6 stage 200 $PY setup.py build_ext --inplace >> "$OUT/install.log" 2>&1; echo "build_ext rc=$?" >> "$OUT/install.log") &
BUILD=$!

stamp "Triton config table: every candidate config, B x precision, vs eager and fp64"
ALBEF_FAST_DISABLE_EXTENSION=1 stage 200 $PY benchmarks/triton_configs.py --out "$OUT" "${TABLE[@]}" --tuned "$TUNED" \
  2>&1 | tee "$OUT/bench.txt"
[ -s "$TUNED" ] && export ALBEF_FAST_TUNED="$TUNED"   # the measured configs serve everything below

stamp "waiting for the extension build"; wait $BUILD; tail -2 "$OUT/install.log"
$PY -c "from albef_fast import _extension; print('extension', _extension.build_info())" 2>&1 | tee -a "$OUT/device.txt"

stamp "tests: the GPU tests in parallel workers (tuned configs; logs in $OUT/tests)"
stage 130 $PY benchmarks/pytest_parallel.py --deadline 120 --log-dir "$OUT/tests" "${TESTS[@]}" 2>&1 \
  | tee "$OUT/tests.txt" | tail -40

stamp "benchmark: ITC, eager vs albef_fast, sweep x precisions x modes"
stage 60 $PY -m albef_fast.bench "${DEV[@]}" "${SWEEP[@]}" --precision "$PREC" --mode fwd,fwd+bwd \
  --providers eager,albef_fast --out "$OUT" --tag sweep 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"

stamp "profile: device time per kernel and host time per step (tuned configs)"
[ "$SMOKE" = 1 ] || stage 30 $PY benchmarks/profile_step.py --host-profile 2>&1 | tee -a "$OUT/bench.txt"

stamp "benchmark: EMA and enqueue"
stage 20 $PY -m albef_fast.bench "${DEV[@]}" --suite ema,enqueue --out "$OUT" 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"

stamp "benchmark: torch.compile(reference) at B=64 and 512 (compiles are slow: last)"
stage 45 $PY -m albef_fast.bench "${DEV[@]}" --batch 64,512 --precision fp32,bf16 --mode fwd+bwd \
  --providers eager,compile,albef_fast --out "$OUT" --no-plot 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
stamp "done"
