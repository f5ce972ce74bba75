"""Host time of one fused ITC training step (fwd + bwd) on a CPU, without a GPU.

    python benchmarks/host_step.py [--batch 64] [--dtype bf16|fp32] [--parts]

At ALBEF's per-GPU batch the step is host-bound on a GPU (benchmarks/NOTES.md): the kernels run
~0.25 ms, issuing them took ~0.8 ms on the H200's host. This measures the host side alone, so
that changes to it can be compared on any machine: a fake Triton driver (tests/fake_driver.py)
compiles the kernels for sm_90 and turns launches into a recording call; tensors live on the
CPU, where the torch ops of the step are cheap stand-ins for their CUDA launches. Prints the
minimum over repeats (the machine's noise only adds); on a shared 2-core VM whole processes still
land 1.5-2x apart, so compare the best of several runs, same machine and Python only.
ALBEF_FAST_LAUNCH=direct times the Python launches, =jit Triton's own launch path; unset (or cpp),
the step issued from C++ (kernels/cpp_launch.py), whose launches the extension records instead
(with CPU tensors: ~1-3 us a launch, against ~11 us for the fake driver's Python recording; the
launch count says which path ran).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from tests import fake_driver  # noqa: E402

fake_driver.install()

import albef_fast  # noqa: E402
from albef_fast import _validate, functional  # noqa: E402

functional._interpreting = lambda: True  # lets CPU tensors take the "triton" backend
try:
    from albef_fast.kernels import itc_triton  # noqa: E402  (registers the backend)
except ImportError:  # the package not installed (another Python): the kernels from the source tree
    from kernels import itc_triton  # noqa: E402


def _case(b: int, dtype: torch.dtype, q: int = 65536, d: int = 256):
    g = torch.Generator().manual_seed(0)
    feat = lambda n: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)  # noqa: E731
    feats = [feat(b) for _ in range(4)]
    queues = [feat(q).t() for _ in range(2)]  # [D, Q] views, as ALBEF stores them
    return feats, queues, torch.nn.Parameter(torch.tensor(0.07))


def _min_us(fn, n: int = 20, reps: int = 100) -> float:
    for _ in range(n):
        fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def _cpp_recorded():
    """The C++ step's recorded launches since the last call (an empty list without the extension)."""
    from albef_fast import _extension

    take = getattr(_extension._EXT, "itc_take_recorded", None)
    return take if take is not None else list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    # fp32 (the TF32 path) by default: bf16 arithmetic on the CPU is slow, unlike its CUDA launch
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--parts", action="store_true", help="also time validation, the backend and the forward alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # outputs are never written (no kernels run): no denormal slow paths
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    precision = "high" if dtype == torch.float32 else None
    (img, txt, img_m, txt_m), (img_q, txt_q), temp = _case(args.batch, dtype)

    def forward(a, b):
        return albef_fast.itc_loss(a, b, img_m, txt_m, img_q, txt_q, temp, 0.4, backend="triton",
                                   precision=precision)

    def step():
        forward(img.detach().requires_grad_(True), txt.detach().requires_grad_(True)).backward()

    step()  # compiles the kernels for sm_90 (cached on disk by Triton); with cpp: records the plan
    fake_driver.CALLS.clear()
    cpp_recorded = _cpp_recorded()
    cpp_recorded()
    step()
    launches = len(fake_driver.CALLS)
    cpp_launches = len(cpp_recorded())
    gc.disable()
    print(f"host step B={args.batch} {args.dtype} launch={os.environ.get('ALBEF_FAST_LAUNCH', 'cpp')}: "
          f"{_min_us(step):.1f} us (min over repeats; {launches} Triton launches a step"
          f"{f', {cpp_launches} from C++' if cpp_launches else ''})")
    if args.parts:
        a, b = img.detach().requires_grad_(True), txt.detach().requires_grad_(True)
        checks = lambda: _validate.itc_inputs(a, b, img_m, txt_m, img_q, txt_q, temp, 0.4, None, None,  # noqa: E731
                                              "triton", precision)
        backend = lambda: itc_triton(a, b, img_m, txt_m, img_q, txt_q, temp, 0.4, None, None, False, True,  # noqa: E731
                                     precision)
        print(f"  validation {_min_us(checks):.1f} us, backend (allocations and launches) {_min_us(backend):.1f} us, "
              f"forward {_min_us(lambda: forward(a, b)):.1f} us (the rest of the step: backward)")


if __name__ == "__main__":
    main()
