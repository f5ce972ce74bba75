"""Fused ITC kernels, host side: one pass over [in-batch keys ; queue] gives the loss, dq and dT.

Two launches per call (more with f16p, below), both directions in each (SPEC section 3); this
module plans and launches them, the kernels are in their own files:

_itc_split_fwd_kernel   (kernels/itc_split.py) grid (row blocks, key splits, 2 directions x D
    blocks). Each program streams its share of the keys once, computing student logits u . k
    (and teacher logits u_m . k from the same loaded tile) in base 2 (log2(e) / T folded into one
    scale), and keeps online-softmax states: running max, Z, A = sum 2^(s - max) k over its D
    block, plus the hard-target sum H = sum [id_j == id_r] k and count for retrieval targets.
_itc_merge_fwd_kernel   (kernels/itc_merge.py) grid (row blocks, D blocks, 2 directions).
    Combines the splits in one pass, in a fixed order (deterministic: no atomics; CHUNK running
    states, then those in one), rescaling as the split kernel's online softmax does:
    G = A_s / Z_s - alpha A_m / Z_m - (1 - alpha) H / n,
    dq = G / (2 T B) (of the mean of the two directions' losses), and partial dot products of
    u = q / T with the key means over its D block. Its last program (a ticket, zeroed by the
    split kernel) sums the partials in order and gives the means of the loss, dT, ce and kl rows
    per direction and the mean loss (all scalars are dots with u: see albef_fast/streaming.py);
    ALBEF_FAST_FINISH=kernel leaves that to a third launch, _itc_finish_fwd_kernel, grid (1,).
_itc_keys_fwd_kernel    (kernels/itc_convert.py; f16p / f16x3p only: _prescaled) before the
    split, a chunk of keys at a time: the key tiles and query rows in their scaled fp16 form.
The tile loads and the product operands of each precision mode: kernels/itc_operands.py.

Queues are read in place through their strides ([D, Q] as ALBEF stores them); in-batch keys
[B, D] go through the same tile loader with their strides swapped.

Products (_dot_flags): bf16 / fp16 features as they are; fp32 features by precision: "high"
fp16 products of operands scaled by powers of two ("f16s", TF32's 11 significant bits; see
_f16_scales; ALBEF_FAST_TF32=tf32rn: TF32 products; f16p, the default from B = 512: the same
values, the operands converted before the split kernel), "highest" three fp16 products of
(hi, lo) pairs, 22 bits ("f16x3"; ALBEF_FAST_FP32_DOT=ieee: fp32 FMA products; f16x3p: the pairs
converted before the split kernel), "medium" bf16.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton.language as tl

from . import launch
from .itc_configs import launch_config, launch_options
from .itc_convert import _itc_keys_fwd_kernel
from .itc_merge import _itc_finish_fwd_kernel, _itc_merge_fwd_kernel
from .itc_split import _cdiv, _itc_split_fwd_kernel, _kind_heuristics, _split_grid
from .launch import FIXED_OPTIONS, DirectLauncher, PreparedLaunch

__all__ = ["itc_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
WORKSPACE_BYTES = 24 << 20  # the key sums' scratch (ws_acc): SPEC section 6 allows 32 MiB in all at B = 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: enough splits to exercise the merge
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_count(b: int, q: int, d: int, teacher: bool, n_sums: int, device: torch.device, config, waves: float) -> int:
    """Key splits for about `waves` programs per SM with the config's tiles
    (the nominal 64-row, 64-wide-D, both-kinds tiles when autotuning), at most one key tile each;
    ALBEF_FAST_SPLITS fixes the count (tests that compare configs bit for bit). The key sums'
    workspace stays within WORKSPACE_BYTES (the extra-memory budget of SPEC section 6)."""
    if os.environ.get("ALBEF_FAST_SPLITS"):
        return int(os.environ["ALBEF_FAST_SPLITS"])
    if config is None:
        block_m, block_d, kinds = 64, 64, 1
    else:
        meta = config.kwargs
        block_m, block_d, kinds = meta["BLOCK_M"], meta["BLOCK_D"], 2 if meta["KIND_AXIS"] and teacher else 1
    per_split = _cdiv(b, block_m) * kinds * 2 * _cdiv(d, block_d)
    min_block_n = 16 if _INTERPRET else 32
    max_tiles = _cdiv(b, min_block_n) + _cdiv(max(q, 1), min_block_n)
    max_workspace = WORKSPACE_BYTES // (2 * n_sums * b * d * 4)  # ws_acc [2, n_sums, S, B, D] fp32
    return max(1, min(max_tiles, max_workspace, math.ceil(waves * _num_sms(device) / per_split)))


def _merge_blocks(b: int, d: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_D, CHUNK, STAGES, WARPS) of the merge: small tiles, so that B = 64 still
    spreads over many SMs, CHUNK splits loaded at once, each into its own running state (the
    interpreter: 2, to cover partial chunks), the loop's loads not pipelined (STAGES 1), 4 warps.
    ALBEF_FAST_MERGE="BLOCK_M,BLOCK_D,CHUNK[,STAGES[,WARPS]]" (powers of two; STAGES >= 1)
    replaces them. Leads for B = 64 (untimed since the merge's slots, session 16): "8,16,32" (twice
    the programs, 3 rounds of loads instead of 5 at ~66 splits; 2 us faster than the default in
    H200 run 7, one sample, with the merge of before the slots), "16,16,16,3" (each round's 20
    loads issued two rounds ahead as cp.async into shared memory, 2 barriers a round against 8,
    40 exp2 against 8: the weights computed where the key sums are instead of moved there
    through shared memory; 198 registers, no spills, 72 KB shared; session 18) and
    "16,16,16,1,8" (8 warps: one program an SM at B = 64 either way, with half the instructions
    a thread, 169 a round against 296 and 890 against 1559 from the loop to the ticket, 116
    registers; session 19). sm_90a AOT, Triton 3.6. STAGES 1 compiles to the same PTX as the
    loop before the knob."""
    if os.environ.get("ALBEF_FAST_MERGE"):
        return _merge_setting(os.environ["ALBEF_FAST_MERGE"])
    if _INTERPRET:
        return 16, 16, 2, 1, 4
    block_d = 64 if b >= 256 else 32 if b >= 128 else 16  # >= 128 programs for D = 256 (H200: 132 SMs)
    # the slots' key sums, [CHUNK, 16, BLOCK_D] per kind, in registers: for 16, 8 and 4 slots at
    # 16-, 32- and 64-wide D blocks 202, 192 and 168 registers (252, 242, 254 with retrieval
    # targets), no spills (8 slots at 64-wide: 752 B; the merge before the slots spilled 224, 32
    # and 2412 B with retrieval targets at 16, 8 and 8; sm_90a AOT, Triton 3.6)
    return 16, min(block_d, max(16, _next_pow2(d))), {16: 16, 32: 8}.get(block_d, 4), 1, 4


