"""Run pytest in parallel worker processes (no pytest-xdist needed), for the GPU machine.

    python benchmarks/pytest_parallel.py --workers 12 --log-dir OUT [pytest selection ...]

On a GPU most of the Triton tests' time is compiling kernels (one variant per flag set, several
seconds of one CPU core each; a single pytest process ran out of its 60 s stage in H200 run 4).
This collects the selected tests, deals them round-robin to N `pytest` processes that share the
GPU and Triton's on-disk cache, and waits for all. --first REGEX deals the tests whose ids match
it first, so that each worker starts with them (the GPU-only tests: a deadline then cuts the
others). Each worker writes OUT/pytest_<k>.log (each test's time after its result, where pytest
has the "times" output style); the summary (each failed or errored test, then totals) goes to
stdout. --deadline S stops the workers still running after S seconds and reports the test each
was in, so that a stage limit never loses the summary; the tests they left without a result go
to OUT/no_result.txt (their ids as collected on this machine: the GPU tests' ids name the
device). Exit status 1 if any test failed or errored, or a worker died or was stopped.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import typing
from typing import List


def _collect(python: str, selection: List[str]) -> List[str]:
    out = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *selection],
                         capture_output=True, text=True)
    ids = [line for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if not ids:
        sys.exit(f"nothing collected (rc {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return ids


_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _summary(log: str):
    """(failed or errored tests, counts by result, the tests with a result) from the progress
    lines of one worker's -v log (there even when the worker was stopped before its final
    summary)."""
    bad, counts, done = [], {}, set()
    for line in open(log, errors="replace").read().splitlines():
        match = _RESULT.match(line)
        if match:
            test, result = match.groups()
            counts[result.lower()] = counts.get(result.lower(), 0) + 1
            done.add(test)
            if result in ("FAILED", "ERROR"):
                bad.append(f"{result} {test}")
    return bad, counts, done


def _first(ids: List[str], pattern: str) -> List[str]:
    """ids with those matching pattern (a regex, searched in each id) moved to the front, each
    part in its collected order."""
    if not pattern:
        return ids
    match = re.compile(pattern).search
    return [i for i in ids if match(i)] + [i for i in ids if not match(i)]


def _times_style() -> List[str]:
    """pytest's option for each test's time on its result line, where this pytest has it."""
    try:
        from _pytest.terminal import _ConsoleOutputStyle
    except ImportError:
        return []
    return ["-o", "console_output_style=times"] if "times" in typing.get_args(_ConsoleOutputStyle) else []


def _wait(procs, deadline: float) -> None:
    """Until all workers exit, or until the deadline (seconds; 0: none), then stop the rest."""
    end = time.monotonic() + deadline if deadline > 0 else float("inf")
    while any(proc.poll() is None for _, proc in procs) and time.monotonic() < end:
        time.sleep(0.5)
    for _, proc in procs:
        if proc.poll() is None:
            proc.terminate()


def _last_test(log: str) -> str:
    """The test a -v log was in: the last one it names (pytest prints the name, then the result)."""
    lines = [line for line in open(log, errors="replace").read().splitlines() if "::" in line]
    return lines[-1].split(" ")[0] if lines else "(none started)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--log-dir", default=".")
    parser.add_argument("--timeout", type=int, default=0, help="per-test limit (needs pytest-timeout)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds; then stop the workers still running")
    parser.add_argument("--first", default="", help="regex: the tests whose ids match it run first in every worker")
    args, selection = parser.parse_known_args()
    os.makedirs(args.log_dir, exist_ok=True)
    ids = _first(_collect(sys.executable, selection), args.first)
    groups = [ids[k :: args.workers] for k in range(min(args.workers, len(ids)))]
    extra = (["--timeout", str(args.timeout)] if args.timeout else []) + _times_style()
    procs = []
    for k, group in enumerate(groups):
        log = os.path.join(args.log_dir, f"pytest_{k}.log")
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *extra, *group]
        procs.append((log, subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)))
    print(f"{len(ids)} tests in {len(groups)} workers", flush=True)
    _wait(procs, args.deadline)
    status, totals, no_result = 0, {}, []
    for (log, proc), group in zip(procs, groups):
        rc = proc.wait()
        bad, counts, done = _summary(log)
        for line in bad:
            print(line)
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
        if rc < 0:
            print(f"worker {log}: stopped at the deadline in {_last_test(log)}")
            no_result += [test for test in group if test not in done]
        elif rc not in (0, 5) and not bad:  # 5: nothing ran; anything else with no failure listed: a crash
            print(f"worker {log}: exit {rc}, no failures listed (crashed?)")
        status |= int(rc not in (0, 5))
    if no_result:
        path = os.path.join(args.log_dir, "no_result.txt")
        with open(path, "w") as f:
            f.write("".join(test + "\n" for test in no_result))
        print(f"{len(no_result)} tests without a result (workers stopped at the deadline): {path}")
    print(", ".join(f"{n} {kind}" for kind, n in sorted(totals.items())) or "no results", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
