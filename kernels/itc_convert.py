"""The conversion kernel of f16p / f16x3p (kernels/itc.py:_prescaled): key tiles and query rows
in the scaled fp16 form the split kernel's PRESCALED mode reads, computed once per call instead
of once per program and tile.
"""
import triton
import triton.language as tl

from .itc_operands import _direction_ptrs, _f16_key_scales, _f16_scales, _load_keys, _load_rows


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
    out_base (row stride KC_STRIDE; PAIRS: lo 2 D KC_STRIDE further): scaled by _f16_key_scales
    (PAIRS: _f16_scales) of its largest |element|, as _scaled_keys does in the loop; returns the
    scale's inverse (up)."""
    amax = tl.zeros([], tl.float32)
    for dk in range(NUM_DK):
        d_offs = dk * BLOCK_D + tl.arange(0, BLOCK_D)
        amax = tl.maximum(amax, tl.max(tl.abs(_load_keys(base, s_kd, s_kj, d_offs, j, D, n_keys).to(tl.float32))))
    if PAIRS:
        down, up = _f16_scales(amax)
    else:
        down, up = _f16_key_scales(amax)
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