def _merge_setting(spec: str) -> Tuple[int, int, int, int, int]:
    try:
        fields = [int(v) for v in spec.split(",")]
    except ValueError:
        fields = []
    stages = fields[3] if len(fields) > 3 else 1
    warps = fields[4] if len(fields) > 4 else 4
    if (not 3 <= len(fields) <= 5 or any(v < 1 or v & (v - 1) for v in fields[:3]) or stages < 1
            or warps not in (1, 2, 4, 8, 16)):
        raise ValueError(f"ALBEF_FAST_MERGE: expected three powers of two BLOCK_M,BLOCK_D,CHUNK, optionally "
                         f"STAGES >= 1 and WARPS (1, 2, 4, 8 or 16), got {spec!r}")
    return (*fields[:3], stages, warps)


def _dot_flags(dtype: torch.dtype, precision: str):
    """(DOT_DTYPE, INPUT_PRECISION) for the feature dtype and the fp32 product precision."""
    if dtype == torch.float32:
        if precision == "medium":  # the interpreter's bf16 dot is wrong: bf16 values in fp32 tiles there
            return (tl.float32, "bf16") if _INTERPRET else (tl.bfloat16, "ieee")
        if precision == "highest":  # "f16x3" (the default): 3 fp16 products of (hi, lo) pairs of
            # scaled operands, 22 significant bits, the key sums rounded per tile (_key_sum): H100,
            # B = 512, 2.8 ms against eager's 6.5 with 16x less gradient error; "ieee": fp32 FMA products;
            # tf32x3: 3 TF32 products per dot, both accurate and slower than eager (H200)
            # (f16x3p: the same products, the pairs converted by _itc_keys_fwd_kernel: _prescaled)
            mode = os.environ.get("ALBEF_FAST_FP32_DOT", "f16x3")
            if mode in ("f16x3", "f16x3p"):
                return (tl.float32 if _INTERPRET else tl.float16), "f16x3"
            return tl.float32, mode
        # "f16s" (the default): fp16 operands scaled by powers of two, TF32's 11 significant bits
        # (_f16_scales) at fp16's product rate, 1.6x faster than TF32 at B = 512 on the H200 with
        # the same error; TF32 operands rounded to nearest ("tf32rn", _round_tf32) or truncated by
        # the tensor cores ("tf32": fails the error rule, kept to reproduce that)
        # ("f16p": the same products, the key tiles converted by _itc_keys_fwd_kernel: _prescaled)
        mode = os.environ.get("ALBEF_FAST_TF32", "f16s")
        if mode in ("f16s", "f16p"):
            return (tl.float32 if _INTERPRET else tl.float16), "f16s"
        return tl.float32, mode
    if _INTERPRET:  # the interpreter's bf16 / fp16 dot is wrong: fp32 tiles there
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "ieee"


