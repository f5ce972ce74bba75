"""Configs of the Triton split kernel (kernels/itc_split.py): the candidates, the table measured on a
GPU, and the choice for one call (read from the environment at each call, so that a benchmark or
a test can switch configs in one process).

A config spec is "BLOCK_M,BLOCK_N,BLOCK_D,KIND_AXIS,KT_LOAD,num_warps[,num_stages[,maxnreg[,LOGITS_T]]]"
(maxnreg 0: no cap; LOGITS_T: the logits computed transposed, kernels/itc_split.py:_logits_product).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Tuple

import triton
import triton.language as tl

__all__ = ["TUNED", "candidates", "config_spec", "launch_config", "launch_options", "make_config", "parse_config"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def candidates():
    """The candidate configs (autotune space with ALBEF_FAST_AUTOTUNE=1; the per-config table of
    benchmarks/triton_configs.py). From the H200 tables: one state per program (KIND_AXIS) with
    all of D = 256 in one block won for bf16, both states in 32-row programs for TF32; D in 64-
    or 128-wide blocks (logits recomputed per block) lost 2-5x at B = 512 and was dropped but for
    the B = 64 entry of TUNED (its outer key loop compiles to a synchronous load per tile: AOT,
    sm_90). ALBEF_FAST_CONFIGS="spec;spec" (specs as for ALBEF_FAST_CONFIG, read at import)
    replaces the list."""
    if os.environ.get("ALBEF_FAST_CONFIGS"):
        return [parse_config(spec) for spec in os.environ["ALBEF_FAST_CONFIGS"].split(";")]
    one_state = [make_config(64, 32, 256, 1, 0, 8), make_config(128, 32, 256, 1, 0, 8),
                 make_config(128, 32, 256, 1, 1, 8)]
    two_states = [make_config(32, 64, 256, 0, kt, 8) for kt in (0, 1)]
    blocked_d = [make_config(64, 64, 128, 1, 0, 8)]
    # not yet timed. Deeper pipelines: with 2 stages a program waits for each key tile it has just
    # asked for (async_wait num=0 in the TTGIR; 1 program per SM at ~170 registers, so nothing
    # hides the latency); 3-4 stages keep 1-2 more tiles in flight (num=1, 2).
    deeper = [make_config(64, 32, 256, 1, 0, 8, 3), make_config(64, 32, 256, 1, 0, 8, 4),
              make_config(64, 64, 256, 1, 0, 8, 3), make_config(64, 64, 256, 1, 0, 8, 4),
              make_config(128, 32, 256, 1, 0, 8, 4),  # 64 rows per warpgroup: no query re-read
              make_config(32, 64, 256, 0, 0, 8, 3)]
    # one warpgroup per program (with 8 warps on 64 rows both warpgroups read all of the query
    # tile from shared memory for each product): 237 registers x 128 threads and 86-102 KB of
    # shared memory, so two programs per SM; and 128 registers for two 8-warp programs per SM
    # (bf16: 40 B of spills)
    two_per_sm = [make_config(64, 32, 256, 1, 0, 4, 3), make_config(64, 32, 256, 1, 0, 4, 4),
                  make_config(64, 32, 256, 1, 0, 8, 3, 128)]
    # TF32 with wgmma for the key sums and no spills (the logits transposed), 2 stages of 32 keys
    # or 4 of 16 (190 registers, 184 KB; the 3-stage 32-key one exceeds shared memory at sm_90);
    # bf16 wgmma takes either operand major: TF32 only
    logits_t = [make_config(64, 32, 256, 1, 1, 8, 2, 0, 1), make_config(64, 16, 256, 1, 1, 8, 4, 0, 1)]
    # fp16 products of fp32 tiles ("f16s"): the transposed logits cut the spills of the 128-row
    # programs to 96 B (388 B without), 3-5 stages of 32 keys (164-229 KB): H200 run 6 (the
    # 5-stage one needs more shared memory than TF32 has: f16s only in practice)
    f16s = [make_config(128, 32, 256, 1, 0, 8, 5, 0, 1), make_config(128, 32, 256, 1, 0, 8, 3, 0, 1)]
    # and for their three-product form (f16x3, untimed): 64 rows, transposed logits: 96-192 B of
    # spills (sm_90a AOT; 870-2400 B for the others)
    f16s += [make_config(64, 32, 256, 1, 0, 8, 3, 0, 1), make_config(64, 16, 256, 1, 0, 8, 4, 0, 1)]
    return one_state + two_states + blocked_d + deeper + two_per_sm + logits_t + f16s


# Measured configs: precision -> [(largest B it was tuned for, ALBEF_FAST_CONFIG spec, waves)],
# the config with the least device time (graph replay) among the correct ones per (precision, B)
# of benchmarks/triton_configs.py on an H200, runs 4-6 (benchmarks/results/h200/triton_configs_nvidia_h200.csv);
# ALBEF_FAST_TUNED=path.json replaces it. bf16: 4 stages (B = 512: 128 rows, 0.43 ms, 3x the
# 2-stage 64-row config of run 3); f16s (fp32 features, "high": the default TF32-class path):
# B = 512 128 rows, 5 stages, transposed logits (1.04 ms; 96 B of spills against 388 without);
# tf32 (ALBEF_FAST_TF32=tf32rn) unchanged: its 4-stage 128-row config needs 288 KB of shared memory.
# f16x3 (fp32 "highest", key sums rounded per tile), f16x3p and f16p: on an H100, session 8
# (benchmarks/results/h100/run2_*, run1_*); the 128-row configs exceed its shared memory with pairs.
# f16p at B = 512: 2 waves, not the table's 4 (the same device time, 0.60 ms; launched 0.88 ms
# against 1.09: fewer splits to issue and merge). f16x3p at B = 64: the 4-warp config, not the
# table's 8-warp transposed-logits one (0.77 ms captured against 0.81), which is wrong with
# retrieval targets on the H100 (loss 2.9e-3 from fp64; f16x3 with it, and f16x3p with this one,
# pass: benchmarks/converted_pairs_probe.py, run 3).
TUNED: Dict[str, List[Tuple[int, str, float]]] = {
    "bf16": [(64, "64,32,256,1,0,4,4", 2.0), (512, "128,32,256,1,0,8,4", 2.0)],
    "tf32": [(64, "32,64,256,0,1,8,2", 2.0), (512, "32,64,256,0,1,8,2", 4.0)],
    "f16s": [(64, "64,32,256,1,0,4,3", 2.0), (512, "128,32,256,1,0,8,5,0,1", 2.0)],
    "f16x3": [(64, "64,32,256,1,0,4,3", 2.0), (512, "64,32,256,1,0,4,3", 4.0)],
    "f16x3p": [(64, "64,32,256,1,0,4,3", 2.0), (512, "64,32,256,1,0,4,3", 4.0)],
    "f16p": [(64, "64,32,256,1,0,4,3", 2.0), (512, "128,32,256,1,0,8,4", 2.0)],
}


def launch_config(b: int, dot_dtype, input_precision: str) -> Tuple[Optional[triton.Config], float]:
    """(config, waves) of a launch, read at each call; config None = autotune.

    ALBEF_FAST_CONFIG=<spec> forces one (the per-config table, tests), ALBEF_FAST_AUTOTUNE=1
    autotunes over candidates(),
    ALBEF_FAST_AUTOTUNE=0 takes the default config (tests that compile many shapes); else the
    TUNED entry for the smallest tuned B >= b (the largest B beyond them), else the default.
    ALBEF_FAST_WAVES overrides the programs per SM the splits aim at."""
    waves = float(os.environ.get("ALBEF_FAST_WAVES", "0")) or None
    if os.environ.get("ALBEF_FAST_CONFIG"):
        return parse_config(os.environ["ALBEF_FAST_CONFIG"]), waves or 2.0
    autotune = os.environ.get("ALBEF_FAST_AUTOTUNE", "")
    if autotune == "1" and not _INTERPRET:
        return None, waves or 2.0
    key = _table_key(dot_dtype, input_precision)
    entries = sorted(tuned_table().get(key, []))
    if _INTERPRET or autotune == "0" or not entries:
        return parse_config(_DEFAULT if _INTERPRET else _UNTUNED.get(key, _DEFAULT)), waves or 2.0
    _, spec, tuned_waves = next((e for e in entries if b <= e[0]), entries[-1])
    return parse_config(spec), waves or tuned_waves


def _table_key(dot_dtype, input_precision: str) -> str:
    """The TUNED entry of a launch: the scaled fp16 modes by name (their products are fp16, their
    tiles fp32; "f16p": f16s with converted key tiles), other half-precision products "bf16",
    rounded TF32 "tf32", else the precision."""
    if input_precision in ("f16s", "f16x3", "f16p", "f16x3p"):
        return input_precision
    if dot_dtype != tl.float32:
        return "bf16"
    return "tf32" if input_precision.startswith("tf32rn") else input_precision


# the default config (no tuned entry, ALBEF_FAST_AUTOTUNE=0): bf16's best at B = 512 on the H200
# (D = 256 in one block); small tiles under the interpreter
_DEFAULT = "16,16,16,0,0,1" if _INTERPRET else "64,32,256,1,0,8"
# the scaled fp16 modes where the table in use (ALBEF_FAST_TUNED) has no entry: their best on
# the H100 (f16x3: 64 rows, one warpgroup; the 16-key 8-warp config that had the fewest spills
# in the sm_90a AOT report ran B = 512 2.3x slower there)
_UNTUNED = {"f16x3": "64,32,256,1,0,4,3",
            # f16s with converted key tiles (kernels/itc.py:_prescaled) reads fp16 tiles as the bf16
            # path does: bf16's B = 512 config, f16p's best at B = 512 on the H100 too
            "f16p": "128,32,256,1,0,8,4",
            # and for f16x3 with converted pairs: see TUNED's f16x3p
            "f16x3p": "64,32,256,1,0,4,3"}


def tuned_table() -> Dict[str, List[Tuple[int, str, float]]]:
    path = os.environ.get("ALBEF_FAST_TUNED")
    if not path:
        return TUNED
    if path not in _TABLES:
        with open(path) as f:
            _TABLES[path] = {k: [tuple(e) for e in v] for k, v in json.load(f).items()}
    return _TABLES[path]


_TABLES: Dict[str, Dict[str, List[Tuple[int, str, float]]]] = {}


@functools.lru_cache(maxsize=None)
def parse_config(spec: str):
    return make_config(*(int(v) for v in spec.split(",")))


def config_spec(config) -> str:
    """The ALBEF_FAST_CONFIG string of a config."""
    m = config.kwargs
    fields = [m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_D"], m["KIND_AXIS"], m["KT_LOAD"], config.num_warps,
              config.num_stages]
    if m["LOGITS_T"]:
        fields += [config.maxnreg or 0, m["LOGITS_T"]]
    elif config.maxnreg:
        fields += [config.maxnreg]
    return ",".join(str(v) for v in fields)


def make_config(block_m, block_n, block_d, kind_axis, kt_load, num_warps, num_stages=2, maxnreg=0, logits_t=0):
    """KIND_AXIS: student and teacher in separate programs; KT_LOAD: the [BLOCK_N, BLOCK_D] key
    tile of the key-sum product loaded as such instead of transposed from the logits' tile;
    maxnreg (0: none) caps registers per thread, e.g. 128 for two 8-warp programs per SM;
    LOGITS_T: the logits product computed transposed (for TF32 wgmma, see kernels/itc_split.py:_logits_product)."""
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "KIND_AXIS": kind_axis, "KT_LOAD": kt_load,
            "LOGITS_T": logits_t}
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg or None)


def launch_options(config) -> Dict[str, int]:
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    return options
