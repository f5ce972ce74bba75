"""python -m albef_fast.bench: eager ALBEF vs albef_fast, timed, memory-measured and recorded.

Default: the device found (CUDA if present, else CPU), ALBEF's shape B=64, Q=65536, D=256,
fp32, forward+backward, providers eager and albef_fast. Rows are printed, appended to
<out>/itc_<device>.csv with device, versions and date, and plotted to <out>/itc_<device>.png.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Dict, List

import torch

import albef_fast

from . import cases, measure, report, state_suites

SWEEP = cases.SWEEP_DEFAULT
SUITE_NAMES = ("itc", "ema", "enqueue")


def _at_least(least: int):
    """argparse type: an int >= least."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an int >= {least}, got {value}")
        return value
    return parse


def _batches(text: str) -> List[int]:
    """argparse type: comma-separated ints >= 1 (batch sizes)."""
    values = [_at_least(1)(v) for v in text.split(",") if v]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated ints >= 1, got none")
    return values


def _device(text: str) -> str:
    """argparse type: a device torch knows (cuda, cuda:1, cpu)."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cuda, cuda:1 or cpu, got {text!r}") from None
    return text


def _names(options):
    def parse(text: str) -> List[str]:
        names = [v for v in text.split(",") if v]
        bad = [v for v in names if v not in options]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(options)}")
        return names
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m albef_fast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch", type=_batches, default=[64], help="comma-separated batch sizes (default 64)")
    p.add_argument("--sweep", action="store_true", help=f"sweep B over {SWEEP}")
    p.add_argument("--queue", type=_at_least(1), default=65536, help="queue size Q (default 65536)")
    p.add_argument("--dim", type=_at_least(1), default=256, help="embedding dim D (default 256)")
    p.add_argument("--precision", type=_names(cases.PRECISIONS), default=["fp32"], help="fp32,tf32,bf16")
    p.add_argument("--mode", type=_names(cases.MODES), default=["fwd+bwd"], help="fwd,fwd+bwd")
    p.add_argument("--providers", type=_names(cases.PROVIDERS), default=["eager", "albef_fast"],
                   help="eager,compile,albef_fast")
    p.add_argument("--suite", type=_names(SUITE_NAMES), default=["itc"], help=",".join(SUITE_NAMES))
    p.add_argument("--reps", type=_at_least(1), default=10, help="timed repetitions on the CPU (default 10)")
    p.add_argument("--rounds", type=_at_least(1), default=1,
                   help="time the providers in turn this many times, each row the median round (default 1)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the CSV and PNG")
    p.add_argument("--tag", default="", help="suffix of the PNG's name (the CSV is shared)")
    p.add_argument("--label", default="", help="appended to albef_fast's provider name, e.g. for an A/B of a setting")
    p.add_argument("--no-plot", action="store_true", help="write the CSV rows but no PNG")
    p.add_argument("--no-save", action="store_true", help="print only; write no CSV or PNG")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if any(v.endswith("[graph]") for v in args.providers) and not device.startswith("cuda"):
        p.error("providers '...[graph]' replay CUDA graphs: they need --device cuda")
    return args


def run_itc(args, device: torch.device, progress) -> List[Dict]:
    rows = []
    batches = SWEEP if args.sweep else args.batch
    for precision in args.precision:
        for b in batches:
            case = cases.ITCCase(b, args.queue, args.dim, precision, device)
            for mode in args.mode:
                rows += _compare(case, mode, args, device, progress)
            del case
    return rows


def _compare(case, mode, args, device, progress) -> List[Dict]:
    """One row per provider, its time the median of args.rounds timings taken in turn (eager,
    albef_fast, eager, ...): where the host is the bottleneck and its speed drifts (the H200
    machine's did by up to 2x between minutes), each provider meets the same drift."""
    _, matmul = cases.PRECISIONS[case.precision]
    with measure.matmul_precision(matmul):
        steps = {}
        for provider in args.providers:
            try:
                steps[provider] = cases.step_fn(case, provider, mode)
                steps[provider]()  # compile / autotune outside the timing
            except RuntimeError as exc:  # e.g. a step that cannot be captured in a graph
                print(f"{provider} {case.precision} B={case.b}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
                steps.pop(provider, None)
                progress.update(1)
        timings = {provider: [] for provider in steps}
        for _ in range(args.rounds):
            for provider, step in steps.items():
                progress.set_description(f"itc {provider} {mode} {case.precision} B={case.b}")
                timings[provider].append(measure.time_ms(step, device, reps=args.reps))
        rows = [_itc_row(case, provider, mode, device, steps[provider], timings[provider]) for provider in steps]
    progress.update(len(rows))
    eager_ms = {r["provider"].endswith("[graph]"): r["median_ms"] for r in rows if r["provider"].startswith("eager")}
    for row in rows:  # graph rows are compared with eager[graph], the others with eager
        graph = row["provider"].endswith("[graph]")
        row["speedup_vs_eager"] = eager_ms[graph] / row["median_ms"] if graph in eager_ms else ""
        if row["provider"].startswith("albef_fast"):
            row["provider"] += args.label
    return rows


def _itc_row(case, provider, mode, device, step, timings) -> Dict:
    """The row of the round with the median time (median, p20, p80 of that round)."""
    med, p20, p80 = sorted(timings)[(len(timings) - 1) // 2]
    # a replayed graph allocates nothing (its pool was taken at capture): no peak to report
    peak = "" if provider.endswith("[graph]") else measure.peak_extra_mib(step, device)
    flops, nbytes = case.flops(mode), case.bytes()
    return dict(suite="itc", provider=provider, mode=mode, precision=case.precision, B=case.b, Q=case.q, D=case.d,
                median_ms=med, p20_ms=p20, p80_ms=p80, peak_extra_mib=peak, tflops=flops / med / 1e9,
                gbps=nbytes / med / 1e6, _flops=flops, _bytes=nbytes)


def add_roofline(rows: List[Dict], ceil: Dict[str, float]) -> None:
    """roofline_pct = max(bytes / copy bandwidth, flops / dot peak) / time, per row."""
    for row in rows:
        if "_flops" not in row:
            if "_bytes" in row:  # memory-bound rows (EMA): percent of the copy bandwidth
                row["roofline_pct"] = 100.0 * row["_bytes"] / ceil["copy_gbps"] / 1e6 / row["median_ms"]
            continue
        peak = ceil.get(f"{row['precision']}_tflops")
        if peak is None:
            row["roofline_pct"] = ""
            continue
        floor_ms = max(row["_bytes"] / ceil["copy_gbps"] / 1e6, row["_flops"] / peak / 1e9)
        row["roofline_pct"] = 100.0 * floor_ms / row["median_ms"]


SUITES = {"itc": run_itc, "ema": state_suites.run_ema, "enqueue": state_suites.run_enqueue}


def _versions() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "albef_fast": albef_fast.__version__}


def _count(args) -> int:
    per_suite = {"itc": len(SWEEP if args.sweep else args.batch) * len(args.precision) * len(args.mode)
                 * len(args.providers), "ema": len(state_suites.EMA_PROVIDERS),
                 "enqueue": len(state_suites.ENQUEUE_PROVIDERS)}
    return sum(per_suite.get(s, 0) for s in args.suite)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from tqdm import tqdm

    name = measure.device_name(device)
    print(f"albef_fast bench on {name}; torch {torch.__version__}", file=sys.stderr)
    ceil = measure.ceilings(device)
    print("ceilings: " + ", ".join(f"{k}={v:.4g}" for k, v in ceil.items()), file=sys.stderr)
    rows: List[Dict] = []
    with tqdm(total=_count(args), file=sys.stderr) as progress:
        for suite in args.suite:
            rows += SUITES[suite](args, device, progress)
    add_roofline(rows, ceil)
    stamp = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=name, **_versions())
    rows = [{**stamp, **row} for row in rows]
    print(report.table(rows))
    if not args.no_save:
        base = os.path.join(args.out, f"itc_{report.slug(name)}")
        report.append_csv(rows, base + ".csv")
        print(f"appended to {base}.csv", file=sys.stderr)
        if any(r["suite"] == "itc" for r in rows) and not args.no_plot:
            png = base + (f"_{report.slug(args.tag)}" if args.tag else "") + ".png"
            report.plot(rows, png, f"albef_fast ITC, Q={args.queue}, D={args.dim} on {name}")
            print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