def _merge_rounding(dtype: torch.dtype, dot_dtype, input_precision: str) -> str:
    """The merge's ROUND (kernels/itc_operands.py:_rounded_like_operands): how the products round
    fp32 features ("f16s": 11 significant bits, bf16 operands: 8, "tf32rn"); "none" where they do
    not (half features, "f16x3"'s 22 bits, FMA). Without it the target terms of the loss and dT
    (u . h from the features as they are) missed the rounding that the log-partition function (from
    the rounded logits) carries: near-zero losses were 100-1000x further from fp64 than eager TF32
    (operands rounded, softmax and targets on the same logits), session 22."""
    if dtype != torch.float32:
        return "none"
    if input_precision == "f16s":
        return "f16"
    if input_precision == "bf16" or dot_dtype == tl.bfloat16:
        return "bf16"
    return "tf32rn" if input_precision == "tf32rn" else "none"


def _tile_sums(input_precision: str) -> bool:
    """The split kernel's TILE_SUMS (_key_sum): for f16x3 unless ALBEF_FAST_TILE_SUMS=0. Not for
    f16s: Triton folds a single product's addition into its accumulator."""
    return input_precision == "f16x3" and os.environ.get("ALBEF_FAST_TILE_SUMS", "1") != "0"


def _interleave() -> bool:
    """The split kernel's INTERLEAVE: with ALBEF_FAST_INTERLEAVE=1 (off by default, untimed)."""
    return os.environ.get("ALBEF_FAST_INTERLEAVE", "0") == "1"


def _keys_as_is(input_precision: str) -> bool:
    """The split kernel's KEYS_AS_IS (kernels/itc_operands.py:_key_operand): for f16s with
    ALBEF_FAST_KEYS_AS_IS=1 (off by default: untimed). The same values either way; the key tiles
    are converted before their largest element is known, and a program that meets a tile outside
    _f16_as_is (features not normalized) streams its keys again (kernels/itc_split.py:_stream_keys)."""
    return input_precision == "f16s" and os.environ.get("ALBEF_FAST_KEYS_AS_IS", "0") == "1"


def _finish_in_merge() -> bool:
    """The merge's FINISH: its last program writes the scalars (kernels/itc_merge.py:_finish_last),
    unless ALBEF_FAST_FINISH=kernel (a launch of _itc_finish_fwd_kernel after the merge: the same
    bits; kept to check the fused one against on a GPU and to time it)."""
    setting = os.environ.get("ALBEF_FAST_FINISH", "merge")
    if setting not in ("merge", "kernel"):
        raise ValueError(f"ALBEF_FAST_FINISH: expected 'merge' or 'kernel', got {setting!r}")
    return setting == "merge"


