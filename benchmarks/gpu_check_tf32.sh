#!/usr/bin/env bash
# fp16 products of power-of-two-scaled operands on a GPU: TF32-class (ALBEF_FAST_TF32=f16s, the
# default for "high"; f16p: the operands converted by a kernel of their own first, experimental)
# and fp32-class (ALBEF_FAST_FP32_DOT=f16x3: 3 products of (hi, lo) pairs, "highest" on the
# Triton path; f16x3p: the pairs converted first); the GPU tests in parallel; the fp32 default.
#   bash benchmarks/gpu_check_tf32.sh OUTDIR          (run with timeout_s >= 540)
# Stages (each with its own limit, 520 s together): install (Python part only: the C++ extension
# is not needed), per-config table for f16p, f16x3p, f16s and f16x3 at B = 64, 512 (writes the
# fastest correct configs as JSON, merged into TUNED for the stages after it; the CSV is saved
# after each block, the new modes first), the CUDA tests of the ITC paths and the state ops in
# parallel workers (benchmarks/pytest_parallel.py; logs in OUTDIR/tests), the ITC benchmark (fp32
# on the torch backend; tf32 with f16s, then f16p; fp32 with f16x3p on the Triton path). TF32
# products were timed against f16s in run 6 (1.70 vs 1.05 ms at B = 512) and the host floor in
# run 5: not again.
# GPU_CHECK_SMOKE=1: the same steps on the CPU.
set -uo pipefail
OUT=${1:?usage: gpu_check_tf32.sh OUTDIR}
NAME=gpu_check_tf32
source "$(dirname "$0")/gpu_common.sh"
export ALBEF_FAST_DISABLE_EXTENSION=1
TUNED=${TMPDIR:-/tmp}/albef_fast_tuned_tf32.json

# f16s's tuned configs and 0-spill leads, bf16's tuned ones (what f16p's split kernel resembles)
CONFIGS="128,32,256,1,0,8,5,0,1;128,32,256,1,0,8,4;64,32,256,1,0,4,3;64,32,256,1,0,4,4"
CONFIGS+=";64,32,256,1,0,8,3,0,1;64,16,256,1,0,8,4,0,1"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  TABLE=(--device cpu --queue 256 --dim 32 --batch 8 --jobs 0 --configs "16,16,32,1,1,1" --precision f16p,f16x3p)
  TESTS=(--workers 2 tests/test_triton.py -k "f16")
  BENCH=(--device cpu --queue 256 --dim 32 --batch 8 --reps 2)
else
  TABLE=(--batch 64,512 --jobs 16 --configs "$CONFIGS" --precision f16p,f16x3p,f16s,f16x3)
  # every test of the ITC paths on the GPU: compiles dominate, so 14 processes share the card
  TESTS=(--workers 14 tests/test_triton.py tests/test_itc_loss.py tests/test_ops.py tests/test_cuda_state.py)
  BENCH=(--device cuda --batch 64,512)
fi
$PY -c "import pytest_timeout" 2>/dev/null && TESTS=(--timeout 90 "${TESTS[@]}")

stamp "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

install_package 60

stamp "per-config table: f16p, f16x3p (operands converted first), f16s, f16x3, vs eager and fp64"
stage 200 $PY benchmarks/triton_configs.py --out "$OUT" "${TABLE[@]}" --waves 4 --tuned "$TUNED" \
  2>&1 | tee "$OUT/bench.txt"
if [ -s "$TUNED" ]; then  # the measured f16s / f16x3 entries over the package's TUNED
  $PY -c "import json, sys; from albef_fast.kernels import itc_configs as c; t = dict(c.TUNED); t.update(json.load(open(sys.argv[1]))); json.dump(t, open(sys.argv[1], 'w'))" "$TUNED"
  export ALBEF_FAST_TUNED="$TUNED"; stamp "TUNED now: $(cat "$TUNED")"
fi

stamp "tests: the ITC paths and state ops on CUDA, in parallel (tuned configs; logs in $OUT/tests)"
stage 110 $PY benchmarks/pytest_parallel.py --deadline 100 --log-dir "$OUT/tests" "${TESTS[@]}" 2>&1 \
  | tee "$OUT/tests.txt" | tail -40

stamp "benchmark: fp32 on the torch backend (the default), tf32 (f16s, the default; f16p), fp32 with f16x3p"
stage 35 $PY -m albef_fast.bench "${BENCH[@]}" --precision fp32 --mode fwd+bwd \
  --providers eager,albef_fast --out "$OUT" --no-plot --tag torch 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
stage 35 $PY -m albef_fast.bench "${BENCH[@]}" --precision tf32 --mode fwd+bwd \
  --providers eager,albef_fast --out "$OUT" --no-plot --tag f16s 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
ALBEF_FAST_TF32=f16p stage 35 $PY -m albef_fast.bench "${BENCH[@]}" --precision tf32 --mode fwd+bwd \
  --providers eager,albef_fast --out "$OUT" --no-plot --tag f16p 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
ALBEF_FAST_BACKEND=triton ALBEF_FAST_FP32_DOT=f16x3p stage 45 $PY -m albef_fast.bench "${BENCH[@]}" --precision fp32 \
  --mode fwd+bwd --providers eager,albef_fast --out "$OUT" --no-plot --tag f16x3p 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
stamp "done"
