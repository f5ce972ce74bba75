"""Timing, peak extra memory and the card's ceilings, on CUDA or the CPU."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Iterator, Tuple

import torch

from albef_fast.itc_op import matmul_precision

__all__ = ["time_ms", "peak_extra_mib", "ceilings", "matmul_precision", "device_name"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model} x{torch.get_num_threads()} threads"


@contextlib.contextmanager
def environment(values: Dict[str, str]) -> Iterator[None]:
    """The environment variables in values set for the block, then as they were (unset ones
    unset again): the ALBEF_FAST_* knobs are read at each call."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> Tuple[float, float, float]:
    """(median, 20th, 80th percentile) in ms. CUDA: triton's do_bench (L2 flushed); CPU: wall clock."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q50, q20, q80 = do_bench(fn, warmup=25, rep=max(100, 10 * reps), quantiles=[0.5, 0.2, 0.8])
        return q50, q20, q80
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by one call of fn beyond what was live before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return _cpu_peak_mib(fn)


def _cpu_peak_mib(fn: Callable[[], object]) -> float:
    """The CPU allocator has no peak counter: replay the profiler's allocation records in time order."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto, read at its first start, otherwise logs an ERROR line on a machine without a GPU
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def ceilings(device: torch.device) -> Dict[str, float]:
    """Measured copy bandwidth (GB/s) and matmul peaks (TFLOP/s) per dot precision."""
    big = device.type == "cuda"
    n_copy = (1 << 28) if big else (1 << 25)  # fp32 elements: 1 GiB on a GPU, 128 MiB on a CPU
    src = torch.empty(n_copy, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, reps=5)[0]
    out = {"copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6}
    del src, dst
    n = 8192 if big else 1024
    precisions = {"fp32": (torch.float32, "highest")}
    if big:
        precisions.update({"tf32": (torch.float32, "high"), "bf16": (torch.bfloat16, "highest")})
    for name, (dtype, precision) in precisions.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        with matmul_precision(precision):
            ms = time_ms(lambda: a @ a, device, reps=5)[0]
        out[f"{name}_tflops"] = 2 * n**3 / ms / 1e9
    return out
