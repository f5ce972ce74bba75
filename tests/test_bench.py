"""The benchmark CLI runs end to end at a tiny shape and records CSV + PNG."""
import csv

import pytest

from albef_fast.bench import __main__ as bench
from albef_fast.bench import report


def test_bench_cli_writes_csv_and_plot(tmp_path, capsys):
    args = ["--device", "cpu", "--batch", "4,8", "--queue", "64", "--dim", "16", "--reps", "2", "--mode", "fwd,fwd+bwd",
            "--out", str(tmp_path)]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "albef_fast" in printed and "eager" in printed
    (csv_path,) = tmp_path.glob("itc_*.csv")
    (png_path,) = tmp_path.glob("itc_*.png")
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 2 * 2 * 2 and set(rows[0]) == set(report.COLUMNS)
    assert all(float(r["median_ms"]) > 0 and r["device"].startswith("CPU") for r in rows)
    assert {r["provider"] for r in rows} == {"eager", "albef_fast"}
    fast = [r for r in rows if r["provider"] == "albef_fast"]
    assert all(float(r["speedup_vs_eager"]) > 0 for r in fast)
    assert png_path.stat().st_size > 1000


def test_rounds_time_the_providers_in_turn_and_keep_the_median_round(tmp_path, monkeypatch, capsys):
    """--rounds 3: eager, albef_fast, eager, ... and each row is its provider's median round."""
    calls, times = [], iter([(5.0, 4.0, 6.0), (1.0, 0.9, 1.1), (9.0, 8.0, 10.0), (3.0, 2.9, 3.1),
                             (6.0, 5.5, 6.5), (1.5, 1.4, 1.6)])

    def fake_time_ms(step, device, reps):
        if "step_fn" not in step.__qualname__:  # the ceilings (copy bandwidth, matmul peak)
            return 1.0, 1.0, 1.0
        calls.append(step)
        return next(times)

    monkeypatch.setattr(bench.measure, "time_ms", fake_time_ms)
    args = ["--device", "cpu", "--batch", "4", "--queue", "64", "--dim", "16", "--rounds", "3", "--no-save"]
    assert bench.main(args) == 0
    assert len(calls) == 6 and calls[0::2] == [calls[0]] * 3 and calls[1::2] == [calls[1]] * 3
    assert calls[0] is not calls[1]
    printed = capsys.readouterr().out
    eager, fast = (line.split() for line in printed.splitlines() if line.strip().startswith("itc"))
    assert float(eager[5]) == 6.0 and float(fast[5]) == 1.5 and float(fast[6]) == 4.0  # rounds: 5 9 6 | 1 3 1.5
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


@pytest.mark.parametrize("args,message", [
    (["--batch", "0"], "--batch: expected an int >= 1, got 0"), (["--batch", ","], "--batch: expected comma"),
    (["--queue", "-1"], "--queue: expected an int >= 1"), (["--dim", "0"], "--dim: expected an int >= 1"),
    (["--reps", "1.5"], "--reps: expected an int >= 1, got '1.5'"), (["--device", "tpu"], "--device: expected a torch"),
])
def test_cli_names_a_bad_count_or_device_before_it_runs(args, message, capsys):
    """Each was a traceback from deep inside the run (a [0, 256] feature tensor, a negative
    dimension, torch.device's parse) after the ceilings had been measured."""
    with pytest.raises(SystemExit):
        bench.parse_args(args)
    assert message in capsys.readouterr().err


def _row(date, provider, precision, b, ms, mib=16.0, suite="itc", mode="fwd+bwd", pct=10.0):
    return dict(date=date, device="NVIDIA H200", suite=suite, provider=provider, mode=mode, precision=precision,
                B=b, median_ms=ms, peak_extra_mib=mib, roofline_pct=pct)


def test_targets_read_the_latest_side_by_side_rows(tmp_path, capsys):
    """albef_fast.bench.targets: per (precision, B) the latest invocation with both eager and an
    albef_fast provider (labels count, graph replays do not), the speed-up and memory limits of
    SPEC section 6, the EMA's share of copy bandwidth and the enqueue's time."""
    from albef_fast.bench import targets

    path = str(tmp_path / "itc.csv")
    report.append_csv([
        _row("2026-01-01T00", "eager", "tf32", 64, 1.2), _row("2026-01-01T00", "albef_fast", "tf32", 64, 0.5),
        _row("2026-01-02T00", "eager", "tf32", 64, 1.2), _row("2026-01-02T00", "albef_fast[cpp]", "tf32", 64, 0.14),
        _row("2026-01-03T00", "albef_fast", "tf32", 64, 0.9),  # no eager in that invocation: not a pair
        _row("2026-01-02T00", "eager", "bf16", 64, 1.1), _row("2026-01-02T00", "albef_fast[graph]", "bf16", 64, 0.09),
        _row("2026-01-02T00", "eager", "bf16", 512, 3.0), _row("2026-01-02T00", "albef_fast", "bf16", 512, 0.5, mib=70.0),
        _row("2026-01-02T00", "eager", "fp32", 512, 6.0), _row("2026-01-02T00", "albef_fast", "fp32", 512, 3.0),
        _row("2026-01-02T00", "albef_fast", "fp32", 411, 0.66, suite="ema", mode="update", pct=91.0),
        _row("2026-01-02T00", "albef_fast", "fp32", 64, 0.012, suite="enqueue", mode="step"),
    ], path)
    assert targets.main([path]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[2] + line.split()[3] if "itc" in line else line.split()[1]: line
             for line in out.splitlines() if line.startswith("  ")}
    assert lines["tf32B=64"].startswith("  MET") and "albef_fast[cpp] 0.140 ms: 8.57x" in lines["tf32B=64"]
    assert "no eager + albef_fast" in lines["bf16B=64"]  # only a graph replay
    assert lines["bf16B=512"].startswith("  not") and "6.00x" in lines["bf16B=512"]  # 70 MiB > 64
    assert lines["fp32B=512"].startswith("  MET") and "2.00x" in lines["fp32B=512"]
    assert lines["ema"].startswith("  MET") and lines["enqueue"].startswith("  not")
    assert out.strip().endswith("3 of 8 met")
    assert targets.main([path, "--since", "2026-01-03"]) == 0  # the later rows alone: no pair anywhere
    assert capsys.readouterr().out.strip().endswith("0 of 8 met")


@pytest.mark.parametrize("content,message", [(None, "cannot read"), ("a,b\n1,2\n", "is not a benchmark CSV (no date")])
def test_targets_names_a_file_that_is_not_a_benchmark_csv(tmp_path, content, message, capsys):
    """A missing file or another CSV: an argparse error naming it (was FileNotFoundError / KeyError)."""
    from albef_fast.bench import targets

    path = tmp_path / "rows.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        targets.main([str(path)])
    assert message in capsys.readouterr().err
