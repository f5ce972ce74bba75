"""Fused ITC kernels: one pass over [in-batch keys ; queue] gives the loss, dq and dT.

Three launches per call (four with f16p, below), both directions in each (SPEC section 3):

_itc_split_fwd_kernel   grid (row blocks, key splits, 2 directions x D blocks). Each program
    streams its share of the keys once, computing student logits u . k (and teacher logits
    u_m . k from the same loaded tile) in base 2 (log2(e) / T folded into one scale), and keeps
    online-softmax states: running max, Z, A = sum 2^(s - max) k over its D block, plus the
    hard-target sum H = sum [id_j == id_r] k and count for retrieval targets.
_itc_merge_fwd_kernel   grid (row blocks, D blocks, 2 directions). Combines the splits in one
    pass, in a fixed order (deterministic: no atomics), rescaling as the split kernel's online
    softmax does: G = A_s / Z_s - alpha A_m / Z_m - (1 - alpha) H / n,
    dq = G / (2 T B) (of the mean of the two directions' losses), and partial dot products of
    u = q / T with the key means over its D block.
_itc_finish_fwd_kernel  grid (1,). Sums the partials in order and gives the means of the loss,
    dT, ce and kl rows per direction and the mean loss (all scalars are dots with u: see
    albef_fast/streaming.py).
_itc_keys_fwd_kernel    (f16p / f16x3p only, experimental: _prescaled) before the split, a chunk
    of keys at a time: the key tiles and query rows in their scaled fp16 form.

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
import triton
import triton.language as tl

from .itc_configs import candidates, launch_config, launch_options
from . import launch
from .launch import DirectLauncher, PreparedLaunch

__all__ = ["itc_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
WORKSPACE_BYTES = 24 << 20  # the key sums' scratch (ws_acc): SPEC section 6 allows 32 MiB in all at B = 64


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b): triton.cdiv is a JIT-callable whose host call costs microseconds."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _split_grid(meta):
    """(kinds x row blocks, key splits, 2 directions x D blocks) for the config in meta."""
    rows = _cdiv(meta["B"], meta["BLOCK_M"]) * meta["GRID_KINDS"]
    return (rows, meta["NUM_SPLITS"], 2 * _cdiv(meta["D"], meta["BLOCK_D"]))


@triton.jit
def _load_keys(base, stride_d, stride_j, d_offs, j_offs, D, N):
    """Key tile [BLOCK_D, BLOCK_N]: element (d, j) at base + d * stride_d + j * stride_j, zero outside."""
    mask = (d_offs[:, None] < D) & (j_offs[None, :] < N)
    return tl.load(base + d_offs[:, None] * stride_d + j_offs[None, :] * stride_j, mask=mask, other=0.0)


@triton.jit
def _load_rows(base, stride_r, stride_d, r_offs, d_offs, B, D):
    """Row tile [BLOCK_M, BLOCK_D] of a [B, D] tensor, zero outside."""
    mask = (r_offs[:, None] < B) & (d_offs[None, :] < D)
    return tl.load(base + r_offs[:, None] * stride_r + d_offs[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _direction_ptrs(direction, img_ptr, txt_ptr, img_m_ptr, txt_m_ptr):
    """(queries, momentum queries, in-batch keys) of a direction: i2t = 0 (image queries, text
    keys), t2i = 1 (text queries, image keys)."""
    q_ptr = tl.where(direction == 0, img_ptr, txt_ptr)
    qm_ptr = tl.where(direction == 0, img_m_ptr, txt_m_ptr)
    kb_ptr = tl.where(direction == 0, txt_m_ptr, img_m_ptr)
    return q_ptr, qm_ptr, kb_ptr


@triton.jit
def _temperature(temp_ptr, temp_value, TEMP_FROM_PTR: tl.constexpr):
    """T in fp32: read from the 0-dim tensor (no host sync for a Parameter) or the float argument."""
    if TEMP_FROM_PTR:
        return tl.load(temp_ptr).to(tl.float32)
    return temp_value


@triton.jit
def _query_tiles(q_ptr, qm_ptr, stride_fb, stride_fd, rows, d_offs, B, D, TEACHER: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(query tile, momentum-query tile) [BLOCK_M, BLOCK_D] as product operands (_scaled_rows),
    and their row scales [BLOCK_M] (scaled fp16 modes; else 1); without TEACHER the second is the first."""
    q, q_up = _scaled_rows(_load_rows(q_ptr, stride_fb, stride_fd, rows, d_offs, B, D), DOT_DTYPE, INPUT_PRECISION)
    if TEACHER:
        qm, qm_up = _scaled_rows(_load_rows(qm_ptr, stride_fb, stride_fd, rows, d_offs, B, D), DOT_DTYPE,
                                 INPUT_PRECISION)
    else:
        qm, qm_up = q, q_up
    return q, qm, q_up, qm_up


@triton.jit
def _f16_scales(amax):
    """(down, up), powers of two with amax * down in [2^14, 2^15): fp16's top binade below 2^15,
    so that a tile scaled by down keeps 11 significant bits down to 2^-14 of its largest element
    (subnormals below) and cannot overflow. The exponent is clamped to [-40, 40] before the shift,
    so that the product of two ups stays a normal fp32 number; inf stays inf."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -40), 40) - 14
    return ((127 - e) << 23).to(tl.float32, bitcast=True), ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_rows(x, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(operand, up [BLOCK_M]) of a row tile: in the scaled fp16 modes ("f16s", "f16x3") each row
    scaled by its own power of two (_f16_scales), so that x = operand * up[:, None] up to fp16
    rounding; else (_operand(x), 1)."""
    # (the mode test is written out at each use: Triton 3.6 takes a jit helper's result for a
    # run-time condition, not a static one)
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        down, up = _f16_scales(tl.max(tl.abs(x), 1))
        out = _operand(x * down[:, None], DOT_DTYPE, INPUT_PRECISION)
    else:
        out, up = _operand(x, DOT_DTYPE, INPUT_PRECISION), tl.full([x.shape[0]], 1.0, tl.float32)
    return out, up


