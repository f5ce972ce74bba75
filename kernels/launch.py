"""Direct launches of compiled Triton kernels: the host time of a launch without Triton's binder.

`fn[grid](*args, **constexprs)` costs 15-25 us of Python per launch (Triton 3.6, measured on a
CPU with a no-op launcher: benchmarks/host_step.py): it binds ~40 arguments, specializes each one,
builds a string cache key from the options and wraps launch metadata. At B = 64 the fused ITC step
issues three launches and its kernels run for ~0.25 ms, so that Python is a large part of the
step. `DirectLauncher` keeps the compiled kernel Triton returned and calls its launcher with the
same arguments Triton's own `JITFunction.run` passes it (every bound argument, constexprs
included, in parameter order; Triton 3.6-3.8). The kernels take their runtime arguments as
tensors, then ints, then floats, and the cache key covers at least what Triton specializes on:

- tensors: dtype and whether the address is a multiple of 16 bytes;
- ints: their values (Triton: == 1, a multiple of 16, the i32 / i64 range; finer is safe, it
  only means a JITFunction.run call, no compile, for each new shape);
- floats: nothing (Python floats are never specialized; alpha changes every step);
- constexprs and compile options: their values; the current device.

The first call with a new key goes through `JITFunction.run` (compiling if needed) and caches the
kernel it returns; later calls launch it directly. tests/test_launch.py checks, with a fake
driver and kernels compiled for sm_90, that the direct path picks the kernel and passes the
arguments that `JITFunction.run` would. Falls back to `JITFunction.run` under the interpreter, on
Triton versions not listed in SUPPORTED, while a launch hook is installed (profilers such as
proton), or with ALBEF_FAST_LAUNCH=jit.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Sequence, Tuple

import torch
import triton
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # Triton < 3.4: launches go through JITFunction.run (SUPPORTED)
    knobs = None

__all__ = ["DirectLauncher", "direct_launch_enabled"]

SUPPORTED = ("3.6", "3.7", "3.8")  # JITFunction.run -> kernel.run(grid, stream, ..., *bound_args) read in these


def direct_launch_enabled() -> bool:
    """False under the interpreter, on unsupported Triton versions, or with ALBEF_FAST_LAUNCH=jit
    (read when a launcher is made: at import)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("ALBEF_FAST_LAUNCH") == "jit":
        return False
    return triton.__version__.rsplit(".", 1)[0] in SUPPORTED


def _hooks_installed() -> bool:
    if knobs is None:
        return True
    hook = knobs.runtime.launch_enter_hook
    calls = getattr(hook, "calls", None)  # an empty HookChain (3.6+) calls nothing
    return hook is not None and (calls is None or len(calls) > 0)


class DirectLauncher:
    """Launch `fn` (a JITFunction whose runtime parameters are tensors, then ints, then floats,
    then constexprs) with `constexprs` given by name (every constexpr parameter) and compile
    `options` (num_warps, num_stages, maxnreg)."""

    def __init__(self, fn):
        self.fn = fn
        self._kernels: Dict[Tuple, Tuple] = {}  # key -> (launcher, function handle, packed metadata)
        # the interpreter's functions have no compiled kernels: always fn[grid] there
        self._direct = isinstance(fn, triton.runtime.JITFunction) and direct_launch_enabled()
        if self._direct:
            names = fn.arg_names
            self._constexpr_names = tuple(names[i] for i in sorted(fn.constexprs))
            self._n_runtime = len(names) - len(self._constexpr_names)
            assert all(i >= self._n_runtime for i in fn.constexprs), "constexprs must follow the runtime arguments"

    def __call__(self, grid: Sequence[int], tensors: Sequence[torch.Tensor], ints: Tuple[int, ...],
                 floats: Tuple[float, ...], constexprs: Dict[str, Any], options: Dict[str, int]) -> None:
        if not self._direct or _hooks_installed():
            self.fn[grid](*tensors, *ints, *floats, **constexprs, **options)
            return
        device = driver.active.get_current_device()
        consts = tuple(map(constexprs.__getitem__, self._constexpr_names))
        aligned = tuple([t.data_ptr() % 16 == 0 for t in tensors])
        dtypes = tuple([t.dtype for t in tensors])
        key = (device, consts, tuple(options.items()), dtypes, aligned, ints)
        entry = self._kernels.get(key)
        if entry is None:
            self._compile_and_launch(key, grid, (*tensors, *ints, *floats), constexprs, options)
            return
        run, function, metadata = entry
        grid = (*grid, 1, 1)
        run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), function, metadata, None, None,
            None, *tensors, *ints, *floats, *consts)

    def _compile_and_launch(self, key, grid, args, constexprs, options) -> None:
        assert len(args) == self._n_runtime, f"{self.fn}: expected {self._n_runtime} runtime arguments"
        kernel = self.fn[grid](*args, **constexprs, **options)
        if kernel is not None and not hasattr(kernel, "result"):  # not an async-compile future
            self._kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata)
