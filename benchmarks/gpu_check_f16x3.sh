#!/usr/bin/env bash
# fp32 "highest" on the Triton path with f16x3 products, their key sums rounded once per tile
# (kernels/itc_split.py:_key_sum, TILE_SUMS; H100 run 1 of session 8: with the products chained into
# one accumulator f16x3 / f16x3p missed the error rule at B = 512 on dT alone, 2.3e-5 vs fp64),
# then the side-by-side table of issue 3 on one card.
#   bash benchmarks/gpu_check_f16x3.sh OUTDIR          (run with timeout_s >= 440)
# Stages (each with its own limit, 410 s together): install (Python part only), per-config table
# for f16x3 and f16x3p at B = 64, 512 vs eager and fp64 (fastest correct configs -> TUNED), the
# ITC benchmark (fp32: f16x3 at B = 64, f16x3p at B = 512, both through ALBEF_FAST_BACKEND=triton
# ALBEF_FAST_FP32_DOT; tf32 and bf16 as the package picks them), the CUDA tests of the fp16
# product modes in parallel workers (logs tarred into OUTDIR/tests.tar.gz: one file comes back).
# GPU_CHECK_SMOKE=1: the same steps on the CPU.
set -uo pipefail
OUT=${1:?usage: gpu_check_f16x3.sh OUTDIR}
NAME=gpu_check_f16x3
source "$(dirname "$0")/gpu_common.sh"
export ALBEF_FAST_DISABLE_EXTENSION=1
TUNED=${TMPDIR:-/tmp}/albef_fast_tuned_f16x3.json

# the four configs that compiled for f16x3 on the H100 (128-row ones need > 227 KB of shared memory)
CONFIGS="64,32,256,1,0,4,3;64,32,256,1,0,4,4;64,32,256,1,0,8,3,0,1;64,16,256,1,0,8,4,0,1"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  TABLE=(--device cpu --queue 256 --dim 32 --batch 8 --jobs 0 --configs "16,16,32,1,1,1")
  SMALL=(--device cpu --queue 256 --dim 32 --batch 8 --reps 2); LARGE=("${SMALL[@]}"); BOTH=("${SMALL[@]}")
  TESTS=(--workers 2 tests/test_triton.py -k "f16x3_products")
else
  TABLE=(--batch 64,512 --jobs 16 --configs "$CONFIGS")
  SMALL=(--device cuda --batch 64); LARGE=(--device cuda --batch 512); BOTH=(--device cuda --batch 64,512)
  TESTS=(--workers 14 tests/test_triton.py -k "f16 or tf32 or cuda_f16x3 or cuda_converted")
fi
$PY -c "import pytest_timeout" 2>/dev/null && TESTS=(--timeout 90 "${TESTS[@]}")
bench() {  # tag, then bench arguments; the suite's rows go to OUT's CSV and bench.txt
  local tag=$1; shift
  stage 35 $PY -m albef_fast.bench "$@" --mode fwd+bwd --providers eager,albef_fast --out "$OUT" --no-plot \
    --tag "$tag" 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
}

stamp "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

install_package 60

stamp "per-config table: f16x3, f16x3p with the key sums rounded per tile, vs eager and fp64"
stage 130 $PY benchmarks/triton_configs.py --out "$OUT" "${TABLE[@]}" --precision f16x3,f16x3p --waves 4 \
  --tuned "$TUNED" 2>&1 | tee "$OUT/table.txt"
if [ -s "$TUNED" ]; then  # the measured entries over the package's TUNED
  $PY -c "import json, sys; from albef_fast.kernels import itc_configs as c; t = dict(c.TUNED); t.update(json.load(open(sys.argv[1]))); json.dump(t, open(sys.argv[1], 'w'))" "$TUNED"
  export ALBEF_FAST_TUNED="$TUNED"; stamp "TUNED now: $(cat "$TUNED")"
fi

stamp "benchmark: fp32 (Triton f16x3 at B = 64, f16x3p at B = 512), tf32, bf16"
ALBEF_FAST_BACKEND=triton ALBEF_FAST_FP32_DOT=f16x3 bench f16x3 "${SMALL[@]}" --precision fp32
ALBEF_FAST_BACKEND=triton ALBEF_FAST_FP32_DOT=f16x3p bench f16x3p "${LARGE[@]}" --precision fp32
bench tf32 "${BOTH[@]}" --precision tf32
bench bf16 "${BOTH[@]}" --precision bf16

stamp "tests: the fp16 product modes on CUDA, in parallel (logs in $OUT/tests.tar.gz)"
mkdir -p "$OUT/tests"
stage 100 $PY benchmarks/pytest_parallel.py --deadline 90 --log-dir "$OUT/tests" "${TESTS[@]}" 2>&1 \
  | tee "$OUT/tests.txt" | tail -30
tar -czf "$OUT/tests.tar.gz" -C "$OUT" tests && rm -rf "$OUT/tests"
stamp "done"
