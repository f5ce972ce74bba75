"""Direct launches of compiled Triton kernels: the host time of a launch without Triton's binder.

`fn[grid](*args, **constexprs)` costs 15-25 us of Python per launch (Triton 3.6, measured on a
CPU with a no-op launcher: benchmarks/host_step.py): it binds ~40 arguments, specializes each one,
builds a string cache key from the options and wraps launch metadata. At B = 64 the fused ITC step
issues two launches (three with its backward) and its kernels run for ~0.25 ms, so that Python
is a large part of the step. `DirectLauncher` keeps the compiled kernel Triton returned and calls its launcher with the
same arguments Triton's own `JITFunction.run` passes it (every bound argument, constexprs
included, in parameter order; Triton 3.6-3.8). The kernels take their runtime arguments as
tensors, then ints, then floats. A launch is prepared once (`DirectLauncher.prepare`: grid, ints,
constexprs, options fixed) and called with its tensors and floats; the cache key covers at least
what Triton specializes on:

- tensors: dtype and whether the address is a multiple of 16 bytes;
- ints, constexprs and compile options: the prepared launch (its values; for ints Triton only
  tells == 1, a multiple of 16 and the i32 / i64 range apart: finer is safe, it only means one
  JITFunction.run call, no compile, per prepared launch);
- floats: nothing (Python floats are never specialized; alpha changes every step);
- the current device.

The first call with a new key goes through `JITFunction.run` (compiling if needed) and caches the
kernel it returns; later calls launch it directly. tests/test_launch.py checks, with a fake
driver and kernels compiled for sm_90, that the direct path picks the kernel and passes the
arguments that `JITFunction.run` would. Falls back to `JITFunction.run` under the interpreter, on
Triton versions not listed in SUPPORTED (warned once: unsupported_version_note), while a launch
hook is installed (profilers such as proton), or with ALBEF_FAST_LAUNCH=jit.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import triton
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # Triton < 3.4: launches go through JITFunction.run (SUPPORTED)
    knobs = None

__all__ = ["DirectLauncher", "PreparedLaunch", "direct_launch_enabled", "unsupported_version_note", "on_device",
           "recording", "FIXED_OPTIONS", "RECORDING"]

# While a list (kernels/cpp_launch.py records a plan; set through `recording`): every launch of
# the thread RECORDING_THREAD appends (prepared launch, tensors, floats, its kernel entry
# (launcher, function, packed metadata, CompiledKernel) or None when it went through
# JITFunction.run).
RECORDING = None
RECORDING_THREAD = None
_RECORDING_LOCK = threading.RLock()


@contextlib.contextmanager
def recording():
    """Record this thread's launches while open: yields the list, or None where another thread
    records now. nn.DataParallel runs its replicas' forwards in threads: another thread's launches
    must not land in a recording, nor its end cut ours short (a plan replayed without its merge
    would return outputs nothing wrote). Nested in the same thread: a fresh list, the outer one
    restored after."""
    global RECORDING, RECORDING_THREAD
    if not _RECORDING_LOCK.acquire(blocking=False):
        yield None
        return
    outer = RECORDING
    try:
        RECORDING, RECORDING_THREAD = [], threading.get_ident()
        yield RECORDING
    finally:
        RECORDING = outer
        if outer is None:
            RECORDING_THREAD = None
        _RECORDING_LOCK.release()


def _this_thread_records() -> bool:
    return RECORDING_THREAD == threading.get_ident()

SUPPORTED = ("3.6", "3.7", "3.8", "3.9")  # JITFunction.run -> kernel.run(grid, stream, ..., *bound_args) read in these

# Compile options every launch passes: fused multiply-adds, Triton's default through 3.9, with
# which the kernels were checked and timed (3.9 warns that 3.10 turns the default off).
FIXED_OPTIONS = {"enable_fp_fusion": True}


def on_device(device: torch.device):
    """A context that makes `device` the current CUDA device while open, where it is not already.
    Triton compiles, loads and launches on the current device and its stream, not on its tensors'
    device (JITFunction.run reads driver.active.get_current_device(); triton-lang/triton#2441):
    tensors on cuda:1 while cuda:0 is current raise "cannot be accessed from Triton (cpu tensor?)"
    there, or run on the wrong GPU's stream. Costs one device query where nothing changes."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def _jit_launches_asked() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("ALBEF_FAST_LAUNCH") == "jit"


def _version_supported() -> bool:
    return triton.__version__.rsplit(".", 1)[0] in SUPPORTED


def direct_launch_enabled() -> bool:
    """False under the interpreter, on unsupported Triton versions, or with ALBEF_FAST_LAUNCH=jit
    (read when a launcher is made: at import)."""
    return not _jit_launches_asked() and _version_supported()


def unsupported_version_note() -> Optional[str]:
    """Why launches go through JITFunction.run when the installed Triton alone is the cause (a
    compiled Triton not in SUPPORTED, ALBEF_FAST_LAUNCH not jit), else None. The first such
    launch warns with it once: the step then pays Triton's binder and goes without the C++ step."""
    if _jit_launches_asked() or _version_supported():
        return None
    return (f"albef_fast: Triton {triton.__version__} is not among the versions its direct launches were checked "
            f"with ({', '.join(SUPPORTED)}): kernels launch through Triton's JITFunction.run and the C++ step is "
            "off, which adds host time to each step (benchmarks/NOTES.md). ALBEF_FAST_LAUNCH=jit takes this path "
            "without the warning.")


_NOTED = set()


def _note_once(note: str) -> None:
    if note not in _NOTED:
        _NOTED.add(note)
        warnings.warn(note, RuntimeWarning, stacklevel=3)


def _hooks_installed() -> bool:
    if knobs is None:
        return True
    hook = knobs.runtime.launch_enter_hook
    calls = getattr(hook, "calls", None)  # an empty HookChain (3.6+) calls nothing
    return hook is not None and (calls is None or len(calls) > 0)


class DirectLauncher:
    """Launch `fn` (a JITFunction whose runtime parameters are tensors, then ints, then floats,
    then constexprs). `prepare` fixes a launch's grid, ints, constexprs (every constexpr
    parameter, by name) and compile options (num_warps, num_stages, maxnreg; FIXED_OPTIONS
    added); the PreparedLaunch it returns takes the tensors and floats of each call."""

    def __init__(self, fn):
        self.fn = fn
        self._kernels: Dict[Tuple, Tuple] = {}  # key -> (launcher, function handle, packed metadata, kernel)
        self._prepared = 0  # PreparedLaunch tokens handed out (part of the cache key)
        # the interpreter's functions have no compiled kernels: always fn[grid] there
        self._direct = isinstance(fn, triton.runtime.JITFunction) and direct_launch_enabled()
        self._note = unsupported_version_note() if isinstance(fn, triton.runtime.JITFunction) else None
        if isinstance(fn, triton.runtime.JITFunction):
            names = fn.arg_names
            self._constexpr_names = tuple(names[i] for i in sorted(fn.constexprs))
            self._n_runtime = len(names) - len(self._constexpr_names)
            assert all(i >= self._n_runtime for i in fn.constexprs), "constexprs must follow the runtime arguments"

    def prepare(self, grid: Sequence[int], ints: Tuple[int, ...], constexprs: Dict[str, Any],
                options: Dict[str, int]) -> "PreparedLaunch":
        self._prepared += 1
        return PreparedLaunch(self, self._prepared, grid, ints, constexprs, {**options, **FIXED_OPTIONS})

    def forget(self) -> None:
        """Drop the kernels found for the launches prepared so far (Triton keeps its own cache)."""
        self._kernels.clear()


class PreparedLaunch:
    """A launch of a DirectLauncher's kernel with its grid, ints, constexprs and options fixed.
    Calling it with the tensors and floats launches: the compiled kernel is looked up by device,
    the tensors' dtypes and 16-byte alignment (what Triton specializes on besides the fixed
    values), found through JITFunction.run the first time."""

    __slots__ = ("launcher", "token", "grid", "ints", "constexprs", "options", "_consts", "_grid3")

    def __init__(self, launcher: DirectLauncher, token: int, grid, ints, constexprs, options):
        self.launcher, self.token = launcher, token
        self.grid, self.ints, self.constexprs, self.options = tuple(grid), tuple(ints), constexprs, options
        self._grid3 = (*self.grid, 1, 1)[:3]
        names = getattr(launcher, "_constexpr_names", ())
        self._consts = tuple(map(constexprs.__getitem__, names))

    def __call__(self, tensors: Sequence[torch.Tensor], floats: Tuple[float, ...]) -> None:
        launcher = self.launcher
        if not launcher._direct or _hooks_installed():
            if launcher._note is not None:
                _note_once(launcher._note)
            launcher.fn[self.grid](*tensors, *self.ints, *floats, **self.constexprs, **self.options)
            if RECORDING is not None and _this_thread_records():
                RECORDING.append((self, tuple(tensors), tuple(floats), None))
            return
        device = driver.active.get_current_device()
        key = (self.token, device, tuple([t.dtype for t in tensors]), tuple([t.data_ptr() % 16 == 0 for t in tensors]))
        entry = launcher._kernels.get(key)
        if entry is None:
            self._compile_and_launch(key, (*tensors, *self.ints, *floats))
            entry = launcher._kernels.get(key)
        else:
            run, function, metadata, _ = entry
            gx, gy, gz = self._grid3
            run(gx, gy, gz, driver.active.get_current_stream(device), function, metadata, None, None, None,
                *tensors, *self.ints, *floats, *self._consts)
        if RECORDING is not None and _this_thread_records():
            RECORDING.append((self, tuple(tensors), tuple(floats), entry))

    def _compile_and_launch(self, key, args) -> None:
        launcher = self.launcher
        assert len(args) == launcher._n_runtime, f"{launcher.fn}: expected {launcher._n_runtime} runtime arguments"
        kernel = launcher.fn[self.grid](*args, **self.constexprs, **self.options)
        if kernel is not None and not hasattr(kernel, "result"):  # not an async-compile future
            launcher._kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata, kernel)
