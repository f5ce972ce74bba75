"""The benchmark's outputs: a printed table, CSV rows (appended) and a PNG plot."""
from __future__ import annotations

import csv
import os
import re
from typing import Dict, List

COLUMNS = ["date", "device", "torch", "triton", "albef_fast", "suite", "provider", "mode", "precision", "B", "Q", "D",
           "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager", "peak_extra_mib", "tflops", "gbps", "roofline_pct"]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def table(rows: List[Dict]) -> str:
    cols = ["suite", "provider", "mode", "precision", "B", "median_ms", "speedup_vs_eager", "peak_extra_mib",
            "tflops", "gbps", "roofline_pct"]
    cells = [[_fmt(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def append_csv(rows: List[Dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plot(rows: List[Dict], path: str, title: str) -> None:
    """Time and peak extra memory against B, one line per (provider, mode, precision)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["suite"] == "itc"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["provider"], r["mode"], r["precision"]) for r in rows}):
        sel = sorted((r for r in rows if (r["provider"], r["mode"], r["precision"]) == key), key=lambda r: r["B"])
        label = " ".join(key)
        axes[0].plot([r["B"] for r in sel], [r["median_ms"] for r in sel], marker="o", label=label)
        mem = [r for r in sel if r["peak_extra_mib"] != ""]  # graph replays report none
        axes[1].plot([r["B"] for r in mem], [r["peak_extra_mib"] for r in mem], marker="o", label=label)
    for ax, ylabel in zip(axes, ["median time (ms)", "peak extra memory (MiB)"]):
        ax.set_xlabel("batch B")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