def _stage_rows(input_precision: str) -> bool:
    """The split kernel's STAGE_ROWS (_staged_rows): for f16s unless ALBEF_FAST_STAGE_ROWS=0
    (the kernel applies it with GRAD and D in one block only)."""
    return input_precision == "f16s" and os.environ.get("ALBEF_FAST_STAGE_ROWS", "1") != "0"


# "high" with fp32 features from this batch size on: f16p unless ALBEF_FAST_TF32 names a mode.
# H100, B = 512: 0.85-0.88 ms launched against f16s's 1.03-1.07 (device time 0.60 against 1.02);
# B = 64: 1.01 ms against 0.50 (its chunks' launches, host bound); between them not measured.
_F16P_MIN_B = 512


def _prescaled(dtype: torch.dtype, precision: str, b: int) -> Optional[str]:
    """"f16p" for "high" at B >= _F16P_MIN_B or with ALBEF_FAST_TF32=f16p, "f16x3p" for
    ALBEF_FAST_FP32_DOT=f16x3p ("highest", experimental), with fp32 features, else None: the key
    tiles and query rows converted to their scaled fp16 form (f16x3p: (hi, lo) pairs) first
    (_itc_keys_fwd_kernel), so that the split loop reads fp16 tiles as the bf16 path does and
    scales and splits nothing; the values of "f16s" / "f16x3". The keys are converted a chunk at
    a time (_converted_bytes; the split over each chunk resumes the previous one's states), within
    SPEC's memory budget."""
    if dtype != torch.float32:
        return None
    if precision == "high":
        mode = os.environ.get("ALBEF_FAST_TF32")
        if mode == "f16p" or (not mode and b >= _F16P_MIN_B):
            return "f16p"
    if precision == "highest" and os.environ.get("ALBEF_FAST_FP32_DOT") == "f16x3p":
        return "f16x3p"
    return None


def prologue(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha: float,
             idx: Optional[torch.Tensor], idx_queue: Optional[torch.Tensor], details: bool, grad: bool,
             precision: str):
    """(plan key, the four features and two queues as the kernels take them (one stride pair for
    the features, one for the queues: copies where needed), temp as a tensor or None, the flat
    ids or None): what itc_triton and the C++ step (kernels/cpp_launch.py) launch with."""
    b, d = image_feat.shape
    feats = (image_feat, text_feat, image_feat_m, text_feat_m)
    strides = [f.stride() for f in feats]  # each stride() call counts at B = 64: read once
    if strides.count(strides[0]) != 4 or strides[0][1] != 1:
        feats = _common_strides([f.contiguous() if f.stride(1) != 1 else f for f in feats])
    queue_stride = image_queue.stride()
    if text_queue.stride() != queue_stride:
        image_queue, text_queue = image_queue.contiguous(), text_queue.contiguous()
        queue_stride = image_queue.stride()
    temp_t = temp if isinstance(temp, torch.Tensor) else None
    retrieval = idx is not None
    idx_v = idx.reshape(-1) if retrieval else None
    idq_v = idx_queue.reshape(-1) if retrieval else None
    key = (b, image_queue.shape[1], d, image_feat.dtype, image_queue.dtype, feats[0].stride(), queue_stride,
           image_feat.device, alpha != 0.0 or details, grad, precision, None if temp_t is None else temp_t.dtype,
           (idx_v.dtype, idq_v.dtype, idx_v.stride(0), idq_v.stride(0)) if retrieval else None, _settings())
    return key, feats, image_queue, text_queue, temp_t, idx_v, idq_v


# kernels/cpp_launch when ALBEF_FAST_LAUNCH=cpp (set by kernels/__init__.py): itc_triton records
# each new plan's launches for the C++ step
CPP = None


