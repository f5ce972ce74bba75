#!/usr/bin/env bash
# The benchmark part of gpu_check.sh alone, for a short device lease (about 3 minutes):
#   bash benchmarks/gpu_bench.sh OUTDIR
# Installs the Python package (the extension builds in the background for the EMA / enqueue
# rows), then: ITC fwd+bwd for B 64..1024 x fp32 / TF32 / bf16, eager and albef_fast, each also
# replayed from a CUDA graph (device time without the host's launch cost); the per-kernel profile;
# EMA and enqueue (the ITC rows with the Python launches: the extension is still building).
# Stage limits add up to 185 s: run with timeout_s >= 200. OUTDIR receives results.tar.gz and
# console.txt (benchmarks/gpu_common.sh).
set -uo pipefail
OUT=${1:?usage: gpu_bench.sh OUTDIR}
NAME=gpu_bench
source "$(dirname "$0")/gpu_common.sh"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

stamp "device"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee "$OUT/bench.txt"
ALBEF_FAST_NO_EXTENSION=1 stage 30 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { stamp "install FAILED"; tail -20 "$OUT/install.log"; exit 1; }
(MAX_JOBS=6 stage 150 $PY setup.py build_ext --inplace >> "$OUT/install.log" 2>&1; echo "build_ext rc=$?" >> "$OUT/install.log") &
BUILD=$!

stamp "ITC fwd+bwd: eager vs albef_fast, launched and replayed from a CUDA graph"
ALBEF_FAST_DISABLE_EXTENSION=1 stage 110 $PY -m albef_fast.bench --device cuda --sweep --precision fp32,tf32,bf16 \
  --mode fwd+bwd --providers "eager,albef_fast,eager[graph],albef_fast[graph]" --out "$OUT" --tag graph 2>&1 \
  | grep -v "it/s" | tee -a "$OUT/bench.txt"

stamp "profile"
ALBEF_FAST_DISABLE_EXTENSION=1 stage 25 $PY benchmarks/profile_step.py --host-profile 2>&1 | grep -v "warn" | tee -a "$OUT/bench.txt"

stamp "EMA and enqueue"; wait $BUILD; tail -1 "$OUT/install.log"
stage 20 $PY -m albef_fast.bench --device cuda --suite ema,enqueue --out "$OUT" 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
stamp "done"
