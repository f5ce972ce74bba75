"""Per-config table of the Triton ITC kernels: every autotune candidate timed on its own.

    python benchmarks/triton_configs.py --out OUTDIR [--batch 64,512] [--precision tf32,bf16]

For each (precision, B) at Q=65536, D=256 (ALBEF's shapes) it times eager ALBEF and albef_fast's
fwd+bwd with each config forced (ALBEF_FAST_CONFIG), checks each result against fp64 (the
tolerance rule of SPEC section 5: error <= 2 x eager's in the same precision + 1e-5), then times
the fastest configs again at other split counts (ALBEF_FAST_WAVES). Configs are compiled first in
parallel worker processes (Triton's on-disk cache), so the serial timing loop pays no compiles.
Writes OUTDIR/triton_configs_<gpu>.csv and prints the table, fastest first. A --configs entry
"spec@NAME=VALUE[@NAME=VALUE]" times the spec with those settings too (an A/B of a setting in the
same table, e.g. "64,32,256,1,0,4,3@ALBEF_FAST_STAGE_ROWS=0"); such rows never become tuned entries.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import multiprocessing
import os
import pathlib
import sys
from typing import Dict, List, Tuple

import torch

from albef_fast import reference
from albef_fast.bench.cases import ITCCase, graphed
from albef_fast.bench.measure import device_name, environment, matmul_precision, time_ms
from albef_fast.bench.report import slug

# name -> (torch float32 matmul precision, environment). f16s: "high" with fp16 products of
# scaled operands (the default for "high"; f16p: the operands converted by a kernel of their own
# first, experimental); tf32: TF32 products, operands rounded to nearest;
# tf32t: truncated by the hardware (fails the error rule); fp32: "highest" on the Triton path
# (fp32 FMA dots), fp32x3: with 3 TF32 products per dot, f16x3: with 3 fp16 products of scaled
# (hi, lo) pairs (the default for "highest" since session 8). tf32t and fp32x3 are timed for a
# few configs only.
PRECISIONS = {"tf32": ("high", {"ALBEF_FAST_TF32": "tf32rn"}), "bf16": ("highest", {}),
              "fp32": ("highest", {"ALBEF_FAST_FP32_DOT": "ieee"}),
              "tf32t": ("high", {"ALBEF_FAST_TF32": "tf32"}),
              "f16s": ("high", {"ALBEF_FAST_TF32": "f16s"}),  # TF32-class products through scaled fp16
              "f16p": ("high", {"ALBEF_FAST_TF32": "f16p"}),  # the same, operands converted once per call
              "f16x3": ("highest", {"ALBEF_FAST_FP32_DOT": "f16x3"}),  # fp32-class: 3 fp16 products
              "f16x3p": ("highest", {"ALBEF_FAST_FP32_DOT": "f16x3p"}),  # the same, pairs converted first
              "fp32x3": ("highest", {"ALBEF_FAST_FP32_DOT": "tf32x3"})}
VARIANT_SPECS = ["32,64,256,0,1,8,2", "32,64,256,0,0,8,2", "64,32,256,1,0,8,2", "64,32,256,1,1,8,2,0,1"]
TUNED_PRECISIONS = ("bf16", "f16s", "f16p", "tf32", "f16x3", "f16x3p")  # the table's keys (kernels/itc_configs.py:TUNED)


def _entry(entry: str) -> Tuple[str, Dict[str, str]]:
    """(ALBEF_FAST_CONFIG spec, settings) of a --configs entry "spec[@NAME=VALUE...]"."""
    spec, *settings = entry.split("@")
    env = dict(s.split("=", 1) for s in settings)
    return spec, dict(env, ALBEF_FAST_CONFIG=spec)


def _specs_for(precision: str, specs: List[str]) -> List[str]:
    """The configs timed for a precision: all for fp32 tiles with tensor-core products (tf32,
    f16s, f16x3); all but the transposed-logits ones (a fix for fp32 tiles, LOGITS_T = 9th field)
    for bf16; a few for the variants."""
    if precision in ("tf32", "f16s", "f16p", "f16x3", "f16x3p"):
        return specs
    if precision == "bf16":
        return [s for s in specs if _entry(s)[0].split(",")[8:9] != ["1"]]
    return [s for s in specs if _entry(s)[0] in VARIANT_SPECS]


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", default="64,512")
    p.add_argument("--queue", type=int, default=65536)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--precision", default="tf32,bf16")
    p.add_argument("--configs", default="", help="';'-separated ALBEF_FAST_CONFIG specs (default: the autotune space)")
    # more programs per SM won at B = 512 on the H200 (waves 4 over 2 over 1)
    p.add_argument("--waves", default="4,8", help="split counts tried again for the 2 fastest configs")
    p.add_argument("--jobs", type=int, default=12, help="parallel compile workers (0: compile while timing)")
    p.add_argument("--tuned", default="", help="write the fastest correct config per (precision, B) here (JSON, "
                                                "the format of ALBEF_FAST_TUNED / kernels.itc_configs.TUNED)")
    return p.parse_args()


def _specs(args) -> List[str]:
    if args.configs:
        return args.configs.split(";")
    from albef_fast.kernels import itc_configs

    return [itc_configs.config_spec(c) for c in itc_configs.candidates()]


def _case(args, b: int, precision: str) -> ITCCase:
    torch.manual_seed(b)
    return ITCCase(b, args.queue, args.dim, "bf16" if precision == "bf16" else "fp32", torch.device(args.device))


def _loss_and_grads(fn, case: ITCCase, dtype=None) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    a = cast(case.image_feat).detach().requires_grad_(True)
    b = cast(case.text_feat).detach().requires_grad_(True)
    temp = cast(case.temp.detach()).requires_grad_(True)
    loss = fn(a, b, cast(case.image_feat_m), cast(case.text_feat_m), cast(case.image_queue), cast(case.text_queue),
              temp, 0.4)
    return loss.detach(), torch.autograd.grad(loss, (a, b, temp))


def _rel_err(got, ref) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _errors(fn, case, ref) -> List[float]:
    loss, grads = _loss_and_grads(fn, case)
    return [_rel_err(loss, ref[0])] + [_rel_err(g, r) for g, r in zip(grads, ref[1])]


def _step(fn, case: ITCCase):
    def step():
        a = case.image_feat.detach().requires_grad_(True)
        b = case.text_feat.detach().requires_grad_(True)
        loss = fn(a, b, case.image_feat_m, case.text_feat_m, case.image_queue, case.text_queue, case.temp, 0.4)
        loss.backward()

    return step


def _albef_fast(*a):
    import albef_fast

    return albef_fast.itc_loss(*a, backend="triton")


def _torch_backend(*a):
    import albef_fast

    return albef_fast.itc_loss(*a, backend="torch")


def _warm(spec: str, args) -> Dict[str, str]:
    """Worker: compile one config for every case (on-disk cache); precision -> error text."""
    os.environ.update(_entry(spec)[1])
    errors = {}
    for precision in args.precision.split(","):
        if spec not in _specs_for(precision, [spec]):
            continue
        try:
            for b in (int(v) for v in args.batch.split(",")):
                with matmul_precision(PRECISIONS[precision][0]), environment(PRECISIONS[precision][1]):
                    _step(_albef_fast, _case(args, b, precision))()
            if args.device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (reported in the table: e.g. out of shared memory)
            errors[precision] = _error_text(exc)
    return errors


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _compile_all(args, specs: List[str]) -> Dict[Tuple[str, str], str]:
    """Compile every config in parallel workers; (spec, precision) -> error of those that failed."""
    failed: Dict[Tuple[str, str], str] = {}
    if args.jobs <= 0:
        return failed
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(args.jobs, len(specs)), mp_context=ctx) as pool:
        for spec, errors in zip(specs, pool.map(_warm, specs, [args] * len(specs))):
            for precision, err in errors.items():
                failed[(spec, precision)] = err
                print(f"config {spec} ({precision}): {err}", flush=True)
    return failed


def _measure(fn, case, ref, eager_err, reps) -> Dict[str, object]:
    """Errors against fp64, the launched step's time (ms) and, on CUDA, the time of the step
    replayed from a CUDA graph (ms_graph: device time; at B = 64 the host's launch time hides the
    differences between configs, which the first H200 table could not rank)."""
    errs = _errors(fn, case, ref)
    ok = all(e <= 2 * ee + 1e-5 for e, ee in zip(errs, eager_err))
    step = _step(fn, case)
    ms = time_ms(step, case.device, reps=reps)
    graph_ms = time_ms(graphed(step, case.device), case.device, reps=reps)[0] if case.device.type == "cuda" else ms[0]
    return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "ms_graph": graph_ms, "err_loss": errs[0],
            "err_grad": max(errs[1:3]), "err_temp": errs[3], "ok": ok}


def main():
    args = _parse()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = _specs(args)
    failed = _compile_all(args, specs)
    dev = torch.device(args.device)
    gpu = device_name(dev)
    rows = []
    path = out / f"triton_configs_{slug(gpu)}.csv"
    for precision in args.precision.split(","):
        for b in (int(v) for v in args.batch.split(",")):
            block = _case_rows(args, precision, b, specs, failed, gpu)
            _print_table(block)
            rows += block
            _save(rows, path, args.tuned)  # after each block: a stage timeout keeps what was measured
    print(f"wrote {path}")
    print("tuned:", json.dumps(_tuned(rows)))


def _save(rows: List[dict], path: pathlib.Path, tuned: str) -> None:
    _write_csv(rows, path)
    if tuned:
        pathlib.Path(tuned).write_text(json.dumps(_tuned(rows)))


def _case_rows(args, precision: str, b: int, specs: List[str], failed, gpu: str) -> List[dict]:
    """Rows of one (precision, B): eager, (the torch backend for fp32), every config at the
    default split count, then the two fastest correct ones at the other split counts."""
    case = _case(args, b, precision)
    reps = 10 if case.device.type == "cuda" else 2
    mm_precision, env = PRECISIONS[precision]
    base = dict(gpu=gpu, torch=torch.__version__, precision=precision, B=b, Q=args.queue, D=args.dim)
    rows = []
    with matmul_precision(mm_precision), environment(env):
        ref = _loss_and_grads(reference.itc_loss, case, torch.float64)
        eager_err = _errors(reference.itc_loss, case, ref)
        eager = _measure(reference.itc_loss, case, ref, eager_err, reps)
        rows.append(dict(base, config="eager", waves="", **eager))
        if precision.startswith("fp32"):  # the default fp32 path on CUDA, for comparison
            rows.append(_row(base, "torch-backend", "", eager, lambda: _measure(_torch_backend, case, ref, eager_err,
                                                                               reps)))
        timed = []
        for spec in _specs_for(precision, specs):
            if (spec, precision) in failed:
                rows.append(dict(base, config=spec, waves=2, ms=float("nan"), ok=failed[(spec, precision)]))
                continue
            with environment(_entry(spec)[1]):
                timed.append(_row(base, spec, 2, eager, lambda: _measure(_albef_fast, case, ref, eager_err, reps)))
        # the two with the least device time (graph replay: at B = 64 launched times are the host's)
        fastest = sorted((r for r in timed if r["ok"] is True), key=lambda r: r["ms_graph"])[:2]
        for r in fastest:
            for waves in (w for w in args.waves.split(",") if w):
                with environment(dict(_entry(r["config"])[1], ALBEF_FAST_WAVES=waves)):
                    timed.append(_row(base, r["config"], waves, eager,
                                      lambda: _measure(_albef_fast, case, ref, eager_err, reps)))
        rows += timed
    return rows


def _row(base: dict, config: str, waves, eager: dict, measure) -> dict:
    """A table row of one measurement; a config that fails at run time gets its error as `ok`.
    Printed at once too (a stage limit that cuts the block short keeps what was measured)."""
    try:
        r = measure()
    except Exception as exc:  # noqa: BLE001
        print(f"  measured {config} waves {waves}: failed: {_error_text(exc)}", flush=True)
        return dict(base, config=config, waves=waves, ms=float("nan"), ok=_error_text(exc))
    print(f"  measured {config} waves {waves}: {r['ms']:.4f} | {r['ms_graph']:.4f} ms, err {r['err_grad']:.1e}, "
          f"ok={r['ok']}", flush=True)
    return dict(base, config=config, waves=waves, speedup=eager["ms"] / r["ms"],
                speedup_graph=eager["ms_graph"] / r["ms_graph"], **r)


def _write_csv(rows: List[dict], path: pathlib.Path) -> None:
    fields = ["gpu", "torch", "precision", "B", "Q", "D", "config", "waves", "ms", "ms_p20", "ms_p80", "speedup",
              "ms_graph", "speedup_graph", "err_loss", "err_grad", "err_temp", "ok"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _tuned(rows) -> Dict[str, list]:
    """precision -> [[B, spec, waves]] of the config with the least device time (graph replay)
    that passed the error rule (bf16, f16s (the default for "high"), tf32 with rounded operands,
    and f16x3 (fp32-class fp16 products); not the variants tf32t / fp32 / fp32x3)."""
    best: Dict[Tuple[str, int], dict] = {}
    for r in rows:
        if ("," not in r["config"] or "@" in r["config"] or r["ok"] is not True
                or r["precision"] not in TUNED_PRECISIONS):
            continue  # eager / torch-backend rows, settings' A/B rows, failures, the variants of PRECISIONS
        key = (r["precision"], r["B"])
        if key not in best or r["ms_graph"] < best[key]["ms_graph"]:  # device time decides
            best[key] = r
    table: Dict[str, list] = {}
    for (precision, b), r in sorted(best.items()):
        table.setdefault(precision, []).append([b, r["config"], float(r["waves"])])
    return table


def _print_table(rows):
    """One (precision, B): eager first, then by device time (graph replay)."""
    rows = sorted(rows, key=lambda r: (r["config"] != "eager", r.get("ms_graph", float("nan")) if r["ms"] == r["ms"]
                                       else 1e9))
    print(f"\n{rows[0]['precision']} B={rows[0]['B']}  (config = BLOCK_M,BLOCK_N,BLOCK_D,KIND_AXIS,KT_LOAD,warps,"
          f"stages[,maxnreg[,LOGITS_T]]; launched | graph replay)")
    for r in rows:
        if r["ms"] != r["ms"]:
            print(f"  {r['config']:<22} waves {str(r['waves']):<3} failed: {r['ok']}", flush=True)
            continue
        speed = f"{r.get('speedup', 1.0):5.2f}x | {r.get('ms_graph', float('nan')):8.4f} ms {r.get('speedup_graph', 1.0):5.2f}x"
        print(f"  {r['config']:<22} waves {str(r['waves']):<3} {r['ms']:8.4f} ms {speed}  err {r['err_grad']:.1e}"
              f"  ok={r['ok']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