def itc_triton(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha: float,
               idx: Optional[torch.Tensor], idx_queue: Optional[torch.Tensor], details: bool, grad: bool,
               precision: str):
    """The "triton" backend of torch.ops.albef_fast.itc (same outputs as albef_fast.itc_op)."""
    key, feats, image_queue, text_queue, temp_t, idx_v, idq_v = prologue(
        image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha, idx, idx_queue,
        details, grad, precision)
    plan = _PLANS.get(key) or _new_plan(key)
    with launch.on_device(image_feat.device):  # Triton launches on the current device, not the tensors'
        if plan.cpp is None and CPP is not None and not torch.compiler.is_compiling():
            return _recorded(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v)
        return _launch(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v)


def _recorded(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v):
    """_launch with its launches recorded, and the plan registered with the C++ step
    (kernels/cpp_launch.py; plan.cpp: its id, or -1). Where another thread records a plan now,
    _launch alone: a later call records."""
    with launch.recording() as records:
        if records is None:
            return _launch(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v)
        ws, outputs = _launch(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v, keep=True)
        plan.cpp = -1
        if len(plan.splits) == 1 and plan.splits[0][0] is None and isinstance(plan.splits[0][1], PreparedLaunch):
            inputs = (*feats, image_queue, text_queue, temp_t, idx_v, idq_v)
            floats = (1.0 if temp_t is not None else float(temp), float(alpha))
            workspace = (ws.max.data_ptr(), 4 * sum(plan.ws_shapes))
            plan.cpp = CPP.record_plan(plan, (inputs, floats), records, workspace, outputs)
        else:
            plan.cpp_reason = "autotuned or chunked (f16p) split launches"
    return outputs


def _launch(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v, keep=False):
    """Allocate and launch one call of the plan: the op's eight outputs ((workspace, outputs) with keep)."""
    b, d = feats[0].shape
    dev = feats[0].device
    ws = plan.workspace(dev)
    sims = torch.empty((2, b, b), device=dev, dtype=feats[0].dtype)
    temp_arg, temp_v = (temp_t, 1.0) if temp_t is not None else (ws.lse, float(temp))  # lse: an unused pointer
    if idx_v is None:
        idx_v = idq_v = ws.count  # unused pointers
    converted = plan.converted(ws)  # kc, ks, qc, qs (f16p) or unused pointers
    for convert, split in plan.splits:  # one launch; f16p: one conversion and one split per chunk of keys
        if convert is not None:
            convert((*feats, image_queue, text_queue, *converted), ())
        split((*feats, image_queue, text_queue, idx_v, idq_v, temp_arg, ws.max, ws.z, ws.acc, ws.count, ws.ticket,
               sims, *converted), (temp_v,))
    dq_img = torch.empty((b, d), device=dev, dtype=feats[0].dtype)
    dq_txt = torch.empty((b, d), device=dev, dtype=feats[1].dtype)
    # fp32 named: torch.set_default_dtype(torch.float64) made them fp64, and the kernels with them
    scalars = tuple(torch.empty(shape, device=dev, dtype=torch.float32) for shape in ((), 2, (), 2, 4))
    loss, losses, grad_temp, grad_temp_dirs, terms = scalars
    plan.merge((*feats, temp_arg, ws.max, ws.z, ws.acc, ws.count, dq_img, dq_txt, ws.part, ws.lse, ws.ticket,
                *scalars), (temp_v, float(alpha)))
    if plan.finish is not None:
        plan.finish((ws.part, ws.lse, temp_arg, *scalars), (temp_v, float(alpha)))
    outputs = loss, losses, dq_img, dq_txt, grad_temp, grad_temp_dirs, sims, terms
    return (ws, outputs) if keep else outputs


# what the launches depend on besides the arguments: read at each call (tests and the per-config
# benchmark change them between calls), part of the plan key. ALBEF_FAST_CHUNK_TILES: f16p's key
# tiles per conversion chunk (default: _converted_bytes)
_SETTINGS = ("ALBEF_FAST_CONFIG", "ALBEF_FAST_WAVES", "ALBEF_FAST_AUTOTUNE", "ALBEF_FAST_TUNED", "ALBEF_FAST_SPLITS",
             "ALBEF_FAST_TF32", "ALBEF_FAST_FP32_DOT", "ALBEF_FAST_CHUNK_TILES", "ALBEF_FAST_TILE_SUMS",
             "ALBEF_FAST_MERGE", "ALBEF_FAST_STAGE_ROWS", "ALBEF_FAST_INTERLEAVE", "ALBEF_FAST_KEYS_AS_IS",
             "ALBEF_FAST_FINISH")