@triton.jit
def _scaled_keys(x, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(operand, up) of a key tile: in the scaled fp16 modes the whole tile scaled by one power of
    two (the key sums accumulate tiles of different scales: _online_softmax's ratio); else
    (_operand(x), 1)."""
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        down, up = _f16_scales(tl.max(tl.abs(x)))
        out = _operand(x * down, DOT_DTYPE, INPUT_PRECISION)
    else:
        out, up = _operand(x, DOT_DTYPE, INPUT_PRECISION), 1.0
    return out, up


@triton.jit
def _prescaled_keys(kc_ptr, ks_ptr, direction, t, d_offs, cols, D, KC_STRIDE, TRANSPOSED: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """(operand, up) of key tile t (of the converted chunk) as _scaled_keys gives it ("f16s"; the
    (hi, lo) pair for "f16x3", lo 2 D KC_STRIDE further), read from _itc_keys_fwd_kernel's
    output: [BLOCK_D, BLOCK_N] (TRANSPOSED: [BLOCK_N, BLOCK_D])."""
    base = kc_ptr + direction * D * KC_STRIDE
    jj = t * BLOCK_N + cols  # columns of the converted tile space (padding holds zeros)
    if TRANSPOSED:
        s_d, s_j, n_first, n_second, first, second = 1, KC_STRIDE, KC_STRIDE, D, jj, d_offs
    else:
        s_d, s_j, n_first, n_second, first, second = KC_STRIDE, 1, D, KC_STRIDE, d_offs, jj
    hi = _load_keys(base, s_d, s_j, first, second, n_first, n_second).to(DOT_DTYPE)
    if INPUT_PRECISION == "f16x3":
        out = hi, _load_keys(base + 2 * D * KC_STRIDE, s_d, s_j, first, second, n_first, n_second).to(DOT_DTYPE)
    else:
        out = hi
    return out, tl.load(ks_ptr + direction * (KC_STRIDE // BLOCK_N) + t)


@triton.jit
def _prescaled_rows(qc_ptr, qs_ptr, slot, rows, d_offs, B, D, DOT_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """(operand, up [BLOCK_M]) of a query row tile as _scaled_rows gives it ("f16s"; the (hi, lo)
    pair for "f16x3", lo 4 B D further), read from _itc_keys_fwd_kernel's qc [4, B, D] / qs [4, B]
    at slot (direction * 2 + kind)."""
    hi = _load_rows(qc_ptr + slot * B * D, D, 1, rows, d_offs, B, D).to(DOT_DTYPE)
    if INPUT_PRECISION == "f16x3":
        out = hi, _load_rows(qc_ptr + (4 + slot) * B * D, D, 1, rows, d_offs, B, D).to(DOT_DTYPE)
    else:
        out = hi
    return out, tl.load(qs_ptr + slot * B + rows, mask=rows < B, other=1.0)


@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest TF32 value (ties away from zero), kept in fp32. The tensor cores read
    only the top 19 bits of an fp32 operand, i.e. truncate: a bias of half an ulp (2^-12) on every
    operand, which summed over 65536 keys put the loss 25x and dT 50x further from fp64 than
    cuBLAS TF32 (measured, H200). Rounding first makes the error zero-mean."""
    bits = x.to(tl.uint32, bitcast=True)
    return (((bits + 0x1000) >> 13) << 13).to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """x as a product operand: cast to DOT_DTYPE, and for "tf32rn" rounded to TF32 (_round_tf32).
    Done once per loaded tile (the query tiles once per program), not once per product: for TF32
    the rounding costs registers and ALU time in the key loop."""
    # one return: Triton type-checks every return of a function, constexpr branches or not
    if INPUT_PRECISION == "f16x3":  # (hi, lo) fp16 values, x = hi + lo to 22 significant bits
        hi = x.to(tl.float16)
        out = hi.to(DOT_DTYPE), (x - hi.to(tl.float32)).to(tl.float16).to(DOT_DTYPE)
    elif INPUT_PRECISION == "f16s":  # fp16 values (the interpreter: kept in fp32 tiles, exact products)
        out = x.to(tl.float16).to(DOT_DTYPE)
    elif DOT_DTYPE == tl.float32:
        out = x.to(tl.float32)
        if INPUT_PRECISION == "tf32rn":
            out = _round_tf32(out)
    else:
        out = x.to(DOT_DTYPE)
    return out


@triton.jit
def _mma(a, b, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation, for operands prepared by _operand (TF32 values: the tensor
    cores' truncation is then exact; "f16x3": _f16x3_dot of (hi, lo) pairs)."""
    if INPUT_PRECISION == "f16x3":
        out = _f16x3_dot(a, b, None, DOT_DTYPE)
    elif DOT_DTYPE == tl.float32:
        if INPUT_PRECISION == "tf32rn":
            out = tl.dot(a, b, input_precision="tf32")
        elif INPUT_PRECISION == "f16s":  # fp16 values in fp32 tiles (interpreter): exact products
            out = tl.dot(a, b, input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=INPUT_PRECISION)
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _mma_into(acc, a, b, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b. "f16x3": its three products accumulate into acc itself (no [M, N] temporary:
    the (hi, lo) pairs already double the operands' registers); otherwise as written, which
    Triton folds into the product's accumulator."""
    if INPUT_PRECISION == "f16x3":
        out = _f16x3_dot(a, b, acc, DOT_DTYPE)
    else:
        out = acc + _mma(a, b, DOT_DTYPE, INPUT_PRECISION)
    return out


@triton.jit
def _f16x3_dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b of (hi, lo) pairs: hi lo + lo hi first (the small terms), then hi hi; lo lo
    (2^-22 relative) dropped. acc None: a new tile."""
    return _f16_dot(a[0], b[0], _f16_dot(a[0], b[1], _f16_dot(a[1], b[0], acc, DOT_DTYPE), DOT_DTYPE), DOT_DTYPE)


@triton.jit
def _f16_dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b of fp16 values: fp16 tiles, or fp32 tiles holding them under the interpreter
    (its fp16 dot is not exact; fp32 "ieee" products of fp16 values are)."""
    if DOT_DTYPE == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _trans(x, INPUT_PRECISION: tl.constexpr):
    """tl.trans of an operand (of both halves of an "f16x3" pair)."""
    if INPUT_PRECISION == "f16x3":
        out = tl.trans(x[0]), tl.trans(x[1])
    else:
        out = tl.trans(x)
    return out


@triton.jit
def _logits_product(q, k, LOGITS_T: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """q @ k [BLOCK_M, BLOCK_N]; LOGITS_T computes (k^T @ q^T)^T instead: TF32 wgmma reads only
    K-major operands and the key tile (Q contiguous in ALBEF's [D, Q] queue) is not one as the
    B operand, so Triton transposes it through registers (660-1020 B of spills at sm_90); as
    the A operand it comes from registers, no spills (AOT, Triton 3.6). Same values either way."""
    if LOGITS_T:
        out = tl.trans(_mma(_trans(k, INPUT_PRECISION), _trans(q, INPUT_PRECISION), DOT_DTYPE, INPUT_PRECISION))
    else:
        out = _mma(q, k, DOT_DTYPE, INPUT_PRECISION)
    return out


@triton.jit
def _logits(q, qm, k, q_up, qm_up, k_up, TEACHER: tl.constexpr, LOGITS_T: tl.constexpr, DOT_DTYPE: tl.constexpr,
            INPUT_PRECISION: tl.constexpr):
    """Raw dots of one D block (prepared operands and their scales, _query_tiles / _scaled_keys):
    (q . k [BLOCK_M, BLOCK_N], q_m . k if TEACHER else 0)."""
    s = _logits_product(q, k, LOGITS_T, DOT_DTYPE, INPUT_PRECISION)
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        s = s * (q_up * k_up)[:, None]
    if TEACHER:
        m = _logits_product(qm, k, LOGITS_T, DOT_DTYPE, INPUT_PRECISION)
        if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
            m = m * (qm_up * k_up)[:, None]
    else:
        m = tl.zeros_like(s)
    return s, m


@triton.jit
def _online_softmax(mx, z, acc, logits, valid, scale, k_t, ratio, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, TILE_SUMS: tl.constexpr):
    """One key tile into a running state: max (base 2), Z = sum 2^(l - max) and, if ACC,
    acc = sum 2^(l - max) k (k_t: a prepared operand).

    Scaled fp16 modes ("f16s", "f16x3"): the weights enter the product as 2^14 2^(l - max)
    (exact, <= 2^14: 11 significant bits down to 2^-14 of the largest), and acc is kept in units
    of 2^14 / (k_t's scale), the scale of the latest tile: ratio = previous scale / this one
    rescales it (powers of two). TILE_SUMS: see _key_sum."""
    l2 = tl.where(valid, logits * scale, float("-inf"))
    new_mx = tl.maximum(mx, tl.max(l2, 1))
    rescale = tl.exp2(mx - new_mx)
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        p = tl.exp2(l2 - (new_mx[:, None] - 14.0))
        z = z * rescale + tl.sum(p, 1) * (1.0 / 16384.0)
        rescale = rescale * ratio
    else:
        p = tl.exp2(l2 - new_mx[:, None])
        z = z * rescale + tl.sum(p, 1)
    if ACC:
        acc = _key_sum(acc * rescale[:, None], _operand(p, DOT_DTYPE, INPUT_PRECISION), k_t, DOT_DTYPE,
                       INPUT_PRECISION, TILE_SUMS)
    return new_mx, z, acc


@triton.jit
def _key_sum(acc, w, k_t, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, TILE_SUMS: tl.constexpr):
    """acc + w @ k_t, a running key sum. The tensor cores add each product into their fp32
    accumulator with truncation, not rounding: a bias that grows with the chain of products into
    one accumulator (~4k per program at Q = 65536), and f16x3's three products per tile triple it
    (the H100 put f16x3's dT 2.3e-5 from fp64 at B = 512, f16s's 6.9e-6, FMA products' 5.7e-8).
    TILE_SUMS: each tile's product into a fresh tile, added to acc rounded to nearest (a second
    [BLOCK_M, BLOCK_D] accumulator live)."""
    if TILE_SUMS:
        out = acc + _mma(w, k_t, DOT_DTYPE, INPUT_PRECISION)
    else:
        out = _mma_into(acc, w, k_t, DOT_DTYPE, INPUT_PRECISION)
    return out


@triton.jit
def _staged_rows(ws_acc_ptr, q, qm, direction, kind, pid_s, pid_m, rows, d_offs, B, D, NUM_SPLITS,
                 DOT_DTYPE: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr,
                 TEACHER: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query operands q, qm [BLOCK_M, D] (fp16 values, _query_tiles) written to global memory
    and read back: a plain load lets the logits product take them from shared memory, as it
    takes bf16 rows, where a computed operand stays in registers (Triton 3.6 reloads it there
    for each key tile: 64 registers a thread at 64 rows, 4 warps, and 516 B of spills for f16s's
    B = 64 config; sm_90a AOT). Same bits either way. The rows go to the start of this program's
    own key-sum slices of ws_acc (layout: _store_states, GRAD), which it overwrites at its end:
    q into its main state's slot (kind), qm into the teacher's (TEACHER). One barrier in between."""
    n_kinds = 1 + HAS_TEACHER + RETRIEVAL
    local = (rows - pid_m * BLOCK_M)[:, None] * D + d_offs[None, :]  # fp16 [BLOCK_M, D] of the row block
    mask = (rows[:, None] < B) & (d_offs[None, :] < D)
    main = _row_block_f16(ws_acc_ptr, (direction * n_kinds + kind) * NUM_SPLITS + pid_s, pid_m, B, D, BLOCK_M)
    tl.store(main + local, q.to(tl.float16), mask=mask)
    if TEACHER:
        second = _row_block_f16(ws_acc_ptr, (direction * n_kinds + 1) * NUM_SPLITS + pid_s, pid_m, B, D, BLOCK_M)
        tl.store(second + local, qm.to(tl.float16), mask=mask)
    tl.debug_barrier()  # the block's stores visible to all its threads before the loads
    q = tl.load(main + local, mask=mask, other=0.0).to(DOT_DTYPE)
    if TEACHER:
        qm = tl.load(second + local, mask=mask, other=0.0).to(DOT_DTYPE)
    else:
        qm = q
    return q, qm


@triton.jit
def _row_block_f16(ws_acc_ptr, slice_index, pid_m, B, D, BLOCK_M: tl.constexpr):
    """An fp16 pointer to row block pid_m of ws_acc's [B, D] fp32 slice slice_index."""
    return (ws_acc_ptr + (slice_index * B + pid_m * BLOCK_M) * D).to(tl.pointer_type(tl.float16))


def _kind_heuristics(args):
    """KIND_AXIS (a config choice): student and teacher states in separate programs of one launch
    (GRID_KINDS = 2; each program keeps one state, so half the accumulators) or both in one."""
    two = bool(args["KIND_AXIS"]) and bool(args["HAS_TEACHER"])
    return {"GRID_KINDS": 2 if two else 1, "TEACHER": bool(args["HAS_TEACHER"]) and not two}


@triton.autotune(configs=candidates(), key=["B", "D", "GRAD", "HAS_TEACHER", "RETRIEVAL", "DOT_DTYPE", "INPUT_PRECISION"])
@triton.heuristics({
    "NUM_DK": lambda args: _cdiv(args["D"], args["BLOCK_D"]),
    "GRID_KINDS": lambda args: _kind_heuristics(args)["GRID_KINDS"],
    "TEACHER": lambda args: _kind_heuristics(args)["TEACHER"],
})
@triton.jit
def _itc_split_fwd_kernel(
    # pointers: per direction (image = i2t queries, text = t2i queries)
    img_ptr, txt_ptr, img_m_ptr, txt_m_ptr, img_queue_ptr, txt_queue_ptr, idx_ptr, idx_queue_ptr, temp_ptr,
    ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, sim_ptr, kc_ptr, ks_ptr, qc_ptr, qs_ptr,
    # strides
    stride_fb, stride_fd, stride_qd, stride_qj, stride_idx, stride_idq,
    # shapes
    B, Q, D, NUM_SPLITS, KC_STRIDE, T0, T1, temp_value,
    # constexpr flags
    GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr, TEMP_FROM_PTR: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, PRESCALED: tl.constexpr, RESUME: tl.constexpr,
    TILE_SUMS: tl.constexpr, STAGE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, KIND_AXIS: tl.constexpr, KT_LOAD: tl.constexpr, LOGITS_T: tl.constexpr,
    NUM_DK: tl.constexpr, GRID_KINDS: tl.constexpr, TEACHER: tl.constexpr,
):
    """Per-split online-softmax states of one (kind, row block, key split, direction, D block).

    Each program keeps a main state for its kind (kind 0 = student logits q . k, kind 1 = teacher
    logits q_m . k; GRID_KINDS = 2 puts the kinds in separate programs, neighbours in launch order
    so that they read the same keys from L2) and, with TEACHER (both kinds in one program), a
    second, teacher state computed from the same key tile. The student also keeps the hard targets
    and writes the sim blocks.

    Features [B, D] (all four share strides stride_fb, stride_fd), queues [D, Q] (strides
    stride_qd, stride_qj), idx [B], idx_queue [Q]; temp 0-dim (or temp_value). PRESCALED ("f16s"
    or "f16x3", one D block): the key tiles and query rows come from _itc_keys_fwd_kernel (kc, ks,
    qc, qs) instead of the features and queues, the same values with no scaling in the kernel, for
    the key tiles [T0, T1) of a chunk (kc holds that chunk); RESUME (chunks after the first)
    continues from the states the previous launch left in the workspace. Else kc, ks, qc, qs,
    KC_STRIDE, T0 and T1 are unused. TILE_SUMS: the key sums rounded once per tile (_key_sum).
    STAGE_ROWS ("f16s" with GRAD and D in one block): the scaled query rows pass through
    ws_acc (_staged_rows).
    Writes, with R = number of key sums kept (student if GRAD, teacher, hard) and S = NUM_SPLITS:
    ws_max, ws_z [2, 2, S, B] (student / teacher), ws_acc [2, R, S, B, D], ws_count [2, S, B],
    sim [2, B, B] (student logits against the in-batch keys; split 0, D block 0 only).
    """
    tl.static_assert(not PRESCALED or NUM_DK == 1, "prescaled key tiles need D in one block")
    pid_mk, pid_s, pid_dd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kind, pid_m = pid_mk % GRID_KINDS, pid_mk // GRID_KINDS
    direction, pid_d = pid_dd % 2, pid_dd // 2
    q_ptr, qm_ptr, kb_ptr = _direction_ptrs(direction, img_ptr, txt_ptr, img_m_ptr, txt_m_ptr)
    main_ptr = tl.where(kind == 0, q_ptr, qm_ptr)  # queries of this program's main state
    is_student = kind == 0
    queue_ptr = tl.where(direction == 0, txt_queue_ptr, img_queue_ptr)
    temp = _temperature(temp_ptr, temp_value, TEMP_FROM_PTR)
    scale = 1.4426950408889634 / temp  # base-2 logits: exp(s) = exp2(s * log2(e))

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d_acc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    if RETRIEVAL:
        row_ids = tl.load(idx_ptr + rows * stride_idx, mask=rows < B, other=0)  # padded rows: never stored

    mx_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z_s = tl.zeros([BLOCK_M], tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mx_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z_m = tl.zeros([BLOCK_M], tl.float32)
    acc_m = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_h = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_M], tl.float32)
    if RESUME:  # the key sums in units of 2^14 (the running unit up_run starts at 1)
        mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count = _load_states(
            ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, kind, direction, pid_s, rows, d_acc, B, D, NUM_SPLITS,
            GRAD, HAS_TEACHER, RETRIEVAL, TEACHER)
        acc_s, acc_m, acc_h = acc_s * 16384.0, acc_m * 16384.0, acc_h * 16384.0

    if PRESCALED:  # converted rows: [direction, kind (student, teacher)] of qc
        q_one, q_up_one = _prescaled_rows(qc_ptr, qs_ptr, direction * 2 + kind, rows, d_acc, B, D, DOT_DTYPE,
                                          INPUT_PRECISION)
        if TEACHER:
            qm_one, qm_up_one = _prescaled_rows(qc_ptr, qs_ptr, direction * 2 + 1, rows, d_acc, B, D, DOT_DTYPE,
                                                INPUT_PRECISION)
        else:
            qm_one, qm_up_one = q_one, q_up_one
    else:
        q_one, qm_one, q_up_one, qm_up_one = _query_tiles(main_ptr, qm_ptr, stride_fb, stride_fd, rows, d_acc, B, D,
                                                          TEACHER, DOT_DTYPE, INPUT_PRECISION)
        if STAGE_ROWS and GRAD and (NUM_DK == 1) and (INPUT_PRECISION == "f16s"):
            q_one, qm_one = _staged_rows(ws_acc_ptr, q_one, qm_one, direction, kind, pid_s, pid_m, rows, d_acc, B, D,
                                         NUM_SPLITS, DOT_DTYPE, HAS_TEACHER, RETRIEVAL, TEACHER, BLOCK_M)
    up_run = tl.full([], 1.0, tl.float32)  # scaled fp16 modes: the latest key-sum operand's scale

    batch_tiles = tl.cdiv(B, BLOCK_N)
    if PRESCALED:  # this launch's chunk of the tile space
        t_first, t_last = T0, T1
    else:
        t_first, t_last = 0, batch_tiles + tl.cdiv(Q, BLOCK_N)
    tiles_per_split = tl.cdiv(t_last - t_first, NUM_SPLITS)
    t_begin = t_first + pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, t_last)
    for phase in tl.static_range(2):
        # phase 0: in-batch keys [B, D] (row layout); phase 1: the queue [D, Q]; one tile space.
        if phase == 0:
            k_base, s_kd, s_kj, n_keys, id_base, s_id = kb_ptr, stride_fd, stride_fb, B, idx_ptr, stride_idx
            lo, hi, shift = t_begin, tl.minimum(t_end, batch_tiles), 0
        else:
            k_base, s_kd, s_kj, n_keys, id_base, s_id = queue_ptr, stride_qd, stride_qj, Q, idx_queue_ptr, stride_idq
            lo, hi, shift = tl.maximum(t_begin, batch_tiles), t_end, batch_tiles
        for t in range(lo, hi):
            j = (t - shift) * BLOCK_N + cols
            if NUM_DK == 1:  # the query tiles stay loaded (q_one, qm_one); one key tile serves all
                if PRESCALED:
                    k_acc, k_up = _prescaled_keys(kc_ptr, ks_ptr, direction, t - T0, d_acc, cols, D, KC_STRIDE,
                                                  False, DOT_DTYPE, INPUT_PRECISION, BLOCK_N)
                else:
                    k_acc, k_up = _scaled_keys(_load_keys(k_base, s_kd, s_kj, d_acc, j, D, n_keys), DOT_DTYPE,
                                               INPUT_PRECISION)
                s, m = _logits(q_one, qm_one, k_acc, q_up_one, qm_up_one, k_up, TEACHER, LOGITS_T, DOT_DTYPE,
                               INPUT_PRECISION)
            else:  # D in NUM_DK blocks for the logits, then this program's D block of the keys again
                s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                m = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for dk in range(NUM_DK):
                    d_offs = dk * BLOCK_D + tl.arange(0, BLOCK_D)
                    k, k_up = _scaled_keys(_load_keys(k_base, s_kd, s_kj, d_offs, j, D, n_keys), DOT_DTYPE,
                                           INPUT_PRECISION)
                    q, qm, q_up, qm_up = _query_tiles(main_ptr, qm_ptr, stride_fb, stride_fd, rows, d_offs, B, D,
                                                      TEACHER, DOT_DTYPE, INPUT_PRECISION)
                    s_part, m_part = _logits(q, qm, k, q_up, qm_up, k_up, TEACHER, LOGITS_T, DOT_DTYPE,
                                             INPUT_PRECISION)
                    s += s_part
                    m += m_part
            if KT_LOAD:  # [BLOCK_N, BLOCK_D] loaded as such: no transpose through registers
                if PRESCALED:
                    k_t, t_up = _prescaled_keys(kc_ptr, ks_ptr, direction, t - T0, d_acc, cols, D, KC_STRIDE, True,
                                                DOT_DTYPE, INPUT_PRECISION, BLOCK_N)
                else:
                    k_t, t_up = _scaled_keys(_load_keys(k_base, s_kj, s_kd, j, d_acc, n_keys, D), DOT_DTYPE,
                                             INPUT_PRECISION)
            else:
                if NUM_DK > 1:
                    k_acc, k_up = _scaled_keys(_load_keys(k_base, s_kd, s_kj, d_acc, j, D, n_keys), DOT_DTYPE,
                                               INPUT_PRECISION)
                k_t, t_up = _trans(k_acc, INPUT_PRECISION), k_up
            # scaled fp16 products: the key sums from the previous tile's unit to this one's
            if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
                ratio = up_run / t_up
                up_run = t_up
            else:
                ratio = 1.0
            valid = j[None, :] < n_keys
            if phase == 0:
                if (pid_d == 0) & is_student:
                    sim_mask = (rows[:, None] < B) & valid
                    sim_offs = direction * B * B + rows[:, None] * B + j[None, :]
                    tl.store(sim_ptr + sim_offs, (s / temp).to(sim_ptr.dtype.element_ty), mask=sim_mask)
            # the main state needs its key sum unless it is a student's with no gradient asked for
            mx_s, z_s, acc_s = _online_softmax(mx_s, z_s, acc_s, s, valid, scale, k_t, ratio, GRAD + GRID_KINDS - 1,
                                               DOT_DTYPE, INPUT_PRECISION, TILE_SUMS)
            if RETRIEVAL:
                if is_student:
                    key_ids = tl.load(id_base + j * s_id, mask=j < n_keys, other=0)
                    hard = ((row_ids[:, None] == key_ids[None, :]) & valid).to(tl.float32)
                    count += tl.sum(hard, 1)
                    # scaled fp16 products: in the unit of the key sums (_online_softmax)
                    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
                        acc_h = _key_sum(acc_h * ratio, _operand(hard * 16384.0, DOT_DTYPE, INPUT_PRECISION), k_t,
                                         DOT_DTYPE, INPUT_PRECISION, TILE_SUMS)
                    else:
                        acc_h += _mma(_operand(hard, DOT_DTYPE, INPUT_PRECISION), k_t, DOT_DTYPE, INPUT_PRECISION)
            if TEACHER:
                mx_m, z_m, acc_m = _online_softmax(mx_m, z_m, acc_m, m, valid, scale, k_t, ratio, True, DOT_DTYPE,
                                                   INPUT_PRECISION, TILE_SUMS)
    # scaled fp16 products: the key sums back from units of 2^14 / up_run
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        unit = up_run * (1.0 / 16384.0)
        acc_s, acc_m, acc_h = acc_s * unit, acc_m * unit, acc_h * unit
    _store_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count,
                  kind, direction, pid_s, pid_d, rows, d_acc, B, D, NUM_SPLITS, GRAD, HAS_TEACHER, RETRIEVAL, TEACHER)


@triton.jit
def _store_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count,
                  kind, direction, pid_s, pid_d, rows, d_acc, B, D, NUM_SPLITS, GRAD: tl.constexpr,
                  HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr, TEACHER: tl.constexpr):
    """Write one program's states into the workspace (layout: _itc_split_fwd_kernel). The main
    state belongs to `kind`; the second one (TEACHER) is the teacher's."""
    row_ok = rows < B
    is_student = kind == 0
    stat = ((direction * 2) * NUM_SPLITS + pid_s) * B + rows  # [direction, kind, split, row]
    kind_off = NUM_SPLITS * B
    if pid_d == 0:
        tl.store(ws_max_ptr + stat + kind * kind_off, mx_s, mask=row_ok)
        tl.store(ws_z_ptr + stat + kind * kind_off, z_s, mask=row_ok)
        if RETRIEVAL:
            tl.store(ws_count_ptr + (direction * NUM_SPLITS + pid_s) * B + rows, count, mask=row_ok & is_student)
        if TEACHER:
            tl.store(ws_max_ptr + stat + kind_off, mx_m, mask=row_ok)
            tl.store(ws_z_ptr + stat + kind_off, z_m, mask=row_ok)
    n_kinds = GRAD + HAS_TEACHER + RETRIEVAL  # kinds of key sums kept: [A_s (GRAD), A_m, H]
    acc_mask = row_ok[:, None] & (d_acc[None, :] < D)
    acc_offs = ((direction * n_kinds * NUM_SPLITS + pid_s) * B + rows[:, None]) * D + d_acc[None, :]
    kind_stride = NUM_SPLITS * B * D
    # main state: the student's key sum (slot 0) only if GRAD; the teacher's at slot GRAD
    tl.store(ws_acc_ptr + acc_offs + kind * GRAD * kind_stride, acc_s, mask=acc_mask & ((kind == 1) | GRAD))
    if RETRIEVAL:
        tl.store(ws_acc_ptr + acc_offs + (GRAD + HAS_TEACHER) * kind_stride, acc_h, mask=acc_mask & is_student)
    if TEACHER:
        tl.store(ws_acc_ptr + acc_offs + GRAD * kind_stride, acc_m, mask=acc_mask)


@triton.jit
def _load_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, kind, direction, pid_s, rows, d_acc, B, D, NUM_SPLITS,
                 GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr, TEACHER: tl.constexpr):
    """The states _store_states wrote for this program (one D block: the maxima and Z of D
    block 0 are everyone's), fresh ones where it wrote none: (mx_s, z_s, acc_s, mx_m, z_m, acc_m,
    acc_h, count)."""
    row_ok = rows < B
    is_student = kind == 0
    stat = ((direction * 2) * NUM_SPLITS + pid_s) * B + rows
    kind_off = NUM_SPLITS * B
    mx_s = tl.load(ws_max_ptr + stat + kind * kind_off, mask=row_ok, other=float("-inf"))
    z_s = tl.load(ws_z_ptr + stat + kind * kind_off, mask=row_ok, other=0.0)
    mx_m = tl.load(ws_max_ptr + stat + kind_off, mask=row_ok & TEACHER, other=float("-inf"))
    z_m = tl.load(ws_z_ptr + stat + kind_off, mask=row_ok & TEACHER, other=0.0)
    count = tl.load(ws_count_ptr + (direction * NUM_SPLITS + pid_s) * B + rows, mask=row_ok & is_student & RETRIEVAL,
                    other=0.0)
    n_kinds = GRAD + HAS_TEACHER + RETRIEVAL
    acc_mask = row_ok[:, None] & (d_acc[None, :] < D)
    acc_offs = ((direction * n_kinds * NUM_SPLITS + pid_s) * B + rows[:, None]) * D + d_acc[None, :]
    kind_stride = NUM_SPLITS * B * D
    acc_s = tl.load(ws_acc_ptr + acc_offs + kind * GRAD * kind_stride, mask=acc_mask & ((kind == 1) | GRAD), other=0.0)
    acc_h = tl.load(ws_acc_ptr + acc_offs + (GRAD + HAS_TEACHER) * kind_stride, mask=acc_mask & is_student & RETRIEVAL,
                    other=0.0)
    acc_m = tl.load(ws_acc_ptr + acc_offs + GRAD * kind_stride, mask=acc_mask & TEACHER, other=0.0)
    return mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count


@triton.jit
def _split_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, stat_offs, acc_offs, ok, mask, ACC: tl.constexpr):
    """One kind's states of CHUNK splits: max and Z [CHUNK, BLOCK_M] (-inf and 0 past the last
    split) and, if ACC, the key sums [CHUNK, BLOCK_M, BLOCK_D] (else zeros, unused)."""
    m_sp = tl.load(ws_max_ptr + stat_offs, mask=ok, other=float("-inf"))
    z_sp = tl.load(ws_z_ptr + stat_offs, mask=ok, other=0.0)
    if ACC:
        a = tl.load(ws_acc_ptr + acc_offs, mask=mask, other=0.0)
    else:
        a = tl.zeros(acc_offs.shape, tl.float32)
    return m_sp, z_sp, a


@triton.jit
def _merge_states(mx, z, out, m_sp, z_sp, a, ACC: tl.constexpr):
    """CHUNK splits' states (_split_states) into a running merged one: max, Z and (ACC) the key
    sums weighted by 2^(m_split - max), rescaled as the max grows (the split kernel's online
    softmax, over splits). A split with no keys (m = -inf) weighs 0; while every split so far
    had none, the state stays empty."""
    new_mx = tl.maximum(mx, tl.max(m_sp, 0))
    base = tl.where(new_mx == float("-inf"), 0.0, new_mx)  # no -inf - -inf
    rescale = tl.exp2(mx - base)
    w = tl.exp2(m_sp - base[None, :])
    z = z * rescale + tl.sum(z_sp * w, 0)
    if ACC:
        out = out * rescale[:, None] + tl.sum(a * w[:, :, None], 0)
    return new_mx, z, out


@triton.jit
def _itc_merge_fwd_kernel(
    # pointers
    img_ptr, txt_ptr, img_m_ptr, txt_m_ptr, temp_ptr, ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr,
    dq_img_ptr, dq_txt_ptr, part_ptr, lse_ptr,
    # strides
    stride_fb, stride_fd,
    # shapes and scalars
    B, D, NUM_SPLITS, temp_value, alpha,
    # constexpr flags
    GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr, TEMP_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """Combine the splits of one (row block, D block, direction), CHUNK splits at a time (a fixed
    order: the same bits every run).

    Writes dq [B, D] (feature dtype, d loss / d q of the mean loss: 1 / (2 B)) for its D block, the
    partial row dots part [2, D blocks, 4, B] = (u . H / n, u . P_m, u_m . P_m, u . G) over its
    D block (P_m = A_m / Z_m), and from D block 0 the log-partition functions lse [2, 2, B].
    """
    pid_m, pid_d, direction = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_ptr, qm_ptr, kb_ptr = _direction_ptrs(direction, img_ptr, txt_ptr, img_m_ptr, txt_m_ptr)
    dq_ptr = tl.where(direction == 0, dq_img_ptr, dq_txt_ptr)
    inv_t = 1.0 / _temperature(temp_ptr, temp_value, TEMP_FROM_PTR)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    mask = row_ok[:, None] & (d_offs[None, :] < D)
    stat = direction * 2 * NUM_SPLITS * B  # ws_max, ws_z [2, 2, S, B]: student, then teacher
    acc0 = direction * (GRAD + HAS_TEACHER + RETRIEVAL) * NUM_SPLITS * B  # ws_acc [2, n_sums, S, B, D]

    # One pass over the splits for every state (at B = 64 the merge is a chain of dependent rounds
    # of loads over ~66 splits: the max, Z and key-sum loops one after the other took 4 times the rounds)
    mx_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z_s = tl.zeros([BLOCK_M], tl.float32)
    g = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mx_m, z_m, pm, h, count = mx_s, z_s, g, g, z_s
    for s0 in range(0, NUM_SPLITS, CHUNK):
        sp = s0 + tl.arange(0, CHUNK)
        sr = sp[:, None] * B + rows[None, :]  # (split, row) of a [S, B] array
        ok = (sp[:, None] < NUM_SPLITS) & row_ok[None, :]
        acc_offs = sr[:, :, None] * D + d_offs[None, None, :]
        acc_mask = ok[:, :, None] & (d_offs[None, None, :] < D)
        # every load of the round before any reduction: the reductions synchronize the warps, and
        # no load is issued past such a barrier (sm_90 SASS)
        m_sp, z_sp, a_s = _split_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr + acc0 * D, stat + sr, acc_offs, ok,
                                        acc_mask, GRAD)
        if HAS_TEACHER:
            m_sp_m, z_sp_m, a_m = _split_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr + (acc0 + GRAD * NUM_SPLITS * B) * D,
                                                stat + NUM_SPLITS * B + sr, acc_offs, ok, acc_mask, True)
        if RETRIEVAL:  # plain sums: hard-target key sums and their counts
            c_sp = tl.load(ws_count_ptr + direction * NUM_SPLITS * B + sr, mask=ok, other=0.0)
            h_ptr = ws_acc_ptr + (acc0 + (GRAD + HAS_TEACHER) * NUM_SPLITS * B) * D
            a_h = tl.load(h_ptr + acc_offs, mask=acc_mask, other=0.0)
        mx_s, z_s, g = _merge_states(mx_s, z_s, g, m_sp, z_sp, a_s, GRAD)
        if HAS_TEACHER:
            mx_m, z_m, pm = _merge_states(mx_m, z_m, pm, m_sp_m, z_sp_m, a_m, True)
        if RETRIEVAL:
            count += tl.sum(c_sp, 0)
            h += tl.sum(a_h, 0)
    mx_s = tl.where(row_ok, mx_s, 0.0)  # rows past B: finite, and Z = 1
    z_s = tl.where(row_ok, z_s, 1.0)
    g = g / z_s[:, None]
    if HAS_TEACHER:
        mx_m = tl.where(row_ok, mx_m, 0.0)
        z_m = tl.where(row_ok, z_m, 1.0)
        pm = pm / z_m[:, None]
    else:
        mx_m, z_m = mx_s, z_s
    u = _load_rows(q_ptr, stride_fb, stride_fd, rows, d_offs, B, D).to(tl.float32) * inv_t
    if RETRIEVAL:
        h = h / tl.where(row_ok, count, 1.0)[:, None]
    else:
        h = _load_rows(kb_ptr, stride_fb, stride_fd, rows, d_offs, B, D).to(tl.float32)
    g -= (1.0 - alpha) * h
    part = part_ptr + ((direction * tl.num_programs(1) + pid_d) * 4) * B + rows
    tl.store(part, tl.sum(u * h, 1), mask=row_ok)
    if HAS_TEACHER:
        g -= alpha * pm
        u_m = _load_rows(qm_ptr, stride_fb, stride_fd, rows, d_offs, B, D).to(tl.float32) * inv_t
        tl.store(part + B, tl.sum(u * pm, 1), mask=row_ok)
        tl.store(part + 2 * B, tl.sum(u_m * pm, 1), mask=row_ok)
    if not GRAD:  # no gradient asked for: dq and dT are zeros
        g = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tl.store(part + 3 * B, tl.sum(u * g, 1), mask=row_ok)
    # dq of the mean of the two directions' losses: 1 / (2 B)
    tl.store(dq_ptr + rows[:, None] * D + d_offs[None, :], (g * (inv_t * 0.5 / B)).to(dq_ptr.dtype.element_ty),
             mask=mask)
    if pid_d == 0:
        tl.store(lse_ptr + direction * 2 * B + rows, (mx_s + tl.log2(z_s)) * 0.6931471805599453, mask=row_ok)
        tl.store(lse_ptr + (direction * 2 + 1) * B + rows, (mx_m + tl.log2(z_m)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _finish_direction(part_ptr, lse_ptr, direction, temp, B, NUM_DBLOCKS, alpha, HAS_TEACHER: tl.constexpr,
                      BLOCK_B: tl.constexpr, DBLOCKS: tl.constexpr):
    """Means over the rows of one direction: (loss, d loss / d T, ce, kl). Each block of rows loads
    the partials of all its D blocks at once ([DBLOCKS, BLOCK_B] tiles, DBLOCKS >= NUM_DBLOCKS):
    one round of loads, not one per D block (at B = 64 the D-block loop was 16 dependent rounds
    a direction)."""
    sum_loss = tl.zeros([BLOCK_B], tl.float32)  # per-lane sums, reduced once at the end
    sum_dt = tl.zeros([BLOCK_B], tl.float32)
    sum_ce = tl.zeros([BLOCK_B], tl.float32)
    sum_kl = tl.zeros([BLOCK_B], tl.float32)
    db = tl.arange(0, DBLOCKS)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        ok = rows < B
        offs = ((direction * NUM_DBLOCKS + db[:, None]) * 4) * B + rows[None, :]
        mask = (db[:, None] < NUM_DBLOCKS) & ok[None, :]
        # every load before the reductions (no load is issued past their barriers)
        h_s = tl.load(part_ptr + offs, mask=mask, other=0.0)
        u_g = tl.load(part_ptr + offs + 3 * B, mask=mask, other=0.0)
        lse_s = tl.load(lse_ptr + direction * 2 * B + rows, mask=ok, other=0.0)
        if HAS_TEACHER:
            c_m = tl.load(part_ptr + offs + B, mask=mask, other=0.0)
            d_m = tl.load(part_ptr + offs + 2 * B, mask=mask, other=0.0)
            lse_m = tl.load(lse_ptr + (direction * 2 + 1) * B + rows, mask=ok, other=0.0)
        h_s = tl.sum(h_s, 0)
        u_g = tl.sum(u_g, 0)
        loss = lse_s - (1.0 - alpha) * h_s
        if HAS_TEACHER:
            c_m = tl.sum(c_m, 0)
            d_m = tl.sum(d_m, 0)
            loss -= alpha * c_m
            sum_kl += tl.where(ok, d_m - lse_m - c_m + lse_s, 0.0)
        sum_loss += tl.where(ok, loss, 0.0)
        sum_dt += tl.where(ok, -u_g / temp, 0.0)
        sum_ce += tl.where(ok, lse_s - h_s, 0.0)
    return tl.sum(sum_loss, 0) / B, tl.sum(sum_dt, 0) / B, tl.sum(sum_ce, 0) / B, tl.sum(sum_kl, 0) / B


@triton.jit
def _itc_finish_fwd_kernel(
    # pointers
    part_ptr, lse_ptr, temp_ptr, loss_ptr, losses_ptr, grad_temp_ptr, grad_temp_dirs_ptr, terms_ptr,
    # shapes and scalars
    B, NUM_DBLOCKS, temp_value, alpha,
    # constexpr flags
    HAS_TEACHER: tl.constexpr, TEMP_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr, DBLOCKS: tl.constexpr,
):
    """The scalars of both directions (grid (1,)): loss (their mean), losses [2],
    grad_temp = d loss / d T, grad_temp_dirs [2] = d loss_dir / d T, terms [4] = (ce, ce, kl, kl).
    DBLOCKS: NUM_DBLOCKS (the merge's D blocks) rounded up to a power of two."""
    temp = _temperature(temp_ptr, temp_value, TEMP_FROM_PTR)
    loss_0, dt_0, ce_0, kl_0 = _finish_direction(part_ptr, lse_ptr, 0, temp, B, NUM_DBLOCKS, alpha, HAS_TEACHER,
                                                 BLOCK_B, DBLOCKS)
    loss_1, dt_1, ce_1, kl_1 = _finish_direction(part_ptr, lse_ptr, 1, temp, B, NUM_DBLOCKS, alpha, HAS_TEACHER,
                                                 BLOCK_B, DBLOCKS)
    tl.store(loss_ptr, (loss_0 + loss_1) * 0.5)
    tl.store(grad_temp_ptr, (dt_0 + dt_1) * 0.5)
    tl.store(losses_ptr, loss_0)
    tl.store(losses_ptr + 1, loss_1)
    tl.store(grad_temp_dirs_ptr, dt_0)
    tl.store(grad_temp_dirs_ptr + 1, dt_1)
    tl.store(terms_ptr, ce_0)
    tl.store(terms_ptr + 1, ce_1)
    tl.store(terms_ptr + 2, kl_0)
    tl.store(terms_ptr + 3, kl_1)


@triton.jit
def _store_f16(ptr, y, lo_offset, mask, PAIRS: tl.constexpr):
    """y (scaled, fp32) as fp16 at ptr; PAIRS: its (hi, lo) pair as _operand makes it for
    "f16x3", lo at ptr + lo_offset."""
    hi = y.to(tl.float16)
    tl.store(ptr, hi, mask=mask)
    if PAIRS:
        tl.store(ptr + lo_offset, (y - hi.to(tl.float32)).to(tl.float16), mask=mask)


@triton.jit
def _convert_key_tile(base, s_kd, s_kj, j, n_keys, out_base, D, KC_STRIDE, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, NUM_DK: tl.constexpr, PAIRS: tl.constexpr):
    """Key tile [D, BLOCK_N] (element (d, j) at base + d s_kd + j s_kj) -> its scaled fp16 form at
    out_base (row stride KC_STRIDE; PAIRS: lo 2 D KC_STRIDE further): scaled by _f16_scales of
    its largest |element|, as _scaled_keys does in the loop; returns the scale's inverse (up)."""
    amax = tl.zeros([], tl.float32)
    for dk in range(NUM_DK):
        d_offs = dk * BLOCK_D + tl.arange(0, BLOCK_D)
        amax = tl.maximum(amax, tl.max(tl.abs(_load_keys(base, s_kd, s_kj, d_offs, j, D, n_keys).to(tl.float32))))
    down, up = _f16_scales(amax)
    cols = tl.arange(0, BLOCK_N)
    for dk in range(NUM_DK):
        d_offs = dk * BLOCK_D + tl.arange(0, BLOCK_D)
        x = _load_keys(base, s_kd, s_kj, d_offs, j, D, n_keys)
        _store_f16(out_base + d_offs[:, None] * KC_STRIDE + cols[None, :], x * down, 2 * D * KC_STRIDE,
                   d_offs[:, None] < D, PAIRS)
    return up


@triton.jit
def _convert_rows(x_ptr, stride_fb, stride_fd, rows, out_base, up_base, B, D, BLOCK_D: tl.constexpr,
                  NUM_DK: tl.constexpr, PAIRS: tl.constexpr):
    """Rows [ROWS, D] of a feature tensor -> their scaled fp16 form at out_base ([B, D]
    contiguous; PAIRS: lo 4 B D further), each row scaled by _f16_scales of its largest |element|
    as _scaled_rows does; ups at up_base."""
    amax = tl.zeros([rows.shape[0]], tl.float32)
    for dk in range(NUM_DK):
        d_offs = dk * BLOCK_D + tl.arange(0, BLOCK_D)
        x = _load_rows(x_ptr, stride_fb, stride_fd, rows, d_offs, B, D).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
    down, up = _f16_scales(amax)
    for dk in range(NUM_DK):
        d_offs = dk * BLOCK_D + tl.arange(0, BLOCK_D)
        x = _load_rows(x_ptr, stride_fb, stride_fd, rows, d_offs, B, D)
        _store_f16(out_base + rows[:, None] * D + d_offs[None, :], x * down[:, None], 4 * B * D,
                   (rows[:, None] < B) & (d_offs[None, :] < D), PAIRS)
    tl.store(up_base + rows, up, mask=rows < B)


@triton.jit
def _itc_keys_fwd_kernel(
    # pointers
    img_ptr, txt_ptr, img_m_ptr, txt_m_ptr, img_queue_ptr, txt_queue_ptr, kc_ptr, ks_ptr, qc_ptr, qs_ptr,
    # strides
    stride_fb, stride_fd, stride_qd, stride_qj,
    # shapes
    B, Q, D, KC_STRIDE, T0, NT,
    # constexpr flags
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DK: tl.constexpr, ROWS: tl.constexpr, PAIRS: tl.constexpr,
):
    """The operands of both directions in "f16s" form (PAIRS: "f16x3"'s (hi, lo) pairs, the lo
    halves after all the hi ones in kc and in qc), once per call, for the split kernel's
    PRESCALED mode, a chunk of NT key tiles from tile T0 at a time (the tile space: the in-batch
    keys' tiles, then the queue's); grid (NT [+ 2 x row blocks of ROWS: the first chunk], 2 directions):
    kc [2, D, KC_STRIDE] fp16, chunk tile t in columns [t BLOCK_N, (t + 1) BLOCK_N) (zero-padded),
    ks [2, KC_STRIDE / BLOCK_N] fp32 each tile's up; qc [2, 2, B, D] fp16 the query rows
    [direction, student / teacher], qs [2, 2, B] their ups. Features [B, D] (strides stride_fb,
    stride_fd), queues [D, Q] (stride_qd, stride_qj)."""
    t, direction = tl.program_id(0), tl.program_id(1)
    if t >= NT:  # query rows: program NT + 2 r + kind converts row block r of that kind
        kind, rows = (t - NT) % 2, ((t - NT) // 2) * ROWS + tl.arange(0, ROWS)
        q_ptr, qm_ptr, _ = _direction_ptrs(direction, img_ptr, txt_ptr, img_m_ptr, txt_m_ptr)
        slot = direction * 2 + kind
        _convert_rows(tl.where(kind == 0, q_ptr, qm_ptr), stride_fb, stride_fd, rows, qc_ptr + slot * B * D,
                      qs_ptr + slot * B, B, D, BLOCK_D, NUM_DK, PAIRS)
        return
    out_base = kc_ptr + direction * D * KC_STRIDE + t * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    batch_tiles = tl.cdiv(B, BLOCK_N)
    g = T0 + t  # the tile's place in the tile space
    if g < batch_tiles:  # the in-batch keys of i2t are the text momentum features, of t2i the image ones
        kb_ptr = tl.where(direction == 0, txt_m_ptr, img_m_ptr)
        up = _convert_key_tile(kb_ptr, stride_fd, stride_fb, g * BLOCK_N + cols, B, out_base, D, KC_STRIDE,
                               BLOCK_N, BLOCK_D, NUM_DK, PAIRS)
    else:
        queue_ptr = tl.where(direction == 0, txt_queue_ptr, img_queue_ptr)
        up = _convert_key_tile(queue_ptr, stride_qd, stride_qj, (g - batch_tiles) * BLOCK_N + cols, Q, out_base, D,
                               KC_STRIDE, BLOCK_N, BLOCK_D, NUM_DK, PAIRS)
    tl.store(ks_ptr + direction * (KC_STRIDE // BLOCK_N) + t, up)


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


def _merge_blocks(b: int, d: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, CHUNK) of the merge: small tiles, so that B = 64 still spreads over many
    SMs, CHUNK splits loaded at once (the interpreter: 2, to cover partial chunks).
    ALBEF_FAST_MERGE="BLOCK_M,BLOCK_D,CHUNK" (powers of two) replaces them: untimed lead for B = 64,
    "8,16,32" (twice the programs, 3 dependent rounds of loads per loop instead of 5 at ~66 splits;
    207-212 registers, no spills, sm_90a AOT) against 25 us of merge per bf16 step (H200 run 4)."""
    if os.environ.get("ALBEF_FAST_MERGE"):
        return _merge_setting(os.environ["ALBEF_FAST_MERGE"])
    if _INTERPRET:
        return 16, 16, 2
    block_d = 64 if b >= 256 else 32 if b >= 128 else 16  # >= 128 programs for D = 256 (H200: 132 SMs)
    # 16 x 16 tiles take 16 splits at once with no spills (233 registers; 8 at 32- and 64-wide:
    # sm_90 AOT), halving the chain of dependent loads at B = 64, where splits reach 30-100
    return 16, min(block_d, max(16, _next_pow2(d))), 16 if block_d == 16 else 8


def _merge_setting(spec: str) -> Tuple[int, int, int]:
    try:
        blocks = tuple(int(v) for v in spec.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 3 or any(v < 1 or v & (v - 1) for v in blocks):
        raise ValueError(f"ALBEF_FAST_MERGE: expected three powers of two BLOCK_M,BLOCK_D,CHUNK, got {spec!r}")
    return blocks


def _dot_flags(dtype: torch.dtype, precision: str):
    """(DOT_DTYPE, INPUT_PRECISION) for the feature dtype and the fp32 product precision."""
    if dtype == torch.float32:
        if precision == "medium":
            return tl.bfloat16, "ieee"
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


def _tile_sums(input_precision: str) -> bool:
    """The split kernel's TILE_SUMS (_key_sum): for f16x3 unless ALBEF_FAST_TILE_SUMS=0. Not for
    f16s: Triton folds a single product's addition into its accumulator."""
    return input_precision == "f16x3" and os.environ.get("ALBEF_FAST_TILE_SUMS", "1") != "0"


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
    if plan.cpp is None and CPP is not None and not torch.compiler.is_compiling():
        return _recorded(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v)
    return _launch(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v)


def _recorded(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v):
    """_launch with its launches recorded, and the plan registered with the C++ step
    (kernels/cpp_launch.py; plan.cpp: its id, or -1)."""
    launch.RECORDING = records = []
    try:
        ws, outputs = _launch(plan, feats, image_queue, text_queue, temp, temp_t, alpha, idx_v, idq_v, keep=True)
    finally:
        launch.RECORDING = None
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
        split((*feats, image_queue, text_queue, idx_v, idq_v, temp_arg, ws.max, ws.z, ws.acc, ws.count, sims,
               *converted), (temp_v,))
    dq_img = torch.empty((b, d), device=dev, dtype=feats[0].dtype)
    dq_txt = torch.empty((b, d), device=dev, dtype=feats[1].dtype)
    plan.merge((*feats, temp_arg, ws.max, ws.z, ws.acc, ws.count, dq_img, dq_txt, ws.part, ws.lse),
               (temp_v, float(alpha)))
    loss, grad_temp = torch.empty((), device=dev), torch.empty((), device=dev)
    losses, grad_temp_dirs, terms = torch.empty(2, device=dev), torch.empty(2, device=dev), torch.empty(4, device=dev)
    plan.finish((ws.part, ws.lse, temp_arg, loss, losses, grad_temp, grad_temp_dirs, terms), (temp_v, float(alpha)))
    outputs = loss, losses, dq_img, dq_txt, grad_temp, grad_temp_dirs, sims, terms
    return (ws, outputs) if keep else outputs


# what the launches depend on besides the arguments: read at each call (tests and the per-config
# benchmark change them between calls), part of the plan key. ALBEF_FAST_CHUNK_TILES: f16p's key
# tiles per conversion chunk (default: _converted_bytes)
_SETTINGS = ("ALBEF_FAST_CONFIG", "ALBEF_FAST_WAVES", "ALBEF_FAST_AUTOTUNE", "ALBEF_FAST_TUNED", "ALBEF_FAST_SPLITS",
             "ALBEF_FAST_TF32", "ALBEF_FAST_FP32_DOT", "ALBEF_FAST_CHUNK_TILES", "ALBEF_FAST_TILE_SUMS",
             "ALBEF_FAST_MERGE", "ALBEF_FAST_STAGE_ROWS")


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
        merge_m, merge_d, chunk = _merge_blocks(b, d)
        merge_d_blocks = _cdiv(d, merge_d)
        self.ws_shapes = _Workspace.shapes(splits, b, d, n_sums, merge_d_blocks)
        flags = dict(GRAD=grad, HAS_TEACHER=teacher, RETRIEVAL=retrieval, TEMP_FROM_PTR=temp_dtype is not None)
        id_strides = ids[2:] if retrieval else (1, 1)
        split_ints = (*feat_strides, *queue_strides, *id_strides, b, q, d, splits)
        split_flags = dict(flags, DOT_DTYPE=dot_dtype, INPUT_PRECISION=input_precision,
                           TILE_SUMS=_tile_sums(input_precision), STAGE_ROWS=_stage_rows(input_precision))
        plain = dict(split_flags, PRESCALED=False, RESUME=False)
        self.converted_sizes = None
        if config is None:  # autotune over candidates(): through the autotuner at each call
            self.splits = [(None, functools.partial(_autotuned_split, split_ints + (1, 0, 0), plain))]
        else:
            grid, meta = _split_meta(config, b, d, splits, teacher)
            split = functools.partial(_LAUNCH["split"].prepare, grid, options=launch_options(config))
            if prescaled and meta["BLOCK_D"] >= d:
                self.splits = self._chunked_splits(split, split_ints, dict(meta, **split_flags), b, q, d, feat_strides,
                                                   queue_strides)
            else:
                self.splits = [(None, split(split_ints + (1, 0, 0), dict(meta, **plain)))]
        self.merge = _LAUNCH["merge"].prepare(
            (_cdiv(b, merge_m), merge_d_blocks, 2), (*feat_strides, b, d, splits),
            dict(flags, BLOCK_M=merge_m, BLOCK_D=merge_d, CHUNK=chunk), _FOUR_WARPS)
        dblocks = _next_pow2(merge_d_blocks)  # the finish loads 4 [dblocks, BLOCK_B] tiles of <= 2048 values
        self.finish = _LAUNCH["finish"].prepare(
            (1,), (b, merge_d_blocks),
            dict(HAS_TEACHER=teacher, TEMP_FROM_PTR=temp_dtype is not None,
                 BLOCK_B=min(_next_pow2(b), max(16, 2048 // dblocks)), DBLOCKS=dblocks),
            _FOUR_WARPS)

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
                                            dict(constexprs, PRESCALED=True, RESUME=t0 > 0))))
        return launches

    def converted(self, ws: "_Workspace"):
        """(kc, ks, qc, qs) for the f16p launches (flat views, the kernels index them), else four
        unused pointers."""
        if self.converted_sizes is None:
            return (ws.count,) * 4
        halves, singles = self.converted_sizes
        kc, qc = torch.empty(sum(halves), device=ws.count.device, dtype=torch.float16).split(halves)
        ks, qs = torch.empty(sum(singles), device=ws.count.device).split(singles)
        return kc, ks, qc, qs


def _converted_bytes(b: int) -> int:
    """The converted key tiles of one f16p chunk (both directions): within SPEC's extra-memory
    budget with the rest of the call (workspace, outputs: ~17 MiB at B = 64, ~28 at B = 512)."""
    return (12 << 20) if b <= 128 else (32 << 20)


def _autotuned_split(ints, constexprs, tensors, floats) -> None:
    _itc_split_fwd_kernel[_split_grid](*tensors, *ints, *floats, **constexprs)


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
    sums), part [2, D blocks, 4, B] (row partial dots), lse [2, 2, B]. Every element the merge
    reads is written by the split kernel first: no fills."""

    __slots__ = ("max", "z", "count", "acc", "part", "lse")

    def __init__(self, device, sizes: Tuple[int, ...]):
        flat = torch.empty(sum(sizes), device=device, dtype=torch.float32)
        # flat 1-D views (one op): the kernels index them themselves
        self.max, self.z, self.count, self.acc, self.part, self.lse = flat.split(sizes)

    @staticmethod
    def shapes(splits: int, b: int, d: int, n_sums: int, merge_d_blocks: int) -> Tuple[int, ...]:
        """The element counts of the views above."""
        shapes = [(2, 2, splits, b), (2, 2, splits, b), (2, splits, b), (2, n_sums, splits, b, d),
                  (2, merge_d_blocks, 4, b), (2, 2, b)]
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


def _common_strides(feats):
    """The kernels take one stride pair for all four feature tensors: make them agree."""
    if all(f.stride() == feats[0].stride() for f in feats):
        return feats
    return [f.contiguous() for f in feats]
