"""The merge and finish: the split kernel's per-split states (kernels/itc_split.py, its workspace
layout) combined in a fixed order into dq, the log-partition functions and the row partial dots
(merge), then the loss, dT and the ce / kl terms (finish), by the merge's last program or
(ALBEF_FAST_FINISH=kernel) a kernel of its own. No atomics on results: the same inputs give the
same bits.
"""
import triton
import triton.language as tl

from .itc_operands import _direction_ptrs, _load_rows, _rounded_like_operands, _temperature


@triton.jit
def _split_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr, stat_offs, acc_offs, ok, mask, ACC: tl.constexpr):
    """One kind's states of CHUNK splits: max and Z [CHUNK, BLOCK_M, 1] (-inf and 0 past the last
    split) and, if ACC, the key sums [CHUNK, BLOCK_M, BLOCK_D] (else zeros, unused)."""
    m_sp = tl.load(ws_max_ptr + stat_offs, mask=ok, other=float("-inf"))
    z_sp = tl.load(ws_z_ptr + stat_offs, mask=ok, other=0.0)
    if ACC:
        a = tl.load(ws_acc_ptr + acc_offs, mask=mask, other=0.0)
    else:
        a = tl.zeros(acc_offs.shape, tl.float32)
    return m_sp, z_sp, a


@triton.jit
def _merge_slots(mc, zc, gc, m_sp, z_sp, a, ACC: tl.constexpr):
    """CHUNK splits' states (_split_states) into CHUNK running ones, one per slot: slot c merges
    the splits c, c + CHUNK, c + 2 CHUNK, ... as the split kernel's online softmax merges key
    tiles (max, Z and (ACC) the key sums weighted by 2^(m - max), rescaled as the max grows).
    Elementwise: no reduction in the merge's loop (reducing over the splits each round took 26
    barriers and 224 shuffles a round at B = 64; now 8 barriers, the weights moved into the key
    sums' layout, and no shuffle: sm_90a PTX, Triton 3.6). A split with no keys (m = -inf)
    weighs 0; while every split of a slot had none, the slot stays empty."""
    new_mc = tl.maximum(mc, m_sp)
    base = tl.where(new_mc == float("-inf"), 0.0, new_mc)  # no -inf - -inf
    r_old = tl.exp2(mc - base)
    r_new = tl.exp2(m_sp - base)
    zc = zc * r_old + z_sp * r_new
    if ACC:
        gc = gc * r_old + a * r_new
    return new_mc, zc, gc


@triton.jit
def _combine_slots(mc, zc, gc, ACC: tl.constexpr):
    """The slots' states (_merge_slots) in one, in slot order: (max [BLOCK_M], Z [BLOCK_M], key
    sums [BLOCK_M, BLOCK_D] (ACC; else zeros))."""
    mx = tl.max(mc, 0)  # [BLOCK_M, 1]
    base = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(mc - base[None, :, :])
    z = tl.sum(zc * w, 0)
    if ACC:
        g = tl.sum(gc * w, 0)
    else:
        g = tl.zeros((gc.shape[1], gc.shape[2]), tl.float32)
    return tl.reshape(mx, (mx.shape[0],)), tl.reshape(z, (z.shape[0],)), g