def _settings():
    """The raw values of _SETTINGS (None: unset). os.environ.get took 1.5 us a name here (it
    encodes the name each call); the mapping behind os.environ, with the names encoded once,
    gives the same values in 0.1 us."""
    return tuple(map(_ENV_DATA.get, _SETTINGS_KEYS))


# os.environ's own storage (CPython keeps os.environ and it in step); os.environ itself where absent
_ENV_DATA = getattr(os.environ, "_data", os.environ)
_SETTINGS_KEYS = tuple(map(os.environ.encodekey, _SETTINGS)) if _ENV_DATA is not os.environ else _SETTINGS


class _Plan:
    """Everything about the launches of one call that the key of _PLANS fixes (shapes, strides,
    dtypes, flags, settings): split count, workspace layout, and each kernel's grid, ints,
    constexprs and options, prepared once. A call then allocates and launches (host time per
    call counts at B = 64: the kernels run ~0.25 ms there)."""

    def __init__(self, key):
        b, q, d, dtype, _, feat_strides, queue_strides, dev, teacher, grad, precision, temp_dtype, ids, _ = key
        self.cpp: Optional[int] = None  # the C++ step's plan id (kernels/cpp_launch.py); -1: not for it
        self.cpp_reason: Optional[str] = None  # why not
        retrieval = ids is not None
        dot_dtype, input_precision = _dot_flags(dtype, precision)
        prescaled = _prescaled(dtype, precision, b)
        config, waves = launch_config(b, dot_dtype, prescaled or input_precision)
        n_sums = max(1, int(grad) + int(teacher) + int(retrieval))
        splits = _split_count(b, q, d, teacher, n_sums, dev, config, waves)
        merge = _merge_blocks(b, d)  # (BLOCK_M, BLOCK_D, CHUNK, stages, warps)
        merge_d_blocks = _cdiv(d, merge[1])
        self.ws_shapes = _Workspace.shapes(splits, b, d, n_sums, merge_d_blocks)
        flags = dict(GRAD=grad, HAS_TEACHER=teacher, RETRIEVAL=retrieval, TEMP_FROM_PTR=temp_dtype is not None)
        id_strides = ids[2:] if retrieval else (1, 1)
        split_ints = (*feat_strides, *queue_strides, *id_strides, b, q, d, splits)
        split_flags = dict(flags, DOT_DTYPE=dot_dtype, INPUT_PRECISION=input_precision,
                           TILE_SUMS=_tile_sums(input_precision), STAGE_ROWS=_stage_rows(input_precision),
                           INTERLEAVE=_interleave())
        self.converted_sizes = None
        self.splits = self._split_launches(config, split_ints, split_flags, prescaled, b, q, d, splits, teacher,
                                           feat_strides, queue_strides)
        rounding = _merge_rounding(dtype, dot_dtype, input_precision)
        self.merge, self.finish = _merge_launches(merge, flags, rounding, feat_strides, b, d, splits)

    def _split_launches(self, config, split_ints, split_flags, prescaled, b: int, q: int, d: int, splits: int,
                        teacher: bool, feat_strides, queue_strides):
        """[(conversion or None, split)]: one launch of the split kernel, the autotuner's (config
        None), or one per chunk of converted key tiles (_chunked_splits)."""
        plain = dict(split_flags, PRESCALED=False, RESUME=False, KEYS_AS_IS=_keys_as_is(split_flags["INPUT_PRECISION"]))
        if config is None:  # autotune over candidates(): through the autotuner at each call
            return [(None, functools.partial(_autotuned_split, split_ints + (1, 0, 0), plain))]
        grid, meta = _split_meta(config, b, d, splits, teacher)
        split = functools.partial(_LAUNCH["split"].prepare, grid, options=launch_options(config))
        if prescaled and meta["BLOCK_D"] >= d:
            return self._chunked_splits(split, split_ints, dict(meta, **split_flags), b, q, d, feat_strides,
                                        queue_strides)
        return [(None, split(split_ints + (1, 0, 0), dict(meta, **plain)))]

    def workspace(self, device) -> "_Workspace":
        return _Workspace(device, self.ws_shapes)

    def _chunked_splits(self, split, split_ints, constexprs, b: int, q: int, d: int, feat_strides, queue_strides):
        """f16p, f16x3p (_prescaled): [(conversion, split)] per chunk of the key tiles, each chunk's
        converted tiles at most _converted_bytes(b); splits after the first resume the states.
        Sizes of the outputs: fp16 kc [2, D, chunk tiles x BLOCK_N] + qc [2, 2, B, D], fp32 ks
        [2, chunk tiles] + qs [2, 2, B]."""
        block_n, rows = constexprs["BLOCK_N"], 16
        parts = 2 if constexprs["INPUT_PRECISION"] == "f16x3" else 1  # f16x3p: (hi, lo) pairs
        tiles = _cdiv(b, block_n) + _cdiv(q, block_n)
        tile_bytes = 2 * parts * d * block_n * 2  # both directions, fp16
        per_chunk = int(os.environ.get("ALBEF_FAST_CHUNK_TILES") or 0) or _converted_bytes(b) // tile_bytes
        per_chunk = _cdiv(tiles, _cdiv(tiles, max(1, per_chunk)))  # equal chunks
        kc_stride = per_chunk * block_n
        self.converted_sizes = ((2 * parts * d * kc_stride, 4 * parts * b * d), (2 * per_chunk, 4 * b))
        block_d = min(256, _next_pow2(d))
        convert_meta = dict(BLOCK_N=block_n, BLOCK_D=block_d, NUM_DK=_cdiv(d, block_d), ROWS=rows, PAIRS=parts == 2)
        launches = []
        for t0 in range(0, tiles, per_chunk):
            t1 = min(t0 + per_chunk, tiles)
            row_programs = 2 * _cdiv(b, rows) if t0 == 0 else 0  # the query rows with the first chunk
            convert = _LAUNCH["keys"].prepare((t1 - t0 + row_programs, 2),
                                              (*feat_strides, *queue_strides, b, q, d, kc_stride, t0, t1 - t0),
                                              convert_meta, _FOUR_WARPS)
            launches.append((convert, split(split_ints + (kc_stride, t0, t1),
                                            dict(constexprs, PRESCALED=True, RESUME=t0 > 0, KEYS_AS_IS=False))))
        return launches

    def converted(self, ws: "_Workspace"):
        """(kc, ks, qc, qs) for the f16p launches (flat views, the kernels index them), else four
        unused pointers."""
        if self.converted_sizes is None:
            return (ws.count,) * 4
        halves, singles = self.converted_sizes
        kc, qc = torch.empty(sum(halves), device=ws.count.device, dtype=torch.float16).split(halves)
        ks, qs = torch.empty(sum(singles), device=ws.count.device, dtype=torch.float32).split(singles)
        return kc, ks, qc, qs


