"""The GPU lease scripts (benchmarks/gpu_*.sh), checked without a GPU: they parse, their results come
back as the device tool can return them (at most 8 files in OUTDIR), and gpu_check.sh takes the
C++ call path only when all of its bit tests passed."""
import os
import subprocess
import tarfile

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPTS = ["benchmarks/gpu_check.sh", "benchmarks/gpu_bench.sh", "benchmarks/gpu_common.sh"]


def _bash(script: str, cwd: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    out = _bash(f"bash -n {script}", ROOT)
    assert out.returncode == 0, out.stderr


def test_results_come_back_as_two_files(tmp_path):
    """Every stamp packs the scratch folder into OUTDIR/results.tar.gz beside console.txt, however
    many files the stages wrote (the device tool drops all but 8)."""
    dest = tmp_path / "out"
    script = f"""
        OUT={dest}; NAME=test_pack
        source benchmarks/gpu_common.sh
        for k in $(seq 1 12); do echo "row $k" > "$OUT/file_$k.txt"; done
        mkdir -p "$OUT/tests" && echo log > "$OUT/tests/pytest_0.log"
        stamp "stage one"
        echo late > "$OUT/late.txt"
        stamp "done"
    """
    out = _bash(script, ROOT, {"TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(dest)) == ["console.txt", "results.tar.gz"]
    with tarfile.open(dest / "results.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
    expected = {f"file_{k}.txt" for k in range(1, 13)} | {"late.txt", "tests/pytest_0.log", "console.txt"}
    assert expected <= names
    assert "[test_pack +" in (dest / "console.txt").read_text()


def _gate(tmp_path, logs, expected: int) -> str:
    """cpp_launch_if_passed of gpu_check.sh over pytest -v logs."""
    for k, text in enumerate(logs):
        (tmp_path / f"pytest_{k}.log").write_text(text)
    script = f"""
        eval "$(sed -n '/^cpp_launch_if_passed()/,/^}}/p' benchmarks/gpu_check.sh)"
        CPP_EXPECTED={expected} cpp_launch_if_passed {tmp_path}
    """
    out = _bash(script, ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


CASE = "tests/test_cpp_launch.py::test_cpp_step_matches_the_python_path_on_cuda[{}] {}\n"
GRAPH = "tests/test_cpp_launch.py::test_cpp_step_replays_from_a_cuda_graph {}\n"


def test_cpp_path_only_when_every_bit_test_passed(tmp_path):
    passed = [CASE.format("a", "PASSED") + CASE.format("b", "PASSED"), CASE.format("c", "PASSED") + GRAPH.format("PASSED")]
    other = "tests/test_ops.py::test_opcheck_state_ops FAILED\n"  # not the C++ path's
    assert _gate(tmp_path, [passed[0] + other, passed[1]], 4) == "cpp"
    assert _gate(tmp_path, [passed[0], passed[1].replace("graph PASSED", "graph SKIPPED")], 4) == "direct"
    assert _gate(tmp_path, [passed[0].replace("[b] PASSED", "[b] FAILED"), passed[1]], 4) == "direct"
    assert _gate(tmp_path, [passed[0], ""], 4) == "direct"  # a worker stopped before its tests
    extra = "tests/test_cpp_launch.py::test_cpp_step_is_opt_in ERROR\n"  # any C++-path failure counts
    assert _gate(tmp_path, [passed[0] + extra, passed[1]], 4) == "direct"
    assert _gate(tmp_path, passed, 0) == "direct"  # no GPU: nothing expected


def _wanted(explore: str) -> set:
    """The explore stages gpu_check.sh's `want` picks for GPU_CHECK_EXPLORE=explore."""
    names = "profile probe table ncu b64 floor b256"
    script = f"""
        eval "$(sed -n '/^want()/,/^}}/p' benchmarks/gpu_check.sh)"
        for n in {names}; do want $n && echo $n; done; true
    """
    out = _bash(script, ROOT, {"GPU_CHECK_EXPLORE": explore})
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_explore_stages_by_name():
    every = {"profile", "probe", "table", "ncu", "b64", "floor", "b256"}
    assert _wanted("1") == every
    assert _wanted("b64,floor,b256") == {"b64", "floor", "b256"}
    assert _wanted("floor") == {"floor"} and _wanted("0") == set()
    assert _wanted("b6") == set()  # whole names only


def test_profile_settings_keep_commas(monkeypatch):
    """benchmarks/profile_step.py --settings: a group's settings are space-separated, so that
    values such as ALBEF_FAST_MERGE=8,16,32 arrive whole; the environment is restored after."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_step", os.path.join(ROOT, "benchmarks", "profile_step.py"))
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    monkeypatch.setenv("ALBEF_FAST_MERGE", "before")
    monkeypatch.delenv("ALBEF_FAST_FINISH", raising=False)
    with profile_step._settings("ALBEF_FAST_MERGE=16,16,16,3 ALBEF_FAST_FINISH=kernel"):
        assert os.environ["ALBEF_FAST_MERGE"] == "16,16,16,3" and os.environ["ALBEF_FAST_FINISH"] == "kernel"
    assert os.environ["ALBEF_FAST_MERGE"] == "before" and "ALBEF_FAST_FINISH" not in os.environ
