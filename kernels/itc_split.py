"""The split kernel: each program streams its share of [in-batch keys ; queue] once and keeps
online-softmax states (max, Z, key sums) for its rows, written to the workspace for
kernels/itc_merge.py to combine (SPEC sections 3 and 6). Launched by kernels/itc.py; its configs
are in kernels/itc_configs.py.

Workspace layout (fp32, flat; S = NUM_SPLITS, R = key sums kept: student if GRAD, teacher,
hard-target): ws_max, ws_z [2 directions, 2 kinds, S, B], ws_acc [2, R, S, B, D],
ws_count [2, S, B] (_store_states).
"""
import triton
import triton.language as tl

from .itc_configs import candidates
from .itc_operands import (_direction_ptrs, _key_operand, _load_keys, _load_rows, _mma, _mma_into, _operand,
                           _scaled_rows, _temperature, _trans)


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b): triton.cdiv is a JIT-callable whose host call costs microseconds."""
    return -(-a // b)


def _split_grid(meta):
    """(kinds x row blocks, key splits, 2 directions x D blocks) for the config in meta."""
    rows = _cdiv(meta["B"], meta["BLOCK_M"]) * meta["GRID_KINDS"]
    return (rows, meta["NUM_SPLITS"], 2 * _cdiv(meta["D"], meta["BLOCK_D"]))


def _kind_heuristics(args):
    """KIND_AXIS (a config choice): student and teacher states in separate programs of one launch
    (GRID_KINDS = 2; each program keeps one state, so half the accumulators) or both in one."""
    two = bool(args["KIND_AXIS"]) and bool(args["HAS_TEACHER"])
    return {"GRID_KINDS": 2 if two else 1, "TEACHER": bool(args["HAS_TEACHER"]) and not two}


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
    """Raw dots of one D block (prepared operands and their scales, _query_tiles / _key_operand):
    (q . k [BLOCK_M, BLOCK_N], q_m . k if TEACHER else 0)."""
    s = _logits_product(q, k, LOGITS_T, DOT_DTYPE, INPUT_PRECISION)
    # the row scales apart from the tile's (powers of two: the same bits as s * (q_up * k_up)), so
    # that their move into the product's layout stays out of the key loop: (q_up * k_up) went
    # through shared memory, with a barrier, at every tile (sm_90a SASS: 6 -> 5 barriers a tile)
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        s = s * q_up[:, None] * k_up
    if TEACHER:
        m = _logits_product(qm, k, LOGITS_T, DOT_DTYPE, INPUT_PRECISION)
        if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
            m = m * qm_up[:, None] * k_up
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
        # the weights' shift: from |max| = 2^25 on (fp32 spacing >= 4) max - 14 can round down by
        # 2 or more, and a weight of 2^16 overflows fp16; there 1-2 spacings up keep each <= 2^14
        # (below 2^25 the subtraction is off by at most half a spacing: left as it is)
        shift = new_mx - 14.0
        shift = tl.where(new_mx - shift > 15.0, shift + tl.abs(shift) * 1.1920928955078125e-07, shift)
        p = tl.exp2(l2 - shift[:, None])
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


@triton.jit
def _fresh_states(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The states of no keys yet: (mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count)."""
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    zero_rows, zero_tile = tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    return mx, zero_rows, zero_tile, mx, zero_rows, zero_tile, zero_tile, zero_rows


@triton.jit
def _tile_span(B, Q, NUM_SPLITS, T0, T1, pid_s, PRESCALED: tl.constexpr, INTERLEAVE: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """This split's share of the tile space (tiles of BLOCK_N keys: [in-batch keys ; queue], or the
    converted chunk [T0, T1) if PRESCALED): (t_begin, t_end, t_step, batch_tiles), batch_tiles
    = the in-batch keys' tiles."""
    batch_tiles = tl.cdiv(B, BLOCK_N)
    if PRESCALED:  # this launch's chunk of the tile space
        t_first, t_last = T0, T1
    else:
        t_first, t_last = 0, batch_tiles + tl.cdiv(Q, BLOCK_N)
    if INTERLEAVE:  # split s takes tiles s, s + S, ...: the programs running at once read neighbours
        t_begin, t_end, t_step = t_first + pid_s, t_last, NUM_SPLITS
    else:  # a contiguous range of tiles
        tiles_per_split = tl.cdiv(t_last - t_first, NUM_SPLITS)
        t_begin = t_first + pid_s * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, t_last)
        t_step = 1
    return t_begin, t_end, t_step, batch_tiles