def _converted_bytes(b: int) -> int:
    """The converted key tiles of one f16p chunk (both directions): within SPEC's extra-memory
    budget with the rest of the call (workspace, outputs: ~17 MiB at B = 64, ~28 at B = 512)."""
    return (12 << 20) if b <= 128 else (32 << 20)


def _autotuned_split(ints, constexprs, tensors, floats) -> None:
    _itc_split_fwd_kernel[_split_grid](*tensors, *ints, *floats, **constexprs, **FIXED_OPTIONS)


_PLANS = {}
_MAX_PLANS = 256


def _new_plan(key) -> _Plan:
    if len(_PLANS) >= _MAX_PLANS:  # shapes that keep changing: start over (the kernels stay in Triton's cache)
        _PLANS.clear()
        for launcher in _LAUNCH.values():
            launcher.forget()
        if CPP is not None:
            CPP.forget()
    plan = _PLANS[key] = _Plan(key)
    return plan


class _Workspace:
    """The kernels' fp32 scratch, one allocation (host time per call counts at B = 64), carved
    into: max, z [2, 2, S, B] and count [2, S, B] (per split), acc [2, n_sums, S, B, D] (key
    sums), part [2, D blocks, 4, B] (row partial dots), lse [2, 2, B], ticket [1] (the merge's
    count of finished programs). Every element the merge reads is written by the split kernel
    first (the ticket: zeroed): no fills."""

    __slots__ = ("max", "z", "count", "acc", "part", "lse", "ticket")

    def __init__(self, device, sizes: Tuple[int, ...]):
        flat = torch.empty(sum(sizes), device=device, dtype=torch.float32)
        # flat 1-D views (one op): the kernels index them themselves
        self.max, self.z, self.count, self.acc, self.part, self.lse, self.ticket = flat.split(sizes)

    @staticmethod
    def shapes(splits: int, b: int, d: int, n_sums: int, merge_d_blocks: int) -> Tuple[int, ...]:
        """The element counts of the views above."""
        shapes = [(2, 2, splits, b), (2, 2, splits, b), (2, splits, b), (2, n_sums, splits, b, d),
                  (2, merge_d_blocks, 4, b), (2, 2, b), (1,)]
        return tuple(math.prod(shape) for shape in shapes)


