"""Direct launches of compiled Triton kernels: the host time of a launch without Triton's binder.

`fn[grid](*args, **constexprs)` costs 15-25 us of Python per launch (Triton 3.6, measured on a
CPU with a no-op launcher: benchmarks/host_step.py): it binds ~40 arguments, specializes each one,
builds a string cache key from the options and wraps launch metadata. At B = 64 the fused ITC step
issues three launches and its kernels run for ~0.25 ms, so that Python is a large part of the
step. `DirectLauncher` keeps the compiled kernel Triton returned and calls its launcher with the
same arguments Triton's own `JITFunction.run` passes it (every bound argument, constexprs
included, in parameter order; Triton 3.6-3.8), keyed by what Triton specializes on:

- tensors: dtype and whether the address is a multiple of 16 bytes;
- ints: == 1 (becomes a constexpr), a multiple of 16, the i32 / i64 / u64 range;
- floats and bools: their Python type only (never specialized);
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

__all__ = ["DirectLauncher", "direct_launch_enabled"]

SUPPORTED = ("3.6", "3.7", "3.8")  # JITFunction.run -> kernel.run(grid, stream, ..., *bound_args) read in these
_I32 = range(-(2**31), 2**31)


def direct_launch_enabled() -> bool:
    """False under the interpreter, on unsupported Triton versions, or with ALBEF_FAST_LAUNCH=jit
    (read when a launcher is made: at import)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("ALBEF_FAST_LAUNCH") == "jit":
        return False
    return triton.__version__.rsplit(".", 1)[0] in SUPPORTED


def _hooks_installed() -> bool:
    from triton import knobs

    hook = knobs.runtime.launch_enter_hook
    calls = getattr(hook, "calls", None)  # an empty HookChain (3.6+) calls nothing
    return hook is not None and (calls is None or len(calls) > 0)


def _arg_key(arg: Any):
    """What Triton's binder specializes one runtime argument on (see the module docstring)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg)
    return arg == 1, arg % 16 == 0, arg in _I32, arg < 2**63


class DirectLauncher:
    """Launch `fn` (a JITFunction) with runtime `args` (positional, in parameter order) and
    `constexprs` (by name: every constexpr parameter of fn), compile `options`
    (num_warps, num_stages, maxnreg)."""

    def __init__(self, fn):
        self.fn = fn
        self._kernels: Dict[Tuple, Any] = {}
        # the interpreter's functions have no compiled kernels: always fn[grid] there
        self._direct = isinstance(fn, triton.runtime.JITFunction) and direct_launch_enabled()
        if self._direct:
            names = fn.arg_names
            self._constexpr_names = tuple(names[i] for i in sorted(fn.constexprs))
            self._n_runtime = len(names) - len(self._constexpr_names)
            assert all(i >= self._n_runtime for i in fn.constexprs), "constexprs must follow the runtime arguments"

    def __call__(self, grid: Sequence[int], args: Sequence[Any], constexprs: Dict[str, Any],
                 options: Dict[str, int]) -> None:
        if not self._direct or _hooks_installed():
            self.fn[grid](*args, **constexprs, **options)
            return
        from triton.runtime import driver

        device = driver.active.get_current_device()
        consts = tuple(constexprs[name] for name in self._constexpr_names)
        key = (device, consts, tuple(options.items()), tuple(map(_arg_key, args)))
        kernel = self._kernels.get(key)
        if kernel is None:
            self._compile_and_launch(key, grid, args, constexprs, options)
            return
        grid = tuple(grid) + (1,) * (3 - len(grid))
        stream = driver.active.get_current_stream(device)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *consts)

    def _compile_and_launch(self, key, grid, args, constexprs, options) -> None:
        assert len(args) == self._n_runtime, f"{self.fn}: expected {self._n_runtime} runtime arguments"
        kernel = self.fn[grid](*args, **constexprs, **options)
        if kernel is not None and not hasattr(kernel, "result"):  # not an async-compile future
            self._kernels[key] = kernel
