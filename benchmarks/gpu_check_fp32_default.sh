#!/usr/bin/env bash
# The defaults of session 8 and the one-launch backward of session 9, checked on a GPU: fp32
# "highest" on the Triton path (f16x3), "high" with f16p from B = 512, the fused backward
# (kernels/itc_backward.py). The CUDA tests of the ITC paths and the backward,
# benchmarks/converted_pairs_probe.py on f16x3p's failing case and its neighbours (config, D, Q,
# retrieval changed one at a time, in parallel processes), the benchmark of the new defaults, f16s
# against f16p at B = 256 (where _F16P_MIN_B goes), the merge kernel's device time at B = 64 with
# its default tiles and with ALBEF_FAST_MERGE=8,16,32 (benchmarks/profile_step.py), and
# benchmarks/host_floor.py at B = 64 (the step with the fused and with the aten backward, and the
# floors, in one process).
#   bash benchmarks/gpu_check_fp32_default.sh OUTDIR          (run with timeout_s >= 420)
# Stages (each with its own limit, 405 s together): install, probe (OUTDIR/probe.txt), tests in
# parallel workers (the fp16-product tests ran in gpu_check_f16x3.sh; logs in OUTDIR/tests.tar.gz),
# benchmark (fp32 and tf32 at B = 64, 512, eager in the same run), B = 256 tf32 twice, the merge
# profile twice (OUTDIR/profile.txt), host floor (OUTDIR/host_floor.txt).
# GPU_CHECK_SMOKE=1: the same steps on the CPU, smaller.
set -uo pipefail
OUT=${1:?usage: gpu_check_fp32_default.sh OUTDIR}
NAME=gpu_check_fp32_default
source "$(dirname "$0")/gpu_common.sh"
mkdir -p "$OUT/tests"
export ALBEF_FAST_DISABLE_EXTENSION=1

FAILING="64,32,256,1,0,8,3,0,1 64 4001 200 1"
CASES=("$FAILING" "64,32,256,1,0,4,3 64 4001 200 1" "64,32,256,1,0,8,3,0,1 64 4001 256 1"
       "64,32,256,1,0,8,3,0,1 64 4096 200 1" "64,32,256,1,0,8,3,0,1 64 4001 200 0")
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  CASES=("16,16,32,1,0,1 5 37 24 1" "16,16,32,0,1,1,2,0,1 5 37 24 0")
  TESTS=(--workers 2 tests/test_triton.py tests/test_itc_backward.py -k "edge_shapes or one_launch")
  BENCH=(--device cpu --queue 256 --dim 32 --batch 8 --reps 2)
  B256=(--device cpu --queue 256 --dim 32 --batch 16 --reps 2)
  FLOOR=(--device cpu --queue 256 --batch 8 --precision fp32)
  PROFILE=(--help)  # needs a GPU: the smoke test checks only that the script starts
else
  TESTS=(--workers 14 tests/test_itc_loss.py tests/test_triton.py tests/test_itc_backward.py
         -k "not f16 and not tf32 and not converted")
  BENCH=(--device cuda --batch 64,512)
  B256=(--device cuda --batch 256)
  FLOOR=(--device cuda --batch 64 --precision bf16,tf32)
  PROFILE=(--batch 64 --precision bf16,tf32)
fi
$PY -c "import pytest_timeout" 2>/dev/null && TESTS=(--timeout 90 "${TESTS[@]}")

stamp "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
install_package 40

stamp "probe: f16x3p's failing case and its neighbours, errors vs fp64"
for case in "${CASES[@]}"; do
  # shellcheck disable=SC2086
  stage 50 $PY benchmarks/converted_pairs_probe.py $case > "$OUT/tests/probe_${case// /_}.txt" 2>&1 &
done
wait
cat "$OUT"/tests/probe_*.txt | grep -v Warning | tee "$OUT/probe.txt"

stamp "tests: the ITC paths on CUDA with fp32 'highest' on Triton, in parallel"
stage 110 $PY benchmarks/pytest_parallel.py --deadline 100 --log-dir "$OUT/tests" "${TESTS[@]}" 2>&1 \
  | tee "$OUT/tests.txt" | tail -30
tar -czf "$OUT/tests.tar.gz" -C "$OUT" tests && rm -rf "$OUT/tests"

stamp "benchmark: the defaults, fp32 (f16x3) and tf32 (f16s below B = 512, f16p from it)"
for precision in fp32 tf32; do
  stage 35 $PY -m albef_fast.bench "${BENCH[@]}" --precision $precision --mode fwd+bwd --providers eager,albef_fast \
    --out "$OUT" --no-plot 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
done

stamp "benchmark: tf32 at B = 256, f16s (the default below _F16P_MIN_B = 512) against f16p"
for mode in f16s f16p; do
  echo "ALBEF_FAST_TF32=$mode" | tee -a "$OUT/bench.txt"
  ALBEF_FAST_TF32=$mode stage 30 $PY -m albef_fast.bench "${B256[@]}" --precision tf32 --mode fwd+bwd \
    --providers eager,albef_fast --out "$OUT" --no-plot 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
done

merge_profile "${PROFILE[@]}"

stamp "host floor at B = 64: launched | host issue per step (fused and aten backward, floors)"
stage 25 $PY benchmarks/host_floor.py "${FLOOR[@]}" 2>&1 | tee "$OUT/host_floor.txt"
stamp "done"
