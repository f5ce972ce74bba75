"""Where one albef_fast ITC step spends its time on a GPU: device time per kernel and host time.

    python benchmarks/profile_step.py [--batch 64,512] [--precision bf16,tf32] [--settings "A=1;B=2 C=3,4"]

For each case (Q=65536, D=256, fwd+bwd, alpha 0.4) it prints the median step time (do_bench), the
host time to issue one step (no synchronization: above the step time means the host is the
bottleneck), the profiler's device time per kernel, averaged over the profiled steps, and with
--host-profile the Python functions that take the host's time (cProfile, cumulative). --settings
profiles every case once per group of environment settings (the ALBEF_FAST_* knobs are read at
each call), in one process: the kernels the groups share compile once.
"""
from __future__ import annotations

import argparse
import time

import torch

import albef_fast
from albef_fast.bench.cases import PRECISIONS, ITCCase
from albef_fast.bench.measure import environment, matmul_precision, time_ms


def _step(case: ITCCase):
    def step():
        a = case.image_feat.detach().requires_grad_(True)
        b = case.text_feat.detach().requires_grad_(True)
        albef_fast.itc_loss(a, b, case.image_feat_m, case.text_feat_m, case.image_queue, case.text_queue,
                            case.temp, 0.4).backward()

    return step


def _host_us(step, n: int = 50) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def _kernel_table(step, n: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if total > 0:
            rows.append((total / n, e.count // n, e.key[:70]))
    rows.sort(reverse=True)
    return "\n".join(f"    {us:9.1f} us/step  x{count:<3d} {name}" for us, count, name in rows[:10])


def _host_profile(step, n: int = 50) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    return f"host profile over {n} steps (times are totals):\n" + out.getvalue()


def _settings(group: str):
    """The environment with group's NAME=VALUE settings (space-separated; values may hold commas)
    set for the block, then as it was."""
    return environment(dict(item.split("=", 1) for item in group.split() if "=" in item))


def _profile(args, precision: str, b: int) -> None:
    case = ITCCase(b, 65536, 256, precision, torch.device("cuda"))
    with matmul_precision(PRECISIONS[precision][1]):
        step = _step(case)
        for _ in range(3):
            step()
        ms = time_ms(step, case.device)[0]
        host = _host_us(step)
        print(f"{precision} B={b}: step {ms * 1e3:.1f} us (do_bench median), host issue {host:.1f} us/step")
        print(_kernel_table(step), flush=True)
        if args.host_profile:
            print(_host_profile(step), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="64,512")
    p.add_argument("--precision", default="bf16,tf32")
    p.add_argument("--host-profile", action="store_true", help="also cProfile the host side of each case")
    p.add_argument("--settings", default="",
                   help="';'-separated groups of space-separated NAME=VALUE environment settings, each group "
                        "profiled in turn (default: the environment as it is)")
    args = p.parse_args()
    for group in args.settings.split(";"):
        if group:
            print(f"settings: {group}", flush=True)
        with _settings(group):
            for precision in args.precision.split(","):
                for b in (int(v) for v in args.batch.split(",")):
                    try:
                        _profile(args, precision, b)
                    except Exception as exc:  # one failing group or case must not cost the others
                        print(f"{precision} B={b}: FAILED: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
