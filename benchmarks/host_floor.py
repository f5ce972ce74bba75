"""What a training step issued from Python costs on this machine's host, before any kernel work.

    python benchmarks/host_floor.py [--batch 64] [--precision bf16]

At ALBEF's per-GPU batch the fused step is host-bound (benchmarks/NOTES.md). This prints, for
ALBEF's inputs on CUDA, the launched step time (do_bench median, as the benchmark tables) and
the host time to issue one step (no synchronization, mean over 200) of:
  eager          ALBEF's ITC (albef_fast.reference)
  albef_fast     the fused step with the Python launches (ALBEF_FAST_LAUNCH=direct, set here)
  albef_fast[aten-bwd]  the same with its backward as three aten products (kernels/itc_backward.py
                 replaces them with one launch on the Triton path)
  albef_fast[cpp]  the same issued from C++ (kernels/cpp_launch.py, ALBEF_FAST_LAUNCH=cpp; turned on
                 for this row alone; needs the extension), itc_loss's Python before it kept
  albef_fast[cpp+entry]  the same with itc_loss's usual call checked and keyed in C++ too
                 (csrc/itc_entry.cpp): what ALBEF_FAST_LAUNCH=cpp runs
  prelude        itc_loss's Python before its op (validation, backend and flags), the op a stub:
                 what a C++ call path would still pay in Python
  function-floor a Python autograd.Function with albef_fast's inputs and outputs and no kernels
                 (its forward allocates the 0-d loss, its backward returns the 3 gradients)
  cpp-floor      the same step through a C++ op with autograd in C++ (csrc/host_floor.cpp): the
                 step's allocations (3 forward, 2 backward: csrc/packed.h) and 3 + 1 empty kernel
                 launches; [0 launches] without them; [unpacked] with one allocation per output
                 (9 forward, 3 backward, as the step before packing). What a C++ call path could
                 reach (needs the extension)
  aten-floor     (a.sum() + b.sum()) * temp: 3 leaves, 4 aten ops forward, their backward
  engine-floor   a.sum(): one op forward and backward (the autograd engine's own cost)
The floors bound what any step issued from Python can reach here. The cpp-floor rows need the
extension (not with ALBEF_FAST_DISABLE_EXTENSION=1).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ["ALBEF_FAST_LAUNCH"] = "direct"  # the albef_fast rows; the [cpp] rows turn the C++ step on themselves

import albef_fast
from albef_fast import _extension, functional, itc_op, reference
from albef_fast.bench.cases import PRECISIONS, ITCCase
from albef_fast.bench.measure import matmul_precision, time_ms


class _NoWork(torch.autograd.Function):
    """albef_fast's autograd shape with no kernels: 3 inputs that get gradients, a 0-d loss."""

    @staticmethod
    def forward(ctx, a, b, temp, rest):
        ctx.save_for_backward(a, b)
        return a.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return torch.empty_like(a), torch.empty_like(b), grad.new_empty(()), None


def _steps(case: ITCCase):
    rest = (case.image_feat_m, case.text_feat_m, case.image_queue, case.text_queue)

    def leaves():
        return case.image_feat.detach().requires_grad_(True), case.text_feat.detach().requires_grad_(True)

    def eager():
        a, b = leaves()
        reference.itc_loss(a, b, *rest, case.temp, 0.4).backward()

    def fused():
        a, b = leaves()
        albef_fast.itc_loss(a, b, *rest, case.temp, 0.4).backward()

    def fused_aten_backward():
        fused_backward = itc_op.FUSED_BACKWARDS.pop("triton", None)
        try:
            fused()
        finally:
            if fused_backward is not None:
                itc_op.FUSED_BACKWARDS["triton"] = fused_backward

    def fused_cpp(entry: bool):
        def step():
            from albef_fast.kernels import cpp_launch, itc

            saved = itc.CPP, itc_op.CPP_STEPS.get("triton"), functional.CPP_ENTRY
            itc.CPP, itc_op.CPP_STEPS["triton"] = cpp_launch, cpp_launch.step
            functional.CPP_ENTRY = cpp_launch.entry() if entry else None
            try:
                fused()
            finally:
                itc.CPP, functional.CPP_ENTRY = saved[0], saved[2]
                if saved[1] is None:
                    itc_op.CPP_STEPS.pop("triton", None)
                else:
                    itc_op.CPP_STEPS["triton"] = saved[1]
        return step

    def prelude():
        outputs = (case.temp.detach(),) * 8
        apply, entry = functional.itc_apply, functional.CPP_ENTRY
        functional.itc_apply, functional.CPP_ENTRY = (lambda *inputs: outputs), None
        try:
            a, b = leaves()
            albef_fast.itc_loss(a, b, *rest, case.temp, 0.4)
        finally:
            functional.itc_apply, functional.CPP_ENTRY = apply, entry

    def function_floor():
        a, b = leaves()
        _NoWork.apply(a, b, case.temp, rest).backward()

    def cpp_floor(launches: int, packed: bool = True):
        def step():
            a, b = leaves()
            torch.ops.albef_fast._host_floor_step(a, b, *rest, case.temp, 0.4, launches, packed).backward()
        return step

    def aten_floor():
        a, b = leaves()
        ((a.sum() + b.sum()) * case.temp).backward()

    def engine_floor():
        a, _ = leaves()
        a.sum().backward()

    steps = {"eager": eager, "albef_fast": fused, "albef_fast[aten-bwd]": fused_aten_backward,
             "prelude": prelude, "function-floor": function_floor}
    if _extension.has_ops() and hasattr(_extension._EXT, "itc_step") and case.device.type == "cuda":
        steps.update({"albef_fast[cpp]": fused_cpp(False), "albef_fast[cpp+entry]": fused_cpp(True)})
    if _extension.has_ops():
        steps.update({"cpp-floor": cpp_floor(3), "cpp-floor[unpacked]": cpp_floor(3, packed=False),
                      "cpp-floor[0 launches]": cpp_floor(0)})
    return dict(steps, **{"aten-floor": aten_floor, "engine-floor": engine_floor})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_us(step, device: torch.device, n: int = 200) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - start) / n * 1e6
    _sync(device)
    return host


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="64")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    args = p.parse_args()
    device = torch.device(args.device)
    for precision in args.precision.split(","):
        for b in (int(v) for v in args.batch.split(",")):
            case = ITCCase(b, args.queue, 256, precision, device)
            card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            print(f"{precision} B={b} Q={args.queue}, {card}: launched step (do_bench median) | host issue")
            with matmul_precision(PRECISIONS[precision][1]):
                for name, step in _steps(case).items():
                    for _ in range(5):
                        step()
                    ms = time_ms(step, case.device)[0]
                    print(f"  {name:<22} {ms * 1e3:8.1f} us | {_host_us(step, device):8.1f} us", flush=True)


if __name__ == "__main__":
    main()