@triton.jit
def _merged_splits(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, direction, rows, d_offs, row_ok, B, D, NUM_SPLITS,
                   GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, MERGE_STAGES: tl.constexpr):
    """Every split's states of one (row block, D block, direction), in one pass over the splits:
    CHUNK slots merged elementwise (_merge_slots), combined after the loop (_combine_slots).
    Returns (max, Z [BLOCK_M], key sum [BLOCK_M, BLOCK_D]) of the student (the sum if GRAD, else
    zeros) and of the teacher (HAS_TEACHER), and the hard targets' count [BLOCK_M] and key sum
    (RETRIEVAL); a state not kept is returned as the student's, unused."""
    stat = direction * 2 * NUM_SPLITS * B  # ws_max, ws_z [2, 2, S, B]: student, then teacher
    acc0 = direction * (GRAD + HAS_TEACHER + RETRIEVAL) * NUM_SPLITS * B  # ws_acc [2, n_sums, S, B, D]
    mc_s = tl.full([CHUNK, BLOCK_M, 1], float("-inf"), tl.float32)
    zc_s = tl.zeros([CHUNK, BLOCK_M, 1], tl.float32)
    gc = tl.zeros([CHUNK, BLOCK_M, BLOCK_D], tl.float32)
    mc_m, zc_m, pc, hc, cc = mc_s, zc_s, gc, gc, zc_s
    for s0 in tl.range(0, NUM_SPLITS, CHUNK, num_stages=MERGE_STAGES):
        sp = s0 + tl.arange(0, CHUNK)
        sr = (sp[:, None] * B + rows[None, :])[:, :, None]  # (split, row, 1) of a [S, B] array
        ok = ((sp[:, None] < NUM_SPLITS) & row_ok[None, :])[:, :, None]
        acc_offs = sr * D + d_offs[None, None, :]
        acc_mask = ok & (d_offs[None, None, :] < D)
        # every load of the round before the arithmetic
        m_sp, z_sp, a_s = _split_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr + acc0 * D, stat + sr, acc_offs, ok,
                                        acc_mask, GRAD)
        if HAS_TEACHER:
            m_sp_m, z_sp_m, a_m = _split_states(ws_max_ptr, ws_z_ptr, ws_acc_ptr + (acc0 + GRAD * NUM_SPLITS * B) * D,
                                                stat + NUM_SPLITS * B + sr, acc_offs, ok, acc_mask, True)
        if RETRIEVAL:  # plain sums: hard-target key sums and their counts
            c_sp = tl.load(ws_count_ptr + direction * NUM_SPLITS * B + sr, mask=ok, other=0.0)
            h_ptr = ws_acc_ptr + (acc0 + (GRAD + HAS_TEACHER) * NUM_SPLITS * B) * D
            a_h = tl.load(h_ptr + acc_offs, mask=acc_mask, other=0.0)
        mc_s, zc_s, gc = _merge_slots(mc_s, zc_s, gc, m_sp, z_sp, a_s, GRAD)
        if HAS_TEACHER:
            mc_m, zc_m, pc = _merge_slots(mc_m, zc_m, pc, m_sp_m, z_sp_m, a_m, True)
        if RETRIEVAL:
            cc += c_sp
            hc += a_h
    mx_s, z_s, g = _combine_slots(mc_s, zc_s, gc, GRAD)
    mx_m, z_m, pm, count, h = mx_s, z_s, g, z_s, g
    if HAS_TEACHER:
        mx_m, z_m, pm = _combine_slots(mc_m, zc_m, pc, True)
    if RETRIEVAL:
        count = tl.reshape(tl.sum(cc, 0), (BLOCK_M,))
        h = tl.sum(hc, 0)
    return mx_s, z_s, g, mx_m, z_m, pm, count, h


@triton.jit
def _finite_rows(mx, z, acc, row_ok):
    """A merged state (max, Z, key sum) with finite values on the rows past B (max 0, Z 1), and
    its key sum over Z."""
    mx = tl.where(row_ok, mx, 0.0)
    z = tl.where(row_ok, z, 1.0)
    return mx, z, acc / z[:, None]