def _split_meta(config, b: int, d: int, splits: int, teacher: bool):
    """(grid, constexprs) of the split launch for a fixed config: the autotuner's heuristics
    applied here, so that the launch goes straight to the JIT function."""
    meta = dict(config.kwargs)
    meta.update(_kind_heuristics(dict(meta, HAS_TEACHER=teacher)), NUM_DK=_cdiv(d, meta["BLOCK_D"]))
    return _split_grid(dict(meta, B=b, D=d, NUM_SPLITS=splits)), meta


_FOUR_WARPS = {"num_warps": 4}
# one launcher per kernel: the split kernel's JIT function sits under autotune -> heuristics
_LAUNCH = {"split": DirectLauncher(_itc_split_fwd_kernel.fn.fn), "merge": DirectLauncher(_itc_merge_fwd_kernel),
           "finish": DirectLauncher(_itc_finish_fwd_kernel), "keys": DirectLauncher(_itc_keys_fwd_kernel)}


def _merge_launches(merge, flags, rounding: str, feat_strides, b: int, d: int, splits: int):
    """(merge, finish or None) prepared launches: the merge's blocks (_merge_blocks: BLOCK_M,
    BLOCK_D, CHUNK, stages, warps), the finish in the merge's last program (_finish_in_merge)
    or a kernel of its own."""
    merge_m, merge_d, chunk, merge_stages, merge_warps = merge
    merge_d_blocks = _cdiv(d, merge_d)
    dblocks = _next_pow2(merge_d_blocks)  # the finish loads 4 [dblocks, BLOCK_B] tiles of <= 2048 values
    finish_blocks = dict(BLOCK_B=min(_next_pow2(b), max(16, 2048 // dblocks)), DBLOCKS=dblocks)
    fused = _finish_in_merge()
    merge_launch = _LAUNCH["merge"].prepare(
        (_cdiv(b, merge_m), merge_d_blocks, 2), (*feat_strides, b, d, splits),
        dict(flags, BLOCK_M=merge_m, BLOCK_D=merge_d, CHUNK=chunk, FINISH=fused, MERGE_STAGES=merge_stages,
             ROUND=rounding, **finish_blocks),
        dict(num_warps=merge_warps, num_stages=merge_stages))
    finish_launch = None if fused else _LAUNCH["finish"].prepare(
        (1,), (b, merge_d_blocks),
        dict(HAS_TEACHER=flags["HAS_TEACHER"], TEMP_FROM_PTR=flags["TEMP_FROM_PTR"], **finish_blocks), _FOUR_WARPS)
    return merge_launch, finish_launch


def _common_strides(feats):
    """The kernels take one stride pair for all four feature tensors: make them agree."""
    if all(f.stride() == feats[0].stride() for f in feats):
        return feats
    return [f.contiguous() for f in feats]
