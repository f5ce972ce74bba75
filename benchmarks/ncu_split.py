"""One albef_fast ITC step for Nsight Compute: the split kernel's hardware counters at ALBEF's shape.

    ncu --clock-control none --profile-from-start off -k regex:_itc_split_fwd_kernel \\
        --section SpeedOfLight ... python benchmarks/ncu_split.py --precision tf32

Warms the step up (compiles, plans) outside the profiled range, then runs one fwd+bwd step
(Q = 65536, D = 256, alpha 0.4) between cudaProfilerStart and cudaProfilerStop, so that ncu
(with --profile-from-start off) sees that step's kernels only. Why: at B = 64 the TF32 split
kernel (f16s) took ~2.7x bf16's with the same tiles (benchmarks/NOTES.md, sessions 6 and 13),
which neither its instruction count nor its bytes explain; the counters say where it waits.
"""
from __future__ import annotations

import argparse

import torch

from albef_fast.bench.cases import PRECISIONS, ITCCase, step_fn
from albef_fast.bench.measure import matmul_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="tf32", choices=sorted(PRECISIONS))
    args = p.parse_args()
    case = ITCCase(args.batch, 65536, 256, args.precision, torch.device("cuda"))
    with matmul_precision(PRECISIONS[args.precision][1]):
        step = step_fn(case, "albef_fast", "fwd+bwd")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ncu_split: {args.precision} B={args.batch} profiled one step", flush=True)


if __name__ == "__main__":
    main()
