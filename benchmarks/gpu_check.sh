#!/usr/bin/env bash
# One prepared GPU check: build, GPU tests, then the benchmark, all results into OUTDIR.
#   bash benchmarks/gpu_check.sh OUTDIR
# For a machine with a CUDA GPU and no network, torch and triton already installed (torch 2.11 +
# triton 3.6 work). Installs albef_fast without dependencies or build isolation. Aimed at < 6 min
# on an H100 (each stage has its own time limit; the stages most worth having come first). GPU_CHECK_SMOKE=1 runs the same steps on the CPU at tiny shapes (to test the script).
# OUTDIR receives 8 files: device.txt install.log tests.log bench.txt, the CSV and 2 PNGs.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
SMOKE=${GPU_CHECK_SMOKE:-0}
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

if [ "$SMOKE" = 1 ]; then
  DEV=(--device cpu --queue 256 --dim 32 --reps 2)
  SWEEP=(--batch 8,16); PREC=fp32; AB_PREC=fp32
  QUICK=(tests/test_triton.py -k "fp32 and 5-37-24"); REST=(tests/test_triton.py -k "details")
else
  DEV=(--device cuda)
  SWEEP=(--sweep); PREC=fp32,tf32,bf16; AB_PREC=tf32,bf16  # fp32 "highest" runs the torch backend
  # Correctness at ALBEF's shapes first (fp32 / TF32 / bf16 vs the fp64 reference), the rest later.
  QUICK=(tests/test_triton.py -k "cuda_albef_shape or cuda_automatic or bitwise or details")
  REST=(tests/test_cuda_state.py tests/test_ops.py tests/test_triton.py -k "not cuda_albef_shape")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
# Every stage has a time limit, so that a slow one cannot take the results of the others with it;
# the limits add up to 560 s, inside one device command (600 s): run with timeout_s=600.
stage() { local limit=$1; shift; timeout "$limit" "$@"; local rc=$?; [ $rc = 124 ] && stamp "TIMED OUT after ${limit}s"; return $rc; }

stamp "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

stamp "install (build the extension)"
if ! stage 140 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
  stamp "install FAILED"; tail -30 "$OUT/install.log"; exit 1
fi
$PY -c "from albef_fast import _extension; print('extension', _extension.build_info())" | tee -a "$OUT/device.txt"

stamp "tests: correctness at ALBEF's shapes"
ALBEF_FAST_AUTOTUNE=0 stage 60 $PY -m pytest -q -p no:cacheprovider "${QUICK[@]}" 2>&1 | tee "$OUT/tests.log" | tail -8

stamp "benchmark: ITC, eager vs albef_fast, sweep x precisions x modes (autotunes on first use)"
stage 140 $PY -m albef_fast.bench "${DEV[@]}" "${SWEEP[@]}" --precision "$PREC" --mode fwd,fwd+bwd \
  --providers eager,albef_fast --out "$OUT" --tag sweep 2>&1 | grep -v "it/s" | tee "$OUT/bench.txt"

stamp "benchmark: A/B, one config each: student + teacher in one launch vs two (ALBEF_FAST_SPLIT_KINDS=1)"
for split in 0 1; do
  ALBEF_FAST_AUTOTUNE=0 ALBEF_FAST_SPLIT_KINDS=$split stage 40 $PY -m albef_fast.bench "${DEV[@]}" --batch 64,512 \
    --precision "$AB_PREC" --mode fwd+bwd --providers albef_fast --label "[fixed,split_kinds=$split]" --no-plot \
    --out "$OUT" 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
done

stamp "benchmark: EMA and enqueue"
stage 40 $PY -m albef_fast.bench "${DEV[@]}" --suite ema,enqueue --out "$OUT" 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"

stamp "tests: the rest (state ops, CUDA graph capture, torch.compile, small shapes)"
ALBEF_FAST_AUTOTUNE=0 stage 40 $PY -m pytest -q -p no:cacheprovider "${REST[@]}" 2>&1 | tee -a "$OUT/tests.log" | tail -8

stamp "benchmark: torch.compile(reference) at B=64 and 512 (compiles are slow: last)"
stage 60 $PY -m albef_fast.bench "${DEV[@]}" --batch 64,512 --precision fp32,bf16 --mode fwd+bwd \
  --providers eager,compile,albef_fast --out "$OUT" --tag compile 2>&1 | grep -v "it/s" | tee -a "$OUT/bench.txt"
stamp "done"
