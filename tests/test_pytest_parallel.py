"""benchmarks/pytest_parallel.py, the GPU scripts' test runner: results gathered from every
worker, a failure reported, and a deadline that stops a worker but keeps what it finished."""
import os
import subprocess
import sys
import textwrap

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "pytest_parallel.py")
TESTS = textwrap.dedent("""
    import time
    import pytest

    @pytest.mark.parametrize("i", range(5))
    def test_numbers(i):
        assert i != 3

    def test_skipped():
        pytest.skip("not here")

    def test_slow():
        time.sleep(60)
""")


def _run(tmp_path, *args):
    (tmp_path / "test_sample.py").write_text(TESTS)
    return subprocess.run([sys.executable, SCRIPT, "--log-dir", str(tmp_path / "logs"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_failures_and_totals_from_all_workers(tmp_path):
    out = _run(tmp_path, "--workers", "3", "test_sample.py", "-k", "not slow")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "6 tests in 3 workers" in out.stdout
    assert "FAILED test_sample.py::test_numbers[3]" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "1 failed, 4 passed, 1 skipped"
    assert len(os.listdir(tmp_path / "logs")) == 3


def test_deadline_keeps_the_finished_results(tmp_path):
    out = _run(tmp_path, "--workers", "2", "--deadline", "10", "test_sample.py")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "stopped at the deadline in test_sample.py::test_slow" in out.stdout
    assert "1 tests without a result" in out.stdout
    assert (tmp_path / "logs" / "no_result.txt").read_text() == "test_sample.py::test_slow\n"
    assert "FAILED test_sample.py::test_numbers[3]" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "1 failed, 4 passed, 1 skipped"


def test_first_tests_lead_every_worker(tmp_path):
    out = _run(tmp_path, "--workers", "2", "--first", r"numbers\[[34]\]|skipped", "test_sample.py", "-k", "not slow")
    assert out.returncode == 1, out.stdout + out.stderr
    firsts = []
    for k in range(2):
        lines = (tmp_path / "logs" / f"pytest_{k}.log").read_text().splitlines()
        firsts.append(next(line.split(" ")[0] for line in lines if line.startswith("test_sample.py::")))
    assert firsts == ["test_sample.py::test_numbers[3]", "test_sample.py::test_numbers[4]"]
    assert out.stdout.strip().splitlines()[-1] == "1 failed, 4 passed, 1 skipped"