@triton.jit
def _phase_span(PHASE: tl.constexpr, t_begin, t_end, batch_tiles, NUM_SPLITS, INTERLEAVE: tl.constexpr):
    """The split's tiles [lo, hi) in phase 0 (the in-batch keys) or 1 (the queue), and shift, the
    phase's first tile in the tile space: (lo, hi, shift)."""
    if PHASE == 0:
        lo, hi, shift = t_begin, tl.minimum(t_end, batch_tiles), 0
    else:
        if INTERLEAVE:  # this split's first tile past the in-batch ones
            lo = t_begin + tl.cdiv(tl.maximum(batch_tiles - t_begin, 0), NUM_SPLITS) * NUM_SPLITS
        else:
            lo = tl.maximum(t_begin, batch_tiles)
        hi, shift = t_end, batch_tiles
    return lo, hi, shift


@triton.jit
def _key_tile(keys, t, d_offs, j, cols, TRANSPOSED: tl.constexpr, PRESCALED: tl.constexpr, DOT_DTYPE: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, KEYS_AS_IS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile t (keys j, D columns d_offs) as a product operand: (operand [BLOCK_D, BLOCK_N], or
    [BLOCK_N, BLOCK_D] if TRANSPOSED; its scale; whether it fell outside _f16_as_is, KEYS_AS_IS).
    keys = (k_base, s_kd, s_kj, n_keys: this phase's keys; kc_ptr, ks_ptr, direction, KC_STRIDE,
    T0: the converted chunk, PRESCALED; D)."""
    k_base, s_kd, s_kj, n_keys, kc_ptr, ks_ptr, direction, KC_STRIDE, T0, D = keys
    if PRESCALED:
        k, k_up = _prescaled_keys(kc_ptr, ks_ptr, direction, t - T0, d_offs, cols, D, KC_STRIDE, TRANSPOSED,
                                  DOT_DTYPE, INPUT_PRECISION, BLOCK_N)
        outside = False
    elif TRANSPOSED:
        k, k_up, outside = _key_operand(k_base, s_kj, s_kd, j, d_offs, n_keys, D, DOT_DTYPE, INPUT_PRECISION,
                                        KEYS_AS_IS)
    else:
        k, k_up, outside = _key_operand(k_base, s_kd, s_kj, d_offs, j, D, n_keys, DOT_DTYPE, INPUT_PRECISION,
                                        KEYS_AS_IS)
    return k, k_up, outside


@triton.jit
def _blocked_logits(keys, t, j, cols, main_ptr, qm_ptr, stride_fb, stride_fd, rows, B, D, outside,
                    TEACHER: tl.constexpr, LOGITS_T: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, KEYS_AS_IS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DK: tl.constexpr):
    """The raw logits (s, m [BLOCK_M, BLOCK_N], _logits) of key tile t with D in NUM_DK blocks, the
    query and key tiles loaded for each, and outside (KEYS_AS_IS) or'ed with whether one of
    them fell outside _f16_as_is."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    m = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for dk in range(NUM_DK):
        d_offs = dk * BLOCK_D + tl.arange(0, BLOCK_D)
        # as it is, not transposed; never PRESCALED (its tiles have D in one block)
        k, k_up, tile_out = _key_tile(keys, t, d_offs, j, cols, False, False, DOT_DTYPE, INPUT_PRECISION, KEYS_AS_IS,
                                      BLOCK_N)
        outside |= tile_out
        q, qm, q_up, qm_up = _query_tiles(main_ptr, qm_ptr, stride_fb, stride_fd, rows, d_offs, B, D, TEACHER,
                                          DOT_DTYPE, INPUT_PRECISION)
        s_part, m_part = _logits(q, qm, k, q_up, qm_up, k_up, TEACHER, LOGITS_T, DOT_DTYPE, INPUT_PRECISION)
        s += s_part
        m += m_part
    return s, m, outside


@triton.jit
def _unit_step(up_run, t_up, INPUT_PRECISION: tl.constexpr):
    """Scaled fp16 products: (ratio, up_run), the key sums' move from the previous tile's unit to
    this one's (t_up; _online_softmax); else (1, up_run)."""
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        ratio = up_run / t_up
        up_run = t_up
    else:
        ratio = 1.0
    return ratio, up_run


@triton.jit
def _store_sims(sim_ptr, s, temp, rows, j, valid, direction, B):
    """The student's [B, B] sim block of one in-batch key tile (s / temp) into sim [2, B, B]."""
    sim_mask = (rows[:, None] < B) & valid
    sim_offs = direction * B * B + rows[:, None] * B + j[None, :]
    tl.store(sim_ptr + sim_offs, (s / temp).to(sim_ptr.dtype.element_ty), mask=sim_mask)


@triton.jit
def _hard_sums(count, acc_h, id_base, s_id, row_ids, j, n_keys, valid, k_t, ratio, DOT_DTYPE: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, TILE_SUMS: tl.constexpr):
    """One key tile into the student's hard (retrieval) targets: count [BLOCK_M], the number of
    keys whose id is the row's, and acc_h [BLOCK_M, BLOCK_D], their key sum."""
    key_ids = tl.load(id_base + j * s_id, mask=j < n_keys, other=0)
    hard = ((row_ids[:, None] == key_ids[None, :]) & valid).to(tl.float32)
    count += tl.sum(hard, 1)
    # scaled fp16 products: in the unit of the key sums (_online_softmax)
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        acc_h = _key_sum(acc_h * ratio, _operand(hard * 16384.0, DOT_DTYPE, INPUT_PRECISION), k_t, DOT_DTYPE,
                         INPUT_PRECISION, TILE_SUMS)
    else:
        acc_h += _mma(_operand(hard, DOT_DTYPE, INPUT_PRECISION), k_t, DOT_DTYPE, INPUT_PRECISION)
    return count, acc_h


@triton.jit
def _stream_keys(states, queries, ptrs, strides, shapes, program, GRAD: tl.constexpr, RETRIEVAL: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, PRESCALED: tl.constexpr,
                 TILE_SUMS: tl.constexpr, INTERLEAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, KT_LOAD: tl.constexpr, LOGITS_T: tl.constexpr, NUM_DK: tl.constexpr,
                 GRID_KINDS: tl.constexpr, TEACHER: tl.constexpr, KEYS_AS_IS: tl.constexpr):
    """This split's key tiles (of [in-batch keys ; queue], or of the converted chunk [T0, T1) if
    PRESCALED) into the running states (mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count: see
    _itc_split_fwd_kernel), the sim blocks written on the way. Returns the states, up_run (the
    key sums' unit: _online_softmax) and, with KEYS_AS_IS, whether a key tile fell outside
    _f16_as_is (its values then wrong: the caller streams again without KEYS_AS_IS).
    Tuples, as _itc_split_fwd_kernel names them: states (mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h,
    count), queries (q_one, qm_one, q_up_one, qm_up_one), ptrs (main_ptr, qm_ptr, kb_ptr, queue_ptr,
    idx_ptr, idx_queue_ptr, sim_ptr, kc_ptr, ks_ptr), strides (stride_fb, stride_fd, stride_qd,
    stride_qj, stride_idx, stride_idq), shapes (B, Q, D, NUM_SPLITS, KC_STRIDE, T0, T1), program
    (temp, scale, rows, row_ids, d_acc, cols, direction, pid_s, pid_d, is_student)."""
    mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count = states
    q_one, qm_one, q_up_one, qm_up_one = queries
    main_ptr, qm_ptr, kb_ptr, queue_ptr, idx_ptr, idx_queue_ptr, sim_ptr, kc_ptr, ks_ptr = ptrs
    stride_fb, stride_fd, stride_qd, stride_qj, stride_idx, stride_idq = strides
    B, Q, D, NUM_SPLITS, KC_STRIDE, T0, T1 = shapes
    temp, scale, rows, row_ids, d_acc, cols, direction, pid_s, pid_d, is_student = program
    up_run = tl.full([], 1.0, tl.float32)  # scaled fp16 modes: the latest key-sum operand's scale
    outside = tl.zeros([], tl.int1)  # KEYS_AS_IS: a key tile outside _f16_as_is was seen
    t_begin, t_end, t_step, batch_tiles = _tile_span(B, Q, NUM_SPLITS, T0, T1, pid_s, PRESCALED, INTERLEAVE, BLOCK_N)
    for phase in tl.static_range(2):
        # phase 0: in-batch keys [B, D] (row layout); phase 1: the queue [D, Q]; one tile space.
        if phase == 0:
            k_base, s_kd, s_kj, n_keys, id_base, s_id = kb_ptr, stride_fd, stride_fb, B, idx_ptr, stride_idx
        else:
            k_base, s_kd, s_kj, n_keys, id_base, s_id = queue_ptr, stride_qd, stride_qj, Q, idx_queue_ptr, stride_idq
        keys = k_base, s_kd, s_kj, n_keys, kc_ptr, ks_ptr, direction, KC_STRIDE, T0, D
        lo, hi, shift = _phase_span(phase, t_begin, t_end, batch_tiles, NUM_SPLITS, INTERLEAVE)
        for t in range(lo, hi, t_step):
            j = (t - shift) * BLOCK_N + cols
            if NUM_DK == 1:  # the query tiles stay loaded (q_one, qm_one); one key tile serves all
                k_acc, k_up, tile_out = _key_tile(keys, t, d_acc, j, cols, False, PRESCALED, DOT_DTYPE,
                                                  INPUT_PRECISION, KEYS_AS_IS, BLOCK_N)
                outside |= tile_out
                s, m = _logits(q_one, qm_one, k_acc, q_up_one, qm_up_one, k_up, TEACHER, LOGITS_T, DOT_DTYPE,
                               INPUT_PRECISION)
            else:  # D in NUM_DK blocks for the logits, then this program's D block of the keys again
                s, m, outside = _blocked_logits(keys, t, j, cols, main_ptr, qm_ptr, stride_fb, stride_fd, rows, B,
                                                D, outside, TEACHER, LOGITS_T, DOT_DTYPE, INPUT_PRECISION, KEYS_AS_IS,
                                                BLOCK_M, BLOCK_N, BLOCK_D, NUM_DK)
            if KT_LOAD:  # [BLOCK_N, BLOCK_D] loaded as such: no transpose through registers
                k_t, t_up, tile_out = _key_tile(keys, t, d_acc, j, cols, True, PRESCALED, DOT_DTYPE,
                                                INPUT_PRECISION, KEYS_AS_IS, BLOCK_N)
                outside |= tile_out
            else:
                if NUM_DK > 1:
                    k_acc, k_up, tile_out = _key_tile(keys, t, d_acc, j, cols, False, PRESCALED, DOT_DTYPE,
                                                      INPUT_PRECISION, KEYS_AS_IS, BLOCK_N)
                    outside |= tile_out
                k_t, t_up = _trans(k_acc, INPUT_PRECISION), k_up
            ratio, up_run = _unit_step(up_run, t_up, INPUT_PRECISION)
            valid = j[None, :] < n_keys
            if phase == 0:
                if (pid_d == 0) & is_student:
                    _store_sims(sim_ptr, s, temp, rows, j, valid, direction, B)
            # the main state needs its key sum unless it is a student's with no gradient asked for
            mx_s, z_s, acc_s = _online_softmax(mx_s, z_s, acc_s, s, valid, scale, k_t, ratio, GRAD + GRID_KINDS - 1,
                                               DOT_DTYPE, INPUT_PRECISION, TILE_SUMS)
            if RETRIEVAL:
                if is_student:
                    count, acc_h = _hard_sums(count, acc_h, id_base, s_id, row_ids, j, n_keys, valid, k_t, ratio,
                                              DOT_DTYPE, INPUT_PRECISION, TILE_SUMS)
            if TEACHER:
                mx_m, z_m, acc_m = _online_softmax(mx_m, z_m, acc_m, m, valid, scale, k_t, ratio, True, DOT_DTYPE,
                                                   INPUT_PRECISION, TILE_SUMS)
    return mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count, up_run, outside


@triton.jit
def _initial_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, kind, direction, pid_s, rows, d_acc, B, D,
                    NUM_SPLITS, GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr,
                    TEACHER: tl.constexpr, RESUME: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The states a program starts from (mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count): fresh
    ones, or with RESUME those the previous chunk's launch left in the workspace, the key sums in
    units of 2^14 (the running unit up_run starts at 1)."""
    mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count = _fresh_states(BLOCK_M, BLOCK_D)
    if RESUME:
        mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count = _load_states(
            ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, kind, direction, pid_s, rows, d_acc, B, D, NUM_SPLITS,
            GRAD, HAS_TEACHER, RETRIEVAL, TEACHER)
        acc_s, acc_m, acc_h = acc_s * 16384.0, acc_m * 16384.0, acc_h * 16384.0
    return mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count


@triton.jit
def _program_queries(main_ptr, qm_ptr, qc_ptr, qs_ptr, ws_acc_ptr, stride_fb, stride_fd, direction, kind, pid_s, pid_m,
                     rows, d_acc, B, D, NUM_SPLITS, GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr,
                     RETRIEVAL: tl.constexpr, TEACHER: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, PRESCALED: tl.constexpr, STAGE_ROWS: tl.constexpr,
                     NUM_DK: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's query operands of its D block d_acc and their row scales, (q_one, qm_one,
    q_up_one, qm_up_one) (_query_tiles; qm_one the teacher's if TEACHER, else q_one's): the
    converted rows if PRESCALED, else the features' rows, passed through ws_acc for "f16s"
    (STAGE_ROWS with GRAD and D in one block: _staged_rows)."""
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
    return q_one, qm_one, q_up_one, qm_up_one


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
    ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, ws_ticket_ptr, sim_ptr, kc_ptr, ks_ptr, qc_ptr, qs_ptr,
    # strides
    stride_fb, stride_fd, stride_qd, stride_qj, stride_idx, stride_idq,
    # shapes
    B, Q, D, NUM_SPLITS, KC_STRIDE, T0, T1, temp_value,
    # constexpr flags
    GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr, TEMP_FROM_PTR: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, PRESCALED: tl.constexpr, RESUME: tl.constexpr,
    TILE_SUMS: tl.constexpr, STAGE_ROWS: tl.constexpr, INTERLEAVE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KIND_AXIS: tl.constexpr, KT_LOAD: tl.constexpr,
    LOGITS_T: tl.constexpr, NUM_DK: tl.constexpr, GRID_KINDS: tl.constexpr, TEACHER: tl.constexpr,
    KEYS_AS_IS: tl.constexpr,
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
    ws_acc (_staged_rows). INTERLEAVE: split s takes the tiles s, s + S, s + 2 S, ... of the tile
    space instead of a contiguous range (ALBEF_FAST_INTERLEAVE=1, untimed: which reads the
    queues faster is benchmarks/queue_read_probe.py's question). KEYS_AS_IS ("f16s", not
    PRESCALED): the key tiles converted before their largest element is known (_key_operand);
    if one of this program's tiles falls outside _f16_as_is, it streams all of its tiles again
    without (_stream_keys). The same values either way (ALBEF_FAST_KEYS_AS_IS=1, untimed).
    Writes, with R = number of key sums kept (student if GRAD, teacher, hard) and S = NUM_SPLITS:
    ws_max, ws_z [2, 2, S, B] (student / teacher), ws_acc [2, R, S, B, D], ws_count [2, S, B],
    sim [2, B, B] (student logits against the in-batch keys; split 0, D block 0 only), and zeroes
    the merge's ticket ws_ticket (one fp32: kernels/itc_merge.py:_finish_last).
    """
    tl.static_assert(not PRESCALED or NUM_DK == 1, "prescaled key tiles need D in one block")
    tl.static_assert(not KEYS_AS_IS or (INPUT_PRECISION == "f16s" and not PRESCALED), "KEYS_AS_IS: f16s's own tiles")
    pid_mk, pid_s, pid_dd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tl.store(ws_ticket_ptr, 0.0, mask=(pid_mk == 0) & (pid_s == 0) & (pid_dd == 0))  # before the merge runs
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
    row_ids = rows  # unused without RETRIEVAL
    if RETRIEVAL:
        row_ids = tl.load(idx_ptr + rows * stride_idx, mask=rows < B, other=0)  # padded rows: never stored

    states = _initial_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, kind, direction, pid_s, rows, d_acc, B, D,
                             NUM_SPLITS, GRAD, HAS_TEACHER, RETRIEVAL, TEACHER, RESUME, BLOCK_M, BLOCK_D)
    queries = _program_queries(main_ptr, qm_ptr, qc_ptr, qs_ptr, ws_acc_ptr, stride_fb, stride_fd, direction, kind,
                               pid_s, pid_m, rows, d_acc, B, D, NUM_SPLITS, GRAD, HAS_TEACHER, RETRIEVAL, TEACHER,
                               DOT_DTYPE, INPUT_PRECISION, PRESCALED, STAGE_ROWS, NUM_DK, BLOCK_M)
    ptrs = main_ptr, qm_ptr, kb_ptr, queue_ptr, idx_ptr, idx_queue_ptr, sim_ptr, kc_ptr, ks_ptr
    strides = stride_fb, stride_fd, stride_qd, stride_qj, stride_idx, stride_idq
    shapes = B, Q, D, NUM_SPLITS, KC_STRIDE, T0, T1
    program = temp, scale, rows, row_ids, d_acc, cols, direction, pid_s, pid_d, is_student
    states = _stream_keys(states, queries, ptrs, strides, shapes, program, GRAD, RETRIEVAL, DOT_DTYPE, INPUT_PRECISION,
                          PRESCALED, TILE_SUMS, INTERLEAVE, BLOCK_M, BLOCK_N, BLOCK_D, KT_LOAD, LOGITS_T, NUM_DK,
                          GRID_KINDS, TEACHER, KEYS_AS_IS)
    if KEYS_AS_IS:
        if states[9]:  # a key tile outside _f16_as_is (features not normalized): all of them again, scaled
            states = _stream_keys(_fresh_states(BLOCK_M, BLOCK_D), queries, ptrs, strides, shapes, program, GRAD,
                                  RETRIEVAL, DOT_DTYPE, INPUT_PRECISION, PRESCALED, TILE_SUMS, INTERLEAVE, BLOCK_M,
                                  BLOCK_N, BLOCK_D, KT_LOAD, LOGITS_T, NUM_DK, GRID_KINDS, TEACHER, False)
    mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count, up_run, _ = states
    # scaled fp16 products: the key sums back from units of 2^14 / up_run
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        unit = up_run * (1.0 / 16384.0)
        acc_s, acc_m, acc_h = acc_s * unit, acc_m * unit, acc_h * unit
    _store_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count,
                  kind, direction, pid_s, pid_d, rows, d_acc, B, D, NUM_SPLITS, GRAD, HAS_TEACHER, RETRIEVAL, TEACHER)


@triton.jit
def _only_if(cond, mask):
    """mask where the program-wide condition cond holds, else nothing. Written as a select, not
    `mask & cond`: Triton's interpreter broadcasts a scalar comparison as an int32 block, which
    `&` keeps, and 3.9's loads and stores reject such a mask (tests/conftest.py does on any)."""
    return tl.where(cond, mask, False)


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
            count_offs = (direction * NUM_SPLITS + pid_s) * B + rows
            tl.store(ws_count_ptr + count_offs, count, mask=_only_if(is_student, row_ok))
        if TEACHER:
            tl.store(ws_max_ptr + stat + kind_off, mx_m, mask=row_ok)
            tl.store(ws_z_ptr + stat + kind_off, z_m, mask=row_ok)
    n_kinds = GRAD + HAS_TEACHER + RETRIEVAL  # kinds of key sums kept: [A_s (GRAD), A_m, H]
    acc_mask = row_ok[:, None] & (d_acc[None, :] < D)
    acc_offs = ((direction * n_kinds * NUM_SPLITS + pid_s) * B + rows[:, None]) * D + d_acc[None, :]
    kind_stride = NUM_SPLITS * B * D
    # main state: the student's key sum (slot 0) only if GRAD; the teacher's at slot GRAD
    tl.store(ws_acc_ptr + acc_offs + kind * GRAD * kind_stride, acc_s, mask=_only_if((kind == 1) | GRAD, acc_mask))
    if RETRIEVAL:
        tl.store(ws_acc_ptr + acc_offs + (GRAD + HAS_TEACHER) * kind_stride, acc_h, mask=_only_if(is_student, acc_mask))
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
    count_offs = (direction * NUM_SPLITS + pid_s) * B + rows
    count = tl.load(ws_count_ptr + count_offs, mask=_only_if(is_student & RETRIEVAL, row_ok), other=0.0)
    n_kinds = GRAD + HAS_TEACHER + RETRIEVAL
    acc_mask = row_ok[:, None] & (d_acc[None, :] < D)
    acc_offs = ((direction * n_kinds * NUM_SPLITS + pid_s) * B + rows[:, None]) * D + d_acc[None, :]
    kind_stride = NUM_SPLITS * B * D
    acc_s = tl.load(ws_acc_ptr + acc_offs + kind * GRAD * kind_stride, mask=_only_if((kind == 1) | GRAD, acc_mask),
                    other=0.0)
    acc_h = tl.load(ws_acc_ptr + acc_offs + (GRAD + HAS_TEACHER) * kind_stride,
                    mask=_only_if(is_student & RETRIEVAL, acc_mask), other=0.0)
    acc_m = tl.load(ws_acc_ptr + acc_offs + GRAD * kind_stride, mask=acc_mask & TEACHER, other=0.0)
    return mx_s, z_s, acc_s, mx_m, z_m, acc_m, acc_h, count
