"""The benchmark CLI runs end to end at a tiny shape and records CSV + PNG."""
import csv

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