@triton.jit
def _itc_merge_fwd_kernel(
    # pointers
    img_ptr, txt_ptr, img_m_ptr, txt_m_ptr, temp_ptr, ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr,
    dq_img_ptr, dq_txt_ptr, part_ptr, lse_ptr, ticket_ptr, loss_ptr, losses_ptr, grad_temp_ptr,
    grad_temp_dirs_ptr, terms_ptr,
    # strides
    stride_fb, stride_fd,
    # shapes and scalars
    B, D, NUM_SPLITS, temp_value, alpha,
    # constexpr flags
    GRAD: tl.constexpr, HAS_TEACHER: tl.constexpr, RETRIEVAL: tl.constexpr, TEMP_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, FINISH: tl.constexpr,
    BLOCK_B: tl.constexpr, DBLOCKS: tl.constexpr, MERGE_STAGES: tl.constexpr, ROUND: tl.constexpr,
):
    """Combine the splits of one (row block, D block, direction): CHUNK splits loaded at a time,
    split s merged into slot s mod CHUNK (_merge_slots), the slots then merged in order
    (_combine_slots): a fixed order, the same bits every run.

    Writes dq [B, D] (feature dtype, d loss / d q of the mean loss: 1 / (2 B)) for its D block, the
    partial row dots part [2, D blocks, 4, B] = (u . H / n, u . P_m, u_m . P_m, u . G) over its
    D block (P_m = A_m / Z_m), and from D block 0 the log-partition functions lse [2, 2, B].
    MERGE_STAGES > 1: the rounds' loads pipelined that many stages (cp.async into shared memory).
    FINISH: the last program to get there also writes the scalars (_finish_last; ticket: one
    fp32 zeroed by the split kernel), else _itc_finish_fwd_kernel does, and the scalars' pointers
    and ticket_ptr are unused. ROUND: the products' rounding of fp32 features (_rounded_like_operands),
    applied to the query rows and the in-batch target keys of the row dots and dq.
    """
    pid_m, pid_d, direction = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_ptr, qm_ptr, kb_ptr = _direction_ptrs(direction, img_ptr, txt_ptr, img_m_ptr, txt_m_ptr)
    dq_ptr = tl.where(direction == 0, dq_img_ptr, dq_txt_ptr)
    temp = _temperature(temp_ptr, temp_value, TEMP_FROM_PTR)
    inv_t = 1.0 / temp
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    mask = row_ok[:, None] & (d_offs[None, :] < D)
    mx_s, z_s, g, mx_m, z_m, pm, count, h = _merged_splits(ws_max_ptr, ws_z_ptr, ws_acc_ptr, ws_count_ptr, direction,
                                                           rows, d_offs, row_ok, B, D, NUM_SPLITS, GRAD, HAS_TEACHER,
                                                           RETRIEVAL, BLOCK_M, BLOCK_D, CHUNK, MERGE_STAGES)
    mx_s, z_s, g = _finite_rows(mx_s, z_s, g, row_ok)
    if HAS_TEACHER:
        mx_m, z_m, pm = _finite_rows(mx_m, z_m, pm, row_ok)
    else:
        mx_m, z_m = mx_s, z_s
    q = _load_rows(q_ptr, stride_fb, stride_fd, rows, d_offs, B, D).to(tl.float32)
    u = _rounded_like_operands(q, ROUND) * inv_t
    if RETRIEVAL:
        h = h / tl.where(row_ok, count, 1.0)[:, None]
    else:
        h = _load_rows(kb_ptr, stride_fb, stride_fd, rows, d_offs, B, D).to(tl.float32)
        h = _rounded_like_operands(h, ROUND)
    g -= (1.0 - alpha) * h
    part = part_ptr + ((direction * tl.num_programs(1) + pid_d) * 4) * B + rows
    tl.store(part, tl.sum(u * h, 1), mask=row_ok)
    if HAS_TEACHER:
        g -= alpha * pm
        q_m = _load_rows(qm_ptr, stride_fb, stride_fd, rows, d_offs, B, D).to(tl.float32)
        u_m = _rounded_like_operands(q_m, ROUND) * inv_t
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
    if FINISH:
        _finish_last(part_ptr, lse_ptr, ticket_ptr, loss_ptr, losses_ptr, grad_temp_ptr, grad_temp_dirs_ptr,
                     terms_ptr, temp, B, alpha, HAS_TEACHER, BLOCK_B, DBLOCKS)


