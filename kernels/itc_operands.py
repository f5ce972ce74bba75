"""Device helpers the ITC kernels share: tile loads, a direction's pointers, the temperature, and
the product operands of each precision mode with their products (SPEC section 3).

Modes (INPUT_PRECISION; DOT_DTYPE the operands' dtype; kernels/itc.py:_dot_flags picks them):
"ieee" for bf16 / fp16 features as they are (fp32 tiles under the interpreter); for fp32 features
"ieee" with bf16 operands ("medium"; under the interpreter "bf16", bf16 values in fp32 tiles),
"f16s", fp16 operands scaled by powers of two (TF32's 11 significant bits: _f16_scales), "f16x3",
(hi, lo) fp16 pairs of scaled operands (22 bits, three products: _f16x3_dot), "tf32rn", TF32
operands rounded to nearest (_round_tf32), or one of Triton's input precisions.
"""
import triton
import triton.language as tl

# Triton 3.9 reduces a thread's elements as a tree and deprecates reshape's can_reorder (gone in
# 3.10); before 3.9 a full reduction is one chain unless the tile is reshaped with it (_tile_amax)
_TREE_REDUCTIONS = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9))


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
def _tile_amax(x):
    """max |element| of a tile, in short dependency chains. Before 3.9 Triton reduces a thread's
    elements in one chain of dependent FMNMX (68 deep at 32 keys x 256 on 4 warps, sm_90a AOT),
    four chains after the reorderable reshape (22 deep, the same registers); 3.9 makes a tree of
    the plain reduction (11 deep, the same code as the reshape there). Any order gives the same max."""
    if _TREE_REDUCTIONS:
        amax = tl.max(tl.abs(x))
    else:
        amax = tl.max(tl.max(tl.max(tl.reshape(tl.abs(x), (2, 2, x.numel // 4), can_reorder=True), 0), 0))
    return amax


@triton.jit
def _f16_as_is(amax):
    """Whether a key tile with this largest |element| enters "f16s" unscaled (up = 1): amax in
    [2^-4, 2^15). fp16 then keeps 11 significant bits (as TF32) for every element above 2^-14,
    i.e. 2^-10 of the largest, and rounds the smaller ones by at most 2^-25 <= 2^-21 amax,
    against TF32's 2^-12 amax on the largest; and nothing overflows (fp16 to 65504). Normalized
    features (ALBEF's, |x| <= 1, largest of a tile ~0.1-0.3 for D <= 1024) always do."""
    return (amax >= 0.0625) & (amax < 32768.0)


@triton.jit
def _f16_key_scales(amax):
    """(down, up) of an "f16s" key tile: 1 where _f16_as_is, else _f16_scales."""
    down, up = _f16_scales(amax)
    as_is = _f16_as_is(amax)
    return tl.where(as_is, 1.0, down), tl.where(as_is, 1.0, up)


@triton.jit
def _scaled_keys(x, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(operand, up) of a key tile: in the scaled fp16 modes the whole tile scaled by one power of
    two (the key sums accumulate tiles of different scales: _online_softmax's ratio; "f16s":
    _f16_key_scales, "f16x3": _f16_scales, as its lo halves need); else (_operand(x), 1)."""
    if (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "f16x3"):
        if INPUT_PRECISION == "f16s":
            down, up = _f16_key_scales(_tile_amax(x))
        else:
            down, up = _f16_scales(_tile_amax(x))
        out = _operand(x * down, DOT_DTYPE, INPUT_PRECISION)
    else:
        out, up = _operand(x, DOT_DTYPE, INPUT_PRECISION), 1.0
    return out, up


@triton.jit
def _key_operand(base, stride_d, stride_j, d_offs, j_offs, D, N, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, KEYS_AS_IS: tl.constexpr):
    """(operand, up, outside) of the key tile _load_keys reads, as _scaled_keys makes it.
    KEYS_AS_IS ("f16s"): the tile converted as it is (up = 1), right where _f16_as_is holds for
    it, and outside = whether it does not (else False). The conversion then does not wait for the
    max's reduction across warps, nor the fp32 tile in registers for it (64 a thread at 32 keys
    x 256 on 4 warps). sm_90a AOT, B = 64's 4-warp config: the queue loop 758 -> 647 instructions
    a tile, 5 -> 3 barriers. With LOGITS_T Triton loads the fp32 tile a second time in the
    transposed layout instead (more spills, not less): for the other configs."""
    x = _load_keys(base, stride_d, stride_j, d_offs, j_offs, D, N)
    if KEYS_AS_IS:
        out, up = _operand(x, DOT_DTYPE, INPUT_PRECISION), tl.full([], 1.0, tl.float32)
        # a plain max, not _tile_amax's chains: off the critical path here, and fewer registers
        outside = not _f16_as_is(tl.max(tl.abs(x)))
    else:
        out, up = _scaled_keys(x, DOT_DTYPE, INPUT_PRECISION)
        outside = False
    return out, up, outside


@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest TF32 value (ties away from zero), kept in fp32. The tensor cores read
    only the top 19 bits of an fp32 operand, i.e. truncate: a bias of half an ulp (2^-12) on every
    operand, which summed over 65536 keys put the loss 25x and dT 50x further from fp64 than
    cuBLAS TF32 (measured, H200). Rounding first makes the error zero-mean."""
    bits = x.to(tl.uint32, bitcast=True)
    return (((bits + 0x1000) >> 13) << 13).to(tl.float32, bitcast=True)


@triton.jit
def _round_nearest_even(x, DROP: tl.constexpr):
    """fp32 x to the nearest value whose DROP low mantissa bits are zero (ties to even), kept in
    fp32: 13 leaves 11 significant bits (fp16's, TF32's), 16 leaves bf16's 8. What the GPU's
    conversions do in their normal range; the interpreter's bf16 cast truncates instead."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)  # (a bf16 queue's tile, in "bf16" mode)
    half = (1 << (DROP - 1)) - 1
    keep = (0xFFFFFFFF >> DROP) << DROP
    return ((bits + (half + ((bits >> DROP) & 1))) & keep).to(tl.float32, bitcast=True)


@triton.jit
def _rounded_like_operands(x, ROUND: tl.constexpr):
    """fp32 x rounded as the products round fp32 features (kernels/itc.py:_merge_rounding): "f16"
    to 11 significant bits (what "f16s" does: fp16 conversion of values scaled by powers of two,
    in fp16's normal range), "bf16" to bf16, "tf32rn" as _round_tf32; "none": x. The merge's row
    dots (u . h, ...) then see the logits' operands, so that the loss's target terms cancel
    against the rounded logits as they do in eager's log_softmax."""
    if ROUND == "f16":
        out = _round_nearest_even(x, 13)
    elif ROUND == "bf16":
        out = _round_nearest_even(x, 16)
    elif ROUND == "tf32rn":
        out = _round_tf32(x)
    else:
        out = x
    return out


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
    elif INPUT_PRECISION == "bf16":  # bf16 values in fp32 tiles ("medium" under the interpreter),
        out = _round_nearest_even(x, 16)  # rounded as the GPU's cast does (the interpreter's truncates)
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
        elif (INPUT_PRECISION == "f16s") | (INPUT_PRECISION == "bf16"):  # half values in fp32 tiles
            out = tl.dot(a, b, input_precision="ieee")  # (interpreter): exact products
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
