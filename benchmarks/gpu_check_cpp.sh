#!/usr/bin/env bash
# Session 10's C++ call path on a GPU (kernels/cpp_launch.py, csrc/itc_launch.cpp; opt-in with
# ALBEF_FAST_LAUNCH=cpp) with session 11's C++ entry in front of it (csrc/itc_entry.cpp), and what
# sessions 8-9 left untimed. The extension builds in the
# background while the owed ITC CUDA tests run (session 8's test fixes, the fused backward, the
# merge's fused loops); then the C++ step's CUDA tests (bits against the Python path) and the host
# floor probe's; the benchmark at B = 64 (bf16, tf32; launched and graph-replayed, eager in the
# same process) with the Python launches and then with ALBEF_FAST_LAUNCH=cpp; host_floor.py at
# B = 64 (albef_fast, albef_fast[cpp], albef_fast[cpp+entry], the Python prelude, the Python and
# C++ floors); the merge
# kernel's device time at B = 64 with its default tiles and ALBEF_FAST_MERGE=8,16,32; last, TF32
# (f16s) at B = 64 per config (TF32's 8x at B = 64 is device bound): the tuned one with session
# 12's staged query rows and without them (ALBEF_FAST_STAGE_ROWS=0: the same bits, so the same
# errors), the 16-key 4-warp ones the staging leaves with 0-12 B of spills at 2 programs per SM,
# the two-state ones (both kinds from one read of each key tile, where one-state programs read
# it twice): 32 rows (0 spills) and 64 rows on 8 warps (64 B), the tuned one with interleaved
# tiles (ALBEF_FAST_INTERLEAVE=1, session 13: split s takes tiles s, s + S, ...), and the two
# fastest at 1 wave (sm_90a AOT, Triton 3.6). Before that table, session 13's probe of the queue reads alone
# (benchmarks/queue_read_probe.py: the split kernel's tiles and grid, no work per tile): set
# against the split kernel's device time in profile.txt, it says whether f16s at B = 64 is bound
# by its reads of the [D, Q] queues or by its own work per tile.
#   bash benchmarks/gpu_check_cpp.sh OUTDIR          (run with timeout_s >= 555)
# Stage limits: 40 install + 150 tests (the build runs beside them, up to 200) + 60 + 2 x 45 + 30
# + 2 x 25 + 20 + 100 = 540 s at most. OUTDIR: device.txt install.log tests.txt tests.tar.gz
# bench.txt itc_<gpu>.csv host_floor.txt profile.txt probe.txt triton_configs_<gpu>.csv table.txt.
# GPU_CHECK_SMOKE=1: the same steps on the CPU, smaller.
set -uo pipefail
OUT=${1:?usage: gpu_check_cpp.sh OUTDIR}
NAME=gpu_check_cpp
source "$(dirname "$0")/gpu_common.sh"
mkdir -p "$OUT/tests"

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  TESTS=(--workers 2 tests/test_itc_backward.py -k "one_launch")
  CPP_TESTS=(--workers 1 tests/test_cpp_launch.py tests/test_host_floor_op.py)
  BENCH=(--device cpu --queue 256 --dim 32 --batch 8 --reps 2 --precision fp32 --providers eager,albef_fast)
  FLOOR=(--device cpu --queue 256 --batch 8 --precision fp32)
  PROFILE=(--help)  # needs a GPU: the smoke test checks only that the script starts
  PROBE=(--device cpu --queue 256 --dim 32)
  TABLE=(--help)
else
  TESTS=(--workers 14 tests/test_itc_loss.py tests/test_triton.py tests/test_itc_backward.py
         -k "not f16 and not tf32 and not converted")
  # the fake-driver checks (CPU, compiled for sm_90) run in CI: here the CUDA tests only
  CPP_TESTS=(--workers 3 tests/test_cpp_launch.py tests/test_host_floor_op.py -k "not passes_the and not takes_only")
  BENCH=(--device cuda --batch 64 --precision bf16,tf32 --providers eager,albef_fast,eager[graph],albef_fast[graph])
  FLOOR=(--device cuda --batch 64 --precision bf16,tf32)
  PROFILE=(--batch 64 --precision bf16,tf32)
  PROBE=(--device cuda)
  TABLE=(--out "$OUT" --batch 64 --precision f16s --waves 1 --jobs 6
         --configs "64,32,256,1,0,4,3;64,32,256,1,0,4,3@ALBEF_FAST_STAGE_ROWS=0;64,32,256,1,0,4,3@ALBEF_FAST_INTERLEAVE=1;64,16,256,1,0,4,4;64,16,256,1,0,4,4,0,1;32,64,256,0,0,8,2;64,16,256,0,0,8,4,0,1")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
$PY -c "import pytest_timeout" 2>/dev/null && TESTS=(--timeout 90 "${TESTS[@]}")

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
install_package 40
build_extension_bg 8

stamp "tests: the ITC paths on CUDA (owed since sessions 8-9), while the extension builds"
ALBEF_FAST_DISABLE_EXTENSION=1 stage 150 $PY benchmarks/pytest_parallel.py --deadline 140 --log-dir "$OUT/tests" \
  "${TESTS[@]}" 2>&1 | tee "$OUT/tests.txt" | tail -20
stamp "waiting for the extension build"; wait $BUILD; tail -2 "$OUT/install.log"
$PY -c "from albef_fast import _extension; print('extension', _extension.build_info())" 2>&1 | tee -a "$OUT/device.txt"

stamp "tests: the C++ step against the Python path (bits), the floor probe"
stage 60 $PY benchmarks/pytest_parallel.py --deadline 55 --log-dir "$OUT/tests" "${CPP_TESTS[@]}" 2>&1 \
  | tee -a "$OUT/tests.txt" | tail -12
tar -czf "$OUT/tests.tar.gz" -C "$OUT" tests && rm -rf "$OUT/tests"

stamp "benchmark at B = 64: Python launches, then ALBEF_FAST_LAUNCH=cpp (eager in each process)"
for launch in direct cpp; do
  label=$([ $launch = cpp ] && echo "[cpp]" || echo "")
  ALBEF_FAST_LAUNCH=$launch stage 45 $PY -m albef_fast.bench "${BENCH[@]}" --mode fwd+bwd --label "$label" \
    --out "$OUT" --no-plot 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
done

stamp "host floor at B = 64: launched | host issue per step"
stage 30 $PY benchmarks/host_floor.py "${FLOOR[@]}" 2>&1 | tee "$OUT/host_floor.txt"

merge_profile "${PROFILE[@]}"

stamp "the queues' reads alone, in the split kernel's tiles (against its device time in profile.txt)"
stage 20 $PY benchmarks/queue_read_probe.py "${PROBE[@]}" 2>&1 | grep -v -i warn | tee "$OUT/probe.txt"

stamp "TF32 (f16s) at B = 64 per config: launched | graph replay, eager in the same process"
stage 100 $PY benchmarks/triton_configs.py "${TABLE[@]}" 2>&1 | grep -v "it/s" | tee "$OUT/table.txt" | tail -12
stamp "done"
