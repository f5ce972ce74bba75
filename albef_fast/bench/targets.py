"""SPEC section 6's targets read off a benchmark CSV (the rows `python -m albef_fast.bench` appends).

    python -m albef_fast.bench.targets benchmarks/results/itc_nvidia_h200.csv [--since 2026-11-28T10]

ITC fwd+bwd against eager in the same precision, per (precision, B): the rows of the latest
benchmark invocation (one `date` stamp) that measured both eager and an albef_fast provider there
(`albef_fast[cpp]` and other labels count as albef_fast), the speed-up target, the extra-memory
limit and the row's percent of the roofline floor. Then the EMA (percent of the copy bandwidth)
and the enqueue (time). Only launched rows: "[graph]" replays are not what the targets measure.
Prints one line per target and how many are met; a target with no rows says so.
"""
from __future__ import annotations

import argparse
import csv
import sys
from typing import Dict, List, Optional, Tuple

# (precision, B) -> minimum speed-up over eager ALBEF; B -> extra-memory limit in MiB
SPEEDUP = {("fp32", 64): 2.5, ("tf32", 64): 8.0, ("bf16", 64): 8.0,
           ("fp32", 512): 1.5, ("tf32", 512): 4.0, ("bf16", 512): 4.0}
MEMORY_MIB = {64: 32.0, 512: 64.0}
EMA_COPY_PCT = 90.0
ENQUEUE_US = 10.0


def _is_fast(provider: str) -> bool:
    return provider.startswith("albef_fast") and not provider.endswith("[graph]")


def itc_pair(rows: List[Dict], precision: str, b: int) -> Optional[Tuple[Dict, Dict]]:
    """(eager row, albef_fast row) of the latest invocation that measured both, or None."""
    mine = [r for r in rows if r["suite"] == "itc" and r["mode"] == "fwd+bwd" and r["precision"] == precision
            and int(r["B"]) == b]
    for date in sorted({r["date"] for r in mine}, reverse=True):
        eager = [r for r in mine if r["date"] == date and r["provider"] == "eager"]
        fast = [r for r in mine if r["date"] == date and _is_fast(r["provider"])]
        if eager and fast:
            return eager[0], fast[-1]
    return None


def itc_lines(rows: List[Dict]) -> List[Tuple[bool, str]]:
    out = []
    for (precision, b), target in SPEEDUP.items():
        pair = itc_pair(rows, precision, b)
        if pair is None:
            out.append((False, f"itc {precision:4s} B={b:<4d} no eager + albef_fast fwd+bwd rows"))
            continue
        eager, fast = pair
        speedup = float(eager["median_ms"]) / float(fast["median_ms"])
        memory = float(fast["peak_extra_mib"] or "nan")
        met = speedup >= target and memory <= MEMORY_MIB[b]
        out.append((met, f"itc {precision:4s} B={b:<4d} eager {float(eager['median_ms']):.3f} ms, {fast['provider']} "
                         f"{float(fast['median_ms']):.3f} ms: {speedup:.2f}x (target {target:g}x), "
                         f"{memory:.1f} MiB (<= {MEMORY_MIB[b]:g}), roofline {_pct(fast)} [{fast['date']}]"))
    return out


def state_lines(rows: List[Dict]) -> List[Tuple[bool, str]]:
    out = []
    ema = [r for r in rows if r["suite"] == "ema" and _is_fast(r["provider"])]
    if ema:
        best = max(ema, key=lambda r: (r["date"], float(r["roofline_pct"] or 0)))
        pct = float(best["roofline_pct"] or 0)
        out.append((pct >= EMA_COPY_PCT, f"ema {best['provider']} {float(best['median_ms']):.3f} ms: {pct:.1f}% of "
                                         f"copy bandwidth (target {EMA_COPY_PCT:g}%) [{best['date']}]"))
    else:
        out.append((False, "ema: no albef_fast rows"))
    enq = [r for r in rows if r["suite"] == "enqueue" and _is_fast(r["provider"])]
    if enq:
        last = max(enq, key=lambda r: r["date"])
        us = float(last["median_ms"]) * 1e3
        out.append((us <= ENQUEUE_US, f"enqueue {us:.1f} us (target <= {ENQUEUE_US:g} us) [{last['date']}]"))
    else:
        out.append((False, "enqueue: no albef_fast rows"))
    return out


def _pct(row: Dict) -> str:
    return f"{float(row['roofline_pct']):.0f}%" if row.get("roofline_pct") else "n/a"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--since", default="", help="only rows whose date stamp is >= this (ISO prefix)")
    args = p.parse_args(argv)
    try:
        with open(args.csv, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("date", "device", "suite", "provider") if c not in (reader.fieldnames or [])]
            if missing:
                p.error(f"csv: {args.csv} is not a benchmark CSV (no {', '.join(missing)} column)")
            rows = [r for r in reader if r["date"] >= args.since]
    except OSError as err:
        p.error(f"csv: cannot read {args.csv}: {err.strerror}")
    devices = sorted({r["device"] for r in rows})
    lines = itc_lines(rows) + state_lines(rows)
    print(f"SPEC section 6 targets, {args.csv} ({', '.join(devices) or 'no rows'})")
    for met, text in lines:
        print(f"  {'MET ' if met else 'not '} {text}")
    print(f"{sum(met for met, _ in lines)} of {len(lines)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
