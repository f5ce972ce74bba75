"""Benchmark suites of the state ops: EMA on ALBEF's parameter set, and the enqueue."""
from __future__ import annotations

from typing import Dict, List

import torch

import albef_fast
from albef_fast import reference

from . import cases, measure

EMA_PROVIDERS = ("albef_loop", "foreach_lerp", "albef_fast", "albef_fast[updater]")
ENQUEUE_PROVIDERS = ("albef", "albef_fast")


def _ema_fn(provider: str, params_m, params, momentum: float):
    if provider == "albef_loop":
        return lambda: reference.ema_update_(params_m, params, momentum)
    if provider == "foreach_lerp":  # p_m + (1 - m) (p - p_m): the fast idiom, not bit-exact to ALBEF
        return lambda: torch._foreach_lerp_(params_m, params, 1.0 - momentum)
    if provider == "albef_fast[updater]":  # the per-step path: arguments validated once, when cached
        return _updater(params_m, params, momentum).update
    return lambda: albef_fast.ema_update_(params_m, params, momentum)  # validates 822 tensors every call


def _updater(params_m, params, momentum: float) -> albef_fast.MomentumUpdater:
    """A MomentumUpdater over modules holding the given tensors (shared storage, no copies)."""
    def module(tensors):
        m = torch.nn.Module()
        m.params = torch.nn.ParameterList(torch.nn.Parameter(t, requires_grad=False) for t in tensors)
        return m

    return albef_fast.MomentumUpdater([(module(params), module(params_m))], momentum=momentum)


def run_ema(args, device: torch.device, progress) -> List[Dict]:
    """ALBEF's 411 tensors / 209M fp32 parameters; bytes = read p_m and p, write p_m."""
    shapes = cases.albef_param_shapes()
    params = [torch.randn(s, device=device) for s in shapes]
    params_m = [torch.randn(s, device=device) for s in shapes]
    nbytes = 3.0 * sum(p.numel() * p.element_size() for p in params)
    rows, base = [], None
    for provider in EMA_PROVIDERS:
        progress.set_description(f"ema {provider}")
        med, p20, p80 = measure.time_ms(_ema_fn(provider, params_m, params, 0.995), device, reps=max(3, args.reps // 2))
        base = med if provider == "albef_loop" else base
        rows.append(dict(suite="ema", provider=provider, mode="update", precision="fp32", B=len(shapes),
                         Q=sum(p.numel() for p in params), D="", median_ms=med, p20_ms=p20, p80_ms=p80,
                         speedup_vs_eager=base / med, peak_extra_mib="", tflops="", gbps=nbytes / med / 1e6,
                         _bytes=nbytes))
        progress.update(1)
    return rows


def run_enqueue(args, device: torch.device, progress) -> List[Dict]:
    """Both [D, Q] queues and the [1, Q] id queue, N = B rows per step, as in ALBEF retrieval."""
    rows, base = [], None
    b = (cases.SWEEP_DEFAULT if args.sweep else args.batch)[0]
    queues = [torch.randn(args.dim, args.queue, device=device), torch.randn(args.dim, args.queue, device=device),
              torch.full((1, args.queue), -100, device=device)]
    items = [torch.randn(b, args.dim, device=device), torch.randn(b, args.dim, device=device),
             torch.arange(b, device=device).view(b, 1)]
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    for provider in ENQUEUE_PROVIDERS:
        progress.set_description(f"enqueue {provider}")
        fn = reference.enqueue_slices_ if provider == "albef" else albef_fast.enqueue_
        med, p20, p80 = measure.time_ms(lambda: fn(queues, items, ptr), device, reps=max(20, args.reps))
        base = med if provider == "albef" else base
        rows.append(dict(suite="enqueue", provider=provider, mode="step", precision="fp32", B=b, Q=args.queue,
                         D=args.dim, median_ms=med, p20_ms=p20, p80_ms=p80, speedup_vs_eager=base / med,
                         peak_extra_mib="", tflops="", gbps=""))
        progress.update(1)
    return rows
