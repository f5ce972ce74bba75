#!/usr/bin/env bash
# fp16 products of power-of-two-scaled operands on a GPU: TF32-class (ALBEF_FAST_TF32=f16s, the
# default for "high") against the TF32 path, fp32-class (ALBEF_FAST_FP32_DOT=f16x3: 3 products of
# (hi, lo) pairs; "highest" on the Triton path, untimed before), their GPU tests, and the host's
# floor for a step issued from Python.
#   bash benchmarks/gpu_check_tf32.sh OUTDIR          (run with timeout_s >= 540)
# Stages (each with its own limit): install (Python part only: the C++ extension is not needed),
# per-config table for f16s, f16x3 and tf32 at B = 64, 512 (writes the fastest correct configs as JSON,
# merged into TUNED for the stages after it), CUDA tests of the Triton path, benchmarks/host_floor.py,
# the ITC benchmark (fp32 on the torch backend, tf32 with fp16 products, fp32 with f16x3 on the
# Triton path; the table times TF32 products against fp16 ones).
# GPU_CHECK_SMOKE=1: the same steps on the CPU.
set -uo pipefail
OUT=${1:?usage: gpu_check_tf32.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 ALBEF_FAST_DISABLE_EXTENSION=1
TUNED=${TMPDIR:-/tmp}/albef_fast_tuned_tf32.json
t0=$(date +%s)
stamp() { echo "[gpu_check_tf32 +$(( $(date +%s) - t0 ))s] $*"; }
stage() { local limit=$1; shift; timeout "$limit" "$@"; local rc=$?; [ $rc = 124 ] && stamp "TIMED OUT after ${limit}s"; return $rc; }

CONFIGS="128,32,256,1,0,8,5,0,1;128,32,256,1,0,8,4,0,1;64,32,256,1,0,4,3;64,32,256,1,0,8,3,0,1"
CONFIGS+=";64,32,256,1,0,8,4,0,1;64,16,256,1,0,8,4,0,1;32,64,256,0,1,8,2"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  TABLE=(--device cpu --queue 256 --dim 32 --batch 8 --jobs 0 --configs "16,16,16,0,0,1;16,16,32,1,1,1")
  TESTS=(tests/test_triton.py -k "f16"); FLOOR=(--device cpu --queue 256 --precision fp32)
  BENCH=(--device cpu --queue 256 --dim 32 --batch 8 --reps 2)
else
  TABLE=(--batch 64,512 --jobs 16 --configs "$CONFIGS")
  TESTS=(tests/test_triton.py::test_cuda_f16_products tests/test_triton.py::test_cuda_f16x3_products
         tests/test_triton.py::test_cuda_retrieval_odd_dim
         tests/test_triton.py::test_cuda_direct_launch_matches_jit_bitwise tests/test_triton.py::test_cuda_automatic_backend_choice)
  FLOOR=(--batch 64 --precision bf16,tf32); BENCH=(--device cuda --batch 64,512)
fi
PYTEST=($PY -m pytest -v -rfE -p no:cacheprovider)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 60)

stamp "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

stamp "install: the Python package"
if ! ALBEF_FAST_NO_EXTENSION=1 stage 60 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
  stamp "install FAILED"; tail -30 "$OUT/install.log"; exit 1
fi

stamp "per-config table: f16s (fp16 products), f16x3 (3 fp16 products), tf32 (rounded TF32), vs eager and fp64"
stage 220 $PY benchmarks/triton_configs.py --out "$OUT" "${TABLE[@]}" --precision f16s,f16x3,tf32 --waves 4 --tuned "$TUNED" \
  2>&1 | tee "$OUT/bench.txt"
if [ -s "$TUNED" ]; then  # the measured tf32 / f16s entries over the package's TUNED
  $PY -c "import json, sys; from albef_fast.kernels import itc_configs as c; t = dict(c.TUNED); t.update(json.load(open(sys.argv[1]))); json.dump(t, open(sys.argv[1], 'w'))" "$TUNED"
  export ALBEF_FAST_TUNED="$TUNED"; stamp "TUNED now: $(cat "$TUNED")"
fi

stamp "tests: the Triton path on CUDA (f16s at ALBEF's shapes, retrieval at an odd D, launches)"
stage 100 "${PYTEST[@]}" "${TESTS[@]}" > "$OUT/tests.log" 2>&1; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -20

stamp "host floor: what a step issued from Python costs here"
stage 30 $PY benchmarks/host_floor.py "${FLOOR[@]}" 2>&1 | tee -a "$OUT/bench.txt"

stamp "benchmark: fp32 on the torch backend (the default; chunk partials since session 7), tf32 with fp16 products
(the default), fp32 with 3 fp16 products on the Triton path"
stage 35 $PY -m albef_fast.bench "${BENCH[@]}" --precision fp32 --mode fwd+bwd \
  --providers eager,albef_fast --out "$OUT" --no-plot --tag torch 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
stage 35 $PY -m albef_fast.bench "${BENCH[@]}" --precision tf32 --mode fwd+bwd \
  --providers eager,albef_fast --out "$OUT" --no-plot --tag f16s 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
ALBEF_FAST_BACKEND=triton ALBEF_FAST_FP32_DOT=f16x3 stage 45 $PY -m albef_fast.bench "${BENCH[@]}" --precision fp32 \
  --mode fwd+bwd --providers eager,albef_fast --out "$OUT" --no-plot --tag f16x3 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
stamp "done"