@triton.jit
def _finish_last(part_ptr, lse_ptr, ticket_ptr, loss_ptr, losses_ptr, grad_temp_ptr, grad_temp_dirs_ptr, terms_ptr,
                 temp, B, alpha, HAS_TEACHER: tl.constexpr, BLOCK_B: tl.constexpr, DBLOCKS: tl.constexpr):
    """The scalars (_finish_scalars) from the merge's last program, which takes the last ticket:
    one launch fewer a step than a finish kernel, and its launch gap. The merge's other
    programs' part and lse stores are visible to it as after a grid sync (cooperative groups'
    pattern): every thread's stores, a barrier, then one thread's acq_rel atomic at GPU scope;
    the last program's loads come after its own atomic (and Triton's barrier that hands the
    ticket to every thread) and skip L1 (.cg). Which program is last varies; what it computes,
    and in what order, does not."""
    tl.debug_barrier()
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    # an fp32 count (the workspace is fp32): exact to 2^24 programs; B = 65536 at D = 1024 makes 2^17
    ticket = tl.atomic_add(ticket_ptr, 1.0, sem="acq_rel", scope="gpu")
    if ticket == programs - 1:
        _finish_scalars(part_ptr, lse_ptr, loss_ptr, losses_ptr, grad_temp_ptr, grad_temp_dirs_ptr, terms_ptr, temp,
                        B, tl.num_programs(1), alpha, HAS_TEACHER, BLOCK_B, DBLOCKS)


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
        h_s = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        u_g = tl.load(part_ptr + offs + 3 * B, mask=mask, other=0.0, cache_modifier=".cg")
        lse_s = tl.load(lse_ptr + direction * 2 * B + rows, mask=ok, other=0.0, cache_modifier=".cg")
        if HAS_TEACHER:
            c_m = tl.load(part_ptr + offs + B, mask=mask, other=0.0, cache_modifier=".cg")
            d_m = tl.load(part_ptr + offs + 2 * B, mask=mask, other=0.0, cache_modifier=".cg")
            lse_m = tl.load(lse_ptr + (direction * 2 + 1) * B + rows, mask=ok, other=0.0, cache_modifier=".cg")
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
def _finish_scalars(part_ptr, lse_ptr, loss_ptr, losses_ptr, grad_temp_ptr, grad_temp_dirs_ptr, terms_ptr, temp, B,
                    NUM_DBLOCKS, alpha, HAS_TEACHER: tl.constexpr, BLOCK_B: tl.constexpr, DBLOCKS: tl.constexpr):
    """The scalars of both directions: loss (their mean), losses [2], grad_temp = d loss / d T,
    grad_temp_dirs [2] = d loss_dir / d T, terms [4] = (ce, ce, kl, kl). DBLOCKS: NUM_DBLOCKS
    (the merge's D blocks) rounded up to a power of two."""
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
def _itc_finish_fwd_kernel(
    # pointers
    part_ptr, lse_ptr, temp_ptr, loss_ptr, losses_ptr, grad_temp_ptr, grad_temp_dirs_ptr, terms_ptr,
    # shapes and scalars
    B, NUM_DBLOCKS, temp_value, alpha,
    # constexpr flags
    HAS_TEACHER: tl.constexpr, TEMP_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr, DBLOCKS: tl.constexpr,
):
    """The scalars (_finish_scalars) in a launch of their own, grid (1,), after a merge without
    FINISH (ALBEF_FAST_FINISH=kernel: what the merge's last program does, kept to check it bit
    for bit and to time it against)."""
    temp = _temperature(temp_ptr, temp_value, TEMP_FROM_PTR)
    _finish_scalars(part_ptr, lse_ptr, loss_ptr, losses_ptr, grad_temp_ptr, grad_temp_dirs_ptr, terms_ptr, temp, B,
                    NUM_DBLOCKS, alpha, HAS_TEACHER, BLOCK_B, DBLOCKS)
