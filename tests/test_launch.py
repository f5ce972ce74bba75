"""Direct launches of the compiled kernels agree with Triton's own JITFunction.run (no GPU needed).

tests/launch_check.py runs in a child process without TRITON_INTERPRET: a fake driver compiles
the kernels for sm_90 and records each launch, and every launch of the fused forward is issued
both ways; the direct path must pick the same compiled kernel and pass the same arguments.
"""
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from tests.helpers import run_fake_driver_check  # noqa: E402

CHECK = pathlib.Path(__file__).resolve().parent / "launch_check.py"


def test_direct_launch_matches_jit_run():
    result = run_fake_driver_check(CHECK)
    assert result["cases"] == 9 and result["kernels"] >= 9


def test_launch_falls_back_to_jit(monkeypatch):
    """Under the interpreter (this process on a GPU-less machine) or with ALBEF_FAST_LAUNCH=jit,
    launches go through fn[grid]."""
    from albef_fast.kernels import launch

    monkeypatch.setenv("ALBEF_FAST_LAUNCH", "jit")
    assert not launch.direct_launch_enabled()


def test_host_step_tool_runs():
    """benchmarks/host_step.py (the host time of a step, no GPU) runs and finds the three launches
    (split, merge with the finish; the backward's one)."""
    tool = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "host_step.py"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ALBEF_FAST_LAUNCH")}
    env["ALBEF_FAST_LAUNCH"] = "direct"  # the parts are the Python path's
    run = subprocess.run([sys.executable, str(tool), "--parts"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 Triton launches a step" in run.stdout and "backend (allocations and launches)" in run.stdout


def test_unsupported_triton_is_named(monkeypatch):
    """A compiled Triton that the direct launches were not checked with gets a note naming the
    version, the versions checked and the switch that takes the slow path knowingly; none under
    the interpreter, with ALBEF_FAST_LAUNCH=jit, or for a listed version."""
    import triton

    from albef_fast.kernels import launch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ALBEF_FAST_LAUNCH", raising=False)
    monkeypatch.setattr(launch, "SUPPORTED", ("3.1",))
    note = launch.unsupported_version_note()
    assert triton.__version__ in note and "(3.1)" in note and "ALBEF_FAST_LAUNCH=jit" in note
    monkeypatch.setattr(launch, "SUPPORTED", (triton.__version__.rsplit(".", 1)[0],))
    assert launch.unsupported_version_note() is None
    monkeypatch.setattr(launch, "SUPPORTED", ("3.1",))
    monkeypatch.setenv("ALBEF_FAST_LAUNCH", "jit")
    assert launch.unsupported_version_note() is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ALBEF_FAST_LAUNCH")
    assert launch.unsupported_version_note() is None


def test_unsupported_triton_warns_once(monkeypatch):
    """The note is a RuntimeWarning at the first launch through JITFunction.run, not at every one."""
    import warnings

    from albef_fast.kernels import launch

    calls = []

    class _Fn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    launcher = launch.DirectLauncher.__new__(launch.DirectLauncher)
    launcher.fn, launcher._direct, launcher._note = _Fn(), False, "albef_fast: a note for this test only"
    prepared = launch.PreparedLaunch(launcher, 1, (2,), (7,), {"BLOCK": 4}, {"num_warps": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared((), (0.5,))
        prepared((), (0.5,))
    assert [str(w.message) for w in caught] == [launcher._note] and caught[0].category is RuntimeWarning
    assert calls == [((2,), (7, 0.5), {"BLOCK": 4, "num_warps": 1})] * 2
