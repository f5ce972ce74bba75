"""The Triton backend against ALBEF's reference (fp64) with flash-attention's tolerance rule.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest) at small
odd shapes; the CUDA tests at ALBEF's shapes run only where a GPU is present.
"""
import contextlib
import math

import pytest
import torch

import albef_fast
from albef_fast import reference
from tests.helpers import make_inputs, max_err

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from albef_fast.kernels import itc, itc_operands  # noqa: E402
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _args(x):
    return (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue)


def _run(fn, x, temp, alpha, grad_out):
    """Loss and grads (image, text, temp) of fn(a, b, *rest, temp, alpha, idx, idx_queue)."""
    a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    t = torch.tensor(temp, device=a.device, requires_grad=True)
    loss = fn(a, b, *_args(x)[2:], t, alpha, x.idx, x.idx_queue)
    grads = torch.autograd.grad(loss * grad_out, (a, b, t))
    return loss.detach(), grads


def _run_at(precision, *args):
    """_run(*args) with torch's float32 matmul precision set to precision (None: as it is)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision or before)
    try:
        return _run(*args)
    finally:
        torch.set_float32_matmul_precision(before)


def _triton(a, b, am, bm, iq, tq, t, alpha, idx, idq, **kw):
    return albef_fast.itc_loss(a, b, am, bm, iq, tq, t, alpha, idx=idx, idx_queue=idq, backend="triton", **kw)


def _eager(dtype=None):
    def fn(a, b, am, bm, iq, tq, t, alpha, idx, idq):
        cast = (lambda v: v.to(dtype)) if dtype else (lambda v: v)  # noqa: E731
        return reference.itc_loss(cast(a), cast(b), cast(am), cast(bm), cast(iq), cast(tq), cast(t), alpha, idx, idq)
    return fn


def _check_rule(x, alpha, temp=0.07, grad_out=1.3, atol=1e-5, relative=False, **kw):
    """err(triton) <= 2 * err(eager, same dtype) + atol for the loss and every gradient, vs fp64;
    on a GPU eager runs at the float32 matmul precision asked of Triton ("high": cuBLAS TF32).
    The gradients' atol is per unit of their largest element; the loss's too if relative (a loss
    of ~1000, at T = 0.001, has an fp32 ulp of 6e-5). Where eager's own value is not finite (fp16
    at T = 0.001 overflows), atol alone bounds the error."""
    loss, grads = _run(lambda *a: _triton(*a, **kw), x, temp, alpha, grad_out)
    loss_e, grads_e = _run_at(kw.get("precision") if x.image_feat.is_cuda else None, _eager(), x, temp, alpha,
                              grad_out)
    loss_64, grads_64 = _run(_eager(torch.float64), x, temp, alpha, grad_out)

    def bound(got_e, want, scale):
        err_e = max_err(got_e, want)
        return (2 * err_e if math.isfinite(err_e) else 0.0) + atol * scale

    assert max_err(loss, loss_64) <= bound(loss_e, loss_64, max(1.0, abs(loss_64.item())) if relative else 1.0)
    for g, g_e, g_64 in zip(grads, grads_e, grads_64):
        assert g.dtype == g_e.dtype
        assert max_err(g, g_64) <= bound(g_e, g_64, max(1.0, g_64.abs().max().item()))


@pytest.mark.parametrize("b,q,d", [(5, 37, 24), (8, 3, 16), (17, 40, 33)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("retrieval", [False, True])
def test_matches_reference_fp32(b, q, d, alpha, retrieval):
    _check_rule(make_inputs(b, q, d, torch.float32, DEVICE, retrieval=retrieval), alpha, precision="highest")


@pytest.mark.parametrize("block_d", [16, 32])  # D = 24 in two blocks (logits recomputed), or one
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_kind_axis_matches_fused(monkeypatch, block_d, alpha, retrieval, grad):
    """KIND_AXIS=1 keeps the student and teacher states in separate programs: the same bits as
    both in one program, for a D split in blocks and for all of D in one."""
    x = make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=retrieval)
    kw = dict(idx=x.idx, idx_queue=x.idx_queue, return_details=True, backend="triton", precision="highest")
    runs = []
    monkeypatch.setenv("ALBEF_FAST_SPLITS", "3")  # the same splits for both (the default depends on the tiles)
    for kind_axis in (0, 1):
        monkeypatch.setenv("ALBEF_FAST_CONFIG", f"16,16,{block_d},{kind_axis},{kind_axis},1")
        a = x.image_feat.clone().requires_grad_(grad)
        out = albef_fast.itc_loss(a, *_args(x)[1:], 0.07, alpha, **kw)
        runs.append((out, torch.autograd.grad(out.loss, a)[0] if grad else None))
    (fused, ga), (split, gb) = runs
    for name, got, expected in zip(fused._fields, split, fused):
        assert torch.equal(got, expected), name
    if grad:
        assert torch.equal(ga, gb)
    _check_rule(x, alpha, precision="highest")  # and KIND_AXIS against the fp64 reference


@pytest.mark.parametrize("block_d", [16, 32])
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_transposed_logits_match(monkeypatch, block_d, precision):
    """LOGITS_T (9th config field) computes the logits as (k^T q^T)^T: the same values, summed in
    another order, so equal to rounding; and within the rule against fp64."""
    x = make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=True)
    kw = dict(idx=x.idx, idx_queue=x.idx_queue, return_details=True, backend="triton", precision=precision)
    monkeypatch.setenv("ALBEF_FAST_SPLITS", "3")
    runs = []
    for logits_t in (0, 1):
        monkeypatch.setenv("ALBEF_FAST_CONFIG", f"16,16,{block_d},1,1,1,2,0,{logits_t}")
        a = x.image_feat.clone().requires_grad_(True)
        out = albef_fast.itc_loss(a, *_args(x)[1:], 0.07, 0.4, **kw)
        runs.append((out, torch.autograd.grad(out.loss, a)[0]))
    (plain, g_plain), (transposed, g_transposed) = runs
    for name, got, expected in zip(plain._fields, transposed, plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(g_transposed, g_plain, rtol=1e-5, atol=1e-7)
    if precision == "highest" or CUDA:  # on the CPU eager "high" is fp32: the TF32 path fails the rule there
        _check_rule(x, 0.4, precision=precision)


def _rescaled(x, feature_scale: float):
    """x with the features times feature_scale and the queues divided by it (queue logits as before)."""
    for name in ("image_feat", "text_feat", "image_feat_m", "text_feat_m"):
        setattr(x, name, getattr(x, name) * feature_scale)
    for name in ("image_queue", "text_queue"):
        setattr(x, name, getattr(x, name) / feature_scale)
    return x


@pytest.mark.parametrize("config", ["16,16,16,0,0,1", "16,16,32,1,1,1", "16,16,32,0,0,1,2,0,1"])
@pytest.mark.parametrize("feature_scale", [1.0, 2.0**-30])
def test_f16_products_give_the_tf32_rounded_values(monkeypatch, config, feature_scale):
    """ALBEF_FAST_TF32=f16s: fp32 operands scaled by powers of two (per query row, per key tile)
    into fp16 keep TF32's 11 significant bits, so they give the TF32-rounded path's values but for
    rounding ties and elements 2^-28 below their tile's largest; also for features x 2^-30 and
    queues x 2^30, which fp16 itself cannot hold (the scales' bookkeeping in the key sums). For
    D blocks (16 of 24) and all of D in one, KIND_AXIS and KT_LOAD, transposed logits, retrieval.
    On a GPU the tensor cores add each mode's products into their accumulators truncating, in
    their own order (H100: grads 1.1e-5 of the largest apart at 2^-30): there, f16s within twice
    tf32rn's error against fp64."""
    x = _rescaled(make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=True), feature_scale)
    env = dict(ALBEF_FAST_SPLITS="3", ALBEF_FAST_CONFIG=config)
    tf32 = _outputs(monkeypatch, x, 0.4, "high", dict(env, ALBEF_FAST_TF32="tf32rn"))
    f16 = _outputs(monkeypatch, x, 0.4, "high", dict(env, ALBEF_FAST_TF32="f16s"))
    assert torch.isfinite(f16[-1]).all() and f16[-1].abs().max() > 0
    if CUDA:
        exact = _outputs(monkeypatch, x, 0.4, "high", {}, True, "torch", torch.float64)
        _same_bits_or_rule(f16, tf32, exact, same_bits=False)
    else:
        for got, expected in zip(f16, tf32):
            assert max_err(got, expected) <= 2e-6 * expected.abs().max().item()


def _outputs(monkeypatch, x, alpha, precision, env, grad=True, backend="triton", dtype=torch.float32):
    """Every output of itc_loss(return_details=True), then d (1.3 loss) / d image_feat if grad,
    with the settings in env (name -> value; "" for unset)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [t.to(dtype) for t in _args(x)]
    a = args[0].clone().requires_grad_(grad)
    out = albef_fast.itc_loss(a, *args[1:], 0.07, alpha, idx=x.idx, idx_queue=x.idx_queue, return_details=True,
                              backend=backend, precision=precision)
    return list(out) + ([torch.autograd.grad(out.loss * 1.3, a)[0]] if grad else [])


def _same_bits_or_rule(got, expected, exact, same_bits: bool) -> None:
    """Each of got equal to expected's, or within twice expected's error against exact (fp64)."""
    for g, e, r in zip(got, expected, exact):
        if same_bits:
            assert torch.equal(g, e)
        else:
            assert max_err(g, r) <= 2 * max_err(e, r) + 1e-6 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("config", ["16,16,32,1,1,1", "16,16,32,0,0,1,2,0,1", "16,32,32,1,0,1"])
@pytest.mark.parametrize("alpha,retrieval,grad", [(0.4, True, True), (0.0, False, True), (0.4, False, False)])
@pytest.mark.parametrize("feature_scale", [1.0, 2.0**-30])
def test_converted_key_tiles_give_the_same_bits(monkeypatch, config, alpha, retrieval, grad, feature_scale):
    """ALBEF_FAST_TF32=f16p: the key tiles converted once per call (_itc_keys_fwd_kernel) are the
    tiles the f16s loop makes itself (the same scale of the same elements), so every output is
    bit for bit f16s's: in-batch tiles padded (B = 7), a partial last queue tile, KT_LOAD, the
    transposed logits, 32-key tiles; also at 2^-30 / 2^30 magnitudes. D = 24 in one block."""
    x = _rescaled(make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=retrieval), feature_scale)
    env = {"ALBEF_FAST_SPLITS": "3", "ALBEF_FAST_CONFIG": config}
    f16s = _outputs(monkeypatch, x, alpha, "high", dict(env, ALBEF_FAST_TF32="f16s"), grad)
    f16p = _outputs(monkeypatch, x, alpha, "high", dict(env, ALBEF_FAST_TF32="f16p"), grad)
    _same_bits_or_rule(f16p, f16s, f16s, same_bits=True)


@pytest.mark.parametrize("splits,chunk_tiles", [(1, 1), (1, 2), (1, 5), (3, 1), (3, 2)])
@pytest.mark.parametrize("alpha,retrieval,grad", [(0.4, True, True), (0.0, False, True), (0.4, False, False)])
def test_converted_chunks_resume_the_states(monkeypatch, splits, chunk_tiles, alpha, retrieval, grad):
    """f16p converts the keys a chunk of tiles at a time; the split over each chunk resumes the
    states the previous one stored. With one split the tiles meet the states in f16s's order:
    the same bits. With three the tiles fall into other splits, whose running maxima differ, so
    the 11-bit weights round differently: within twice f16s's error against fp64. Chunks of 1
    tile leave splits with no tiles (states passed on); the in-batch keys' tile and the queue's
    share chunks (B = 7, 16-key tiles)."""
    x = make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=retrieval)
    env = {"ALBEF_FAST_SPLITS": str(splits), "ALBEF_FAST_CONFIG": "16,16,32,1,0,1"}
    f16s = _outputs(monkeypatch, x, alpha, "high", dict(env, ALBEF_FAST_TF32="f16s"), grad)
    f16p = _outputs(monkeypatch, x, alpha, "high",
                    dict(env, ALBEF_FAST_TF32="f16p", ALBEF_FAST_CHUNK_TILES=str(chunk_tiles)), grad)
    exact = _outputs(monkeypatch, x, alpha, "high", {}, grad, "torch", torch.float64) if splits > 1 else f16s
    _same_bits_or_rule(f16p, f16s, exact, same_bits=splits == 1)


@pytest.mark.parametrize("splits,chunk_tiles", [(1, 0), (1, 2), (3, 2)])
@pytest.mark.parametrize("config", ["16,16,32,1,0,1", "16,16,32,0,1,1,2,0,1"])
@pytest.mark.parametrize("alpha,retrieval", [(0.4, True), (0.0, False)])
def test_converted_pairs_give_f16x3s_values(monkeypatch, splits, chunk_tiles, config, alpha, retrieval):
    """ALBEF_FAST_FP32_DOT=f16x3p: f16x3's (hi, lo) pairs converted first, in chunks (0: the
    default, one chunk here). With one split: f16x3's bits; with three, other splits' running
    maxima: within twice f16x3's error against fp64 (which passes the fp32 rule). KT_LOAD and
    the transposed logits (the second config), both kinds in one program."""
    x = make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=retrieval)
    env = {"ALBEF_FAST_SPLITS": str(splits), "ALBEF_FAST_CONFIG": config}
    f16x3 = _outputs(monkeypatch, x, alpha, "highest", dict(env, ALBEF_FAST_FP32_DOT="f16x3"))
    pairs = _outputs(monkeypatch, x, alpha, "highest",
                     dict(env, ALBEF_FAST_FP32_DOT="f16x3p", ALBEF_FAST_CHUNK_TILES=str(chunk_tiles or "")))
    exact = _outputs(monkeypatch, x, alpha, "highest", {}, True, "torch", torch.float64) if splits > 1 else f16x3
    _same_bits_or_rule(pairs, f16x3, exact, same_bits=splits == 1)


@pytest.mark.parametrize("b,budget_mib,chunks", [(64, 32, 6), (512, 64, 3)])
def test_converted_chunks_fit_the_memory_budget(monkeypatch, b, budget_mib, chunks):
    """At ALBEF's shapes (Q = 65536, D = 256, the f16p config) the converted tiles of a chunk fit
    SPEC's extra-memory budget with what f16s's call takes on an H200 (16.9 MiB at B = 64, 27.3
    at B = 512, run 6): the plan only, nothing launched."""
    monkeypatch.setenv("ALBEF_FAST_TF32", "f16p")
    monkeypatch.setenv("ALBEF_FAST_CONFIG", "128,32,256,1,0,8,4")
    key = (b, 65536, 256, torch.float32, torch.float32, (256, 1), (65536, 1), torch.device("cpu"), True, True,
           "high", torch.float32, None, itc._settings())
    plan = itc._Plan(key)
    halves, singles = plan.converted_sizes
    converted_mib = (2 * sum(halves) + 4 * sum(singles)) / 2**20
    assert len(plan.splits) == chunks and all(convert is not None for convert, _ in plan.splits)
    assert converted_mib + {64: 16.9, 512: 27.3}[b] <= budget_mib, converted_mib


def test_f16p_is_the_high_path_from_b512(monkeypatch):
    """"high" with fp32 features converts the operands first (f16p) from B = 512 on (faster
    there on the H100), unless ALBEF_FAST_TF32 names a mode; f16x3p only when asked for."""
    monkeypatch.delenv("ALBEF_FAST_TF32", raising=False)
    monkeypatch.delenv("ALBEF_FAST_FP32_DOT", raising=False)
    assert itc._prescaled(torch.float32, "high", 511) is None
    assert itc._prescaled(torch.float32, "high", 512) == "f16p"
    assert itc._prescaled(torch.bfloat16, "high", 512) is None
    assert itc._prescaled(torch.float32, "highest", 512) is None
    monkeypatch.setenv("ALBEF_FAST_TF32", "f16s")
    assert itc._prescaled(torch.float32, "high", 512) is None
    monkeypatch.setenv("ALBEF_FAST_TF32", "f16p")
    assert itc._prescaled(torch.float32, "high", 8) == "f16p"
    monkeypatch.setenv("ALBEF_FAST_FP32_DOT", "f16x3p")
    assert itc._prescaled(torch.float32, "highest", 8) == "f16x3p"


def test_converted_key_tiles_are_used(monkeypatch):
    """f16p launches the conversion kernel (3 launches a call, one chunk at this size) where D
    fits one block, and falls back to f16s's loop (2) where it does not."""
    from albef_fast.kernels import itc as kernels_itc

    launches = []
    monkeypatch.setattr(kernels_itc._LAUNCH["keys"], "prepare",
                        lambda *a, _prepare=kernels_itc._LAUNCH["keys"].prepare: launches.append(1) or _prepare(*a))
    monkeypatch.setenv("ALBEF_FAST_TF32", "f16p")
    for config, expected in (("16,16,32,1,0,1", 1), ("16,16,16,1,0,1", 0)):
        monkeypatch.setenv("ALBEF_FAST_CONFIG", config)
        launches.clear()
        x = make_inputs(5, 20, 24, torch.float32, DEVICE)
        albef_fast.itc_loss(*_args(x), 0.07, 0.4, backend="triton", precision="high")
        assert len(launches) == expected, config


@pytest.mark.parametrize("config", ["16,16,16,0,0,1", "16,16,32,1,1,1", "16,16,32,0,0,1,2,0,1"])
@pytest.mark.parametrize("alpha,retrieval", [(0.0, False), (0.4, True)])
@pytest.mark.parametrize("feature_scale", [1.0, 2.0**-30])
def test_f16x3_products_keep_fp32_error(monkeypatch, config, alpha, retrieval, feature_scale):
    """ALBEF_FAST_FP32_DOT=f16x3 ("highest" on the Triton path): three fp16 products of (hi, lo)
    pairs of the scaled operands, 22 significant bits, pass the fp32 rule (2x eager fp32's error
    against fp64 + 1e-5), which 11-bit products fail (1e-4 on the loss here); also with features
    x 2^-30 and queues x 2^30, which fp16 itself cannot hold."""
    x = _rescaled(make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=retrieval), feature_scale)
    monkeypatch.setenv("ALBEF_FAST_CONFIG", config)
    monkeypatch.setenv("ALBEF_FAST_FP32_DOT", "f16x3")
    _check_rule(x, alpha, precision="highest")


@pytest.mark.parametrize("retrieval", [False, True])
def test_f16x3_key_sums_rounded_per_tile(monkeypatch, retrieval):
    """f16x3's key sums (kernels/itc_split.py:_key_sum): each key tile's three products into a fresh
    tile added to the running sum (TILE_SUMS, the default), or chained into it
    (ALBEF_FAST_TILE_SUMS=0). On a GPU the chain's truncating additions put dT 2.3e-5 from fp64
    at B = 512 (H100); under the interpreter the products are exact, so the two forms differ
    only in the order of fp32 roundings: close, and both within the fp32 rule. f16s keeps the
    chain (Triton folds one product's addition into its accumulator)."""
    x = make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=retrieval)
    env = dict(ALBEF_FAST_CONFIG="16,16,32,1,0,1", ALBEF_FAST_SPLITS="2", ALBEF_FAST_FP32_DOT="f16x3")
    runs = []
    for tile_sums in ("1", "0"):
        runs.append(_outputs(monkeypatch, x, 0.4, "highest", dict(env, ALBEF_FAST_TILE_SUMS=tile_sums)))
        _check_rule(x, 0.4, precision="highest")
    for tiled, chained in zip(*runs):
        torch.testing.assert_close(tiled, chained, rtol=1e-5, atol=1e-7)
    assert itc._tile_sums("f16x3") is False and itc._tile_sums("f16s") is False  # ALBEF_FAST_TILE_SUMS=0 here
    monkeypatch.delenv("ALBEF_FAST_TILE_SUMS")
    assert itc._tile_sums("f16x3") is True and itc._tile_sums("f16s") is False
    key = (7, 41, 24, torch.float32, torch.float32, (24, 1), (41, 1), torch.device("cpu"), True, True, "highest",
           torch.float32, None, itc._settings())
    assert itc._Plan(key).splits[0][1].constexprs["TILE_SUMS"] is True  # what the launches get


@pytest.mark.parametrize("b", [7, 20])
@pytest.mark.parametrize("config", ["16,16,32,1,0,1", "16,16,32,0,0,1,2,0,1"])
@pytest.mark.parametrize("alpha,retrieval", [(0.4, True), (0.0, False)])
def test_f16s_staged_rows_give_the_same_bits(monkeypatch, b, config, alpha, retrieval):
    """f16s's scaled query rows pass through the programs' own key-sum slices of the workspace
    (kernels/itc_split.py:_staged_rows, the default) or stay in registers (ALBEF_FAST_STAGE_ROWS=0):
    the same operands, so every output bit for bit; one state per program or both (transposed
    logits), with and without the teacher and retrieval, one row block (B = 7) or two (B = 20,
    the second partial), three splits: each program's rows and final key sums share its slices."""
    x = make_inputs(b, 41, 24, torch.float32, DEVICE, retrieval=retrieval)
    env = {"ALBEF_FAST_SPLITS": "3", "ALBEF_FAST_CONFIG": config, "ALBEF_FAST_TF32": "f16s"}
    staged = _outputs(monkeypatch, x, alpha, "high", dict(env, ALBEF_FAST_STAGE_ROWS="1"))
    registers = _outputs(monkeypatch, x, alpha, "high", dict(env, ALBEF_FAST_STAGE_ROWS="0"))
    _same_bits_or_rule(staged, registers, registers, same_bits=True)
    key = (b, 41, 24, torch.float32, torch.float32, (24, 1), (41, 1), torch.device("cpu"), alpha > 0, True, "high",
           None, None, itc._settings())
    assert itc._Plan(key).splits[0][1].constexprs["STAGE_ROWS"] is False  # ALBEF_FAST_STAGE_ROWS=0 here
    monkeypatch.delenv("ALBEF_FAST_STAGE_ROWS")
    assert itc._stage_rows("f16s") is True and itc._stage_rows("f16x3") is False


@pytest.mark.parametrize("b", [7, 20])  # one in-batch tile of 16 keys, or two
@pytest.mark.parametrize("splits", ["2", "5"])  # 5: more splits than tiles (4-6 in all), some with none
@pytest.mark.parametrize("precision,alpha,retrieval", [("highest", 0.4, True), ("high", 0.0, False)])
def test_interleaved_tiles_match(monkeypatch, b, splits, precision, alpha, retrieval):
    """ALBEF_FAST_INTERLEAVE=1: split s takes the key tiles s, s + S, ... (in-batch ones, then the
    queue's) instead of a contiguous range: every tile in one split, so the same values summed in
    another order (close; the sim blocks, one tile's products each, bit for bit), within the rule
    against fp64 ("high": within twice the contiguous order's error), and the same bits run to run."""
    x = make_inputs(b, 41, 24, torch.float32, DEVICE, retrieval=retrieval)
    env = {"ALBEF_FAST_SPLITS": splits, "ALBEF_FAST_CONFIG": "16,16,32,1,0,1"}
    contiguous = _outputs(monkeypatch, x, alpha, precision, dict(env, ALBEF_FAST_INTERLEAVE="0"))
    interleaved = _outputs(monkeypatch, x, alpha, precision, dict(env, ALBEF_FAST_INTERLEAVE="1"))
    # f16s ("high") rounds each key's softmax weight to 11 bits against the running max, which
    # the tile order moves: 4e-5 apart here; f16x3 ("highest") keeps 22 bits
    tol = 1e-5 if precision == "highest" else 2e-4
    for name, got, expected in zip(list(albef_fast.ITCOutput._fields) + ["grad"], interleaved, contiguous):
        if name.startswith("sim"):
            assert torch.equal(got, expected), name
        assert max_err(got, expected) <= tol * max(1.0, expected.abs().max().item()), name
    again = _outputs(monkeypatch, x, alpha, precision, dict(env, ALBEF_FAST_INTERLEAVE="1"))
    assert all(torch.equal(g, a) for g, a in zip(interleaved, again))
    if precision == "highest":
        _check_rule(x, alpha, precision=precision)
    else:
        # against the contiguous order's own error, not eager's: at these shapes cuBLAS ran its
        # "high" products without TF32 on an H200 (loss 4.6e-6 from fp64), while TF32-rounded
        # operands, contiguous or interleaved, f16s or tf32rn, are 3.4e-5 from it at B = 20
        exact = _outputs(monkeypatch, x, alpha, precision, {}, True, "torch", torch.float64)
        _same_bits_or_rule(interleaved, contiguous, exact, same_bits=False)
    key = (b, 41, 24, torch.float32, torch.float32, (24, 1), (41, 1), torch.device("cpu"), True, True, precision,
           None, None, itc._settings())
    assert itc._Plan(key).splits[0][1].constexprs["INTERLEAVE"] is True  # what the launches get
    monkeypatch.delenv("ALBEF_FAST_INTERLEAVE")
    assert itc._interleave() is False


def test_f16_products_are_chosen_by_the_setting(monkeypatch):
    """TF32-class products: fp16 products by default (fp32 tiles holding fp16 values under the
    interpreter, whose fp16 dot is not exact), rounded TF32 with ALBEF_FAST_TF32=tf32rn; fp32
    ("highest") products: 3 fp16 products (f16x3) by default, fp32 FMA with ALBEF_FAST_FP32_DOT=ieee."""
    monkeypatch.delenv("ALBEF_FAST_TF32", raising=False)
    assert itc._dot_flags(torch.float32, "high") == (tl.float32 if itc._INTERPRET else tl.float16, "f16s")
    monkeypatch.setenv("ALBEF_FAST_TF32", "tf32rn")
    assert itc._dot_flags(torch.float32, "high") == (tl.float32, "tf32rn")
    monkeypatch.delenv("ALBEF_FAST_FP32_DOT", raising=False)
    assert itc._dot_flags(torch.float32, "highest") == (tl.float32 if itc._INTERPRET else tl.float16, "f16x3")
    monkeypatch.setenv("ALBEF_FAST_FP32_DOT", "ieee")
    assert itc._dot_flags(torch.float32, "highest") == (tl.float32, "ieee")
    # "medium": bf16 products on a GPU; bf16 values in fp32 tiles under the interpreter
    medium = (tl.float32, "bf16") if itc._INTERPRET else (tl.bfloat16, "ieee")
    assert itc._dot_flags(torch.float32, "medium") == medium


def test_untuned_f16x3_takes_its_own_default(monkeypatch):
    """f16x3 with no TUNED entry (a table without one) gets its own default (_UNTUNED), not the
    general one; with the package's table, its H100 entry; tuned precisions keep their table."""
    from albef_fast.kernels import itc_configs
    monkeypatch.setattr(itc_configs, "_INTERPRET", False)
    for name in ("ALBEF_FAST_CONFIG", "ALBEF_FAST_AUTOTUNE", "ALBEF_FAST_TUNED", "ALBEF_FAST_WAVES"):
        monkeypatch.delenv(name, raising=False)
    config, waves = itc_configs.launch_config(512, tl.float16, "f16x3")
    assert (itc_configs.config_spec(config), waves) == itc_configs.TUNED["f16x3"][1][1:]
    config, waves = itc_configs.launch_config(512, tl.float16, "f16s")
    assert (itc_configs.config_spec(config), waves) == itc_configs.TUNED["f16s"][1][1:]
    monkeypatch.setattr(itc_configs, "TUNED", {k: v for k, v in itc_configs.TUNED.items() if k != "f16x3"})
    config, _ = itc_configs.launch_config(512, tl.float16, "f16x3")
    assert itc_configs.config_spec(config) == itc_configs._UNTUNED["f16x3"]


@pytest.mark.parametrize("b,q,d", [(1, 10, 4), (6, 0, 8), (2, 1, 5)])
def test_edge_shapes(b, q, d):
    _check_rule(make_inputs(b, q, d, torch.float32, DEVICE, retrieval=True), 0.4, precision="highest")


@pytest.mark.parametrize("config", ["16,16,16,0,0,1", "16,16,16,1,0,1"])
@pytest.mark.parametrize("dtype,precision,atol", [(torch.float32, "highest", 1e-5), (torch.bfloat16, None, 1e-3)])
def test_many_masked_dim_blocks(monkeypatch, config, dtype, precision, atol):
    """D = 70 in five 16-wide blocks, the last one 6 wide: the logits summed over all of them in
    each program, the key sums per block; the merge and the backward alike. (D = 1000 in the
    tuned 256-wide blocks: test_cuda_wide_dim; the interpreter takes minutes there.)"""
    monkeypatch.setenv("ALBEF_FAST_CONFIG", config)
    _check_rule(make_inputs(3, 21, 70, dtype, DEVICE, retrieval=True), 0.4, atol=atol, precision=precision)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,dtype,atol", [("highest", torch.float32, 1e-5), ("high", torch.float32, 2e-3),
                                                  (None, torch.bfloat16, 2e-2)])
def test_cuda_wide_dim(precision, dtype, atol):
    """D = 1000 (SPEC: up to 1024, not only powers of two) with the tuned configs: four 256-wide
    D blocks, the last one masked."""
    _check_rule(make_inputs(64, 4001, 1000, dtype, "cuda", retrieval=True), 0.4, atol=atol, precision=precision)


@pytest.mark.parametrize("temp", [0.001, 0.5])
@pytest.mark.parametrize("dtype,precision,atol", [(torch.float32, "highest", 1e-5), (torch.float32, "high", 1e-2),
                                                  (torch.bfloat16, None, 1e-3), (torch.float16, None, 1e-3)])
def test_albefs_temperature_bounds_with_aligned_pairs(dtype, precision, atol, temp):
    """ALBEF clamps T to [0.001, 0.5]. At 0.001, pairs aligned exactly (in-batch and in the queue)
    give logits of 1 / T = 1000, the largest L2-normalized features can: the fp16-operand modes
    ("highest", "high") keep their softmax weights below 2^14 there (NOTES session 27: where they
    stop). "high": TF32's 11 bits against eager's fp32 on the CPU, hence its atol."""
    x = make_inputs(7, 41, 24, dtype, DEVICE, retrieval=True, seed=3)
    x.text_feat_m, x.image_feat_m = x.image_feat.clone(), x.text_feat.clone()
    x.text_queue[:, :3] = x.image_feat[:3].T
    _check_rule(x, 0.4, temp=temp, atol=atol, relative=True, precision=precision)


@pytest.mark.parametrize("precision,env,atol", [("highest", {}, 1e-5), ("high", {}, 1e-2),
                                                ("high", {"ALBEF_FAST_TF32": "f16p"}, 1e-2)])
def test_fp16_operand_modes_past_unit_norm(monkeypatch, precision, env, atol):
    """Features 200x unit norm at T = 0.001: base-2 logits up to 5.8e7, past 2^25, where the
    weights' shift max - 14 rounds down by 2 and an unguarded weight of 2^16 overflowed fp16 (NaN
    loss until session 27; kernels/itc_split.py:_online_softmax)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    x = make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=True, seed=3)
    x.text_feat_m, x.image_feat_m = x.image_feat.clone(), x.text_feat.clone()
    for name in ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue"):
        setattr(x, name, getattr(x, name) * 200.0)
    _check_rule(x, 0.4, temp=0.001, atol=atol, relative=True, precision=precision)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_features_and_queues(dtype):
    _check_rule(make_inputs(5, 37, 24, dtype, DEVICE), 0.4, atol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("retrieval", [False, True])
def test_medium_products_are_bf16_products(alpha, retrieval):
    """precision="medium" with fp32 features: bf16 operands, within bf16's error of fp64, and on
    inputs bf16 holds exactly close to the bf16 inputs' results (the interpreter rounds the
    softmax weights to bf16 there too, as the GPU does; its bf16 features' path keeps them fp32).
    Under the interpreter "medium" had no mode of its own until session 20: its bf16 dot gave
    losses of 1e11."""
    x = make_inputs(7, 29, 24, torch.bfloat16, DEVICE, retrieval=retrieval)
    wide = make_inputs(7, 29, 24, torch.bfloat16, DEVICE, retrieval=retrieval)
    for name in ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue"):
        setattr(wide, name, getattr(x, name).float())
    loss_h, grads_h = _run(_triton, x, 0.07, alpha, 1.3)
    loss_m, grads_m = _run(lambda *a: _triton(*a, precision="medium"), wide, 0.07, alpha, 1.3)
    torch.testing.assert_close(loss_m, loss_h, rtol=1e-3, atol=1e-3)
    for g_m, g_h in zip(grads_m, grads_h):
        assert g_m.dtype == torch.float32
        torch.testing.assert_close(g_m, g_h.float(), rtol=2e-2, atol=2e-3)
    # on fp32 inputs: the rule against eager in bf16
    x = make_inputs(7, 29, 24, torch.float32, DEVICE, retrieval=retrieval)
    loss, grads = _run(lambda *a: _triton(*a, precision="medium"), x, 0.07, alpha, 1.3)
    loss_e, grads_e = _run(_eager(torch.bfloat16), x, 0.07, alpha, 1.3)
    loss_64, grads_64 = _run(_eager(torch.float64), x, 0.07, alpha, 1.3)
    assert max_err(loss, loss_64) <= 2 * max_err(loss_e, loss_64) + 1e-3
    for g, g_e, g_64 in zip(grads, grads_e, grads_64):
        assert max_err(g, g_64) <= 2 * max_err(g_e, g_64) + 1e-3 * max(1.0, g_64.abs().max().item())


def _rounded_like_the_products(x: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 x as the products of precision round it, to nearest even: "high" (f16s) to 11
    significant bits, "medium" to bf16."""
    if precision == "high":
        bits = x.view(torch.int32)
        return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    return x.to(torch.bfloat16).float()


def _eager_rounded(precision: str):
    """Eager ALBEF with exact arithmetic on operands rounded as the products round them (the
    error eager itself makes at that precision, without fp32's): fp64 on rounded values, the
    rounding passed through by the gradient."""
    def fn(a, b, am, bm, iq, tq, t, alpha, idx, idq):
        r = lambda v: _rounded_like_the_products(v.detach(), precision).double()  # noqa: E731
        a, b = (v.double() + (r(v) - v.double()).detach() for v in (a, b))
        return reference.itc_loss(a, b, r(am), r(bm), r(iq), r(tq), t.double(), alpha, idx, idq)
    return fn


@pytest.mark.parametrize("precision", ["high", "medium"])
@pytest.mark.parametrize("alpha,retrieval", [(0.0, False), (0.4, False), (0.4, True)])
def test_near_zero_loss_keeps_eagers_error(precision, alpha, retrieval):
    """Pairs aligned as after training (loss ~1e-3): within twice the error of eager on operands
    rounded alike (+ fp32's). Eager's log_softmax and its target terms share the rounded logits,
    so their errors cancel as the loss goes to 0; until session 22 the merge took the target terms
    (u . h, u . P_m, dq's h) from the features as they are: the loss 500x, dT 100x and dq 300x
    further from fp64 than that (B = 16, "high")."""
    x = make_inputs(16, 40, 32, torch.float32, DEVICE, retrieval=retrieval)
    g = torch.Generator().manual_seed(1)
    near = lambda v, s: torch.nn.functional.normalize(v + s * torch.randn(v.shape, generator=g).to(v), dim=1)  # noqa: E731
    x.text_feat, x.image_feat_m, x.text_feat_m = (near(x.image_feat, s) for s in (0.05, 0.02, 0.02))
    loss, grads = _run(lambda *a: _triton(*a, precision=precision), x, 0.07, alpha, 1.3)
    loss_e, grads_e = _run(_eager_rounded(precision), x, 0.07, alpha, 1.3)
    loss_64, grads_64 = _run(_eager(torch.float64), x, 0.07, alpha, 1.3)
    assert retrieval or loss_64 < 0.02  # the regime meant
    # atol: fp32's floor, with room for the tensor cores' truncating sums (the old error was 2e-5 -
    # 8e-2 on the loss, 4.5e-5 - 7e-1 on the gradients here)
    assert max_err(loss, loss_64) <= 2 * max_err(loss_e, loss_64) + 1e-5
    for g, g_e, g_64 in zip(grads, grads_e, grads_64):
        assert max_err(g, g_64) <= 2 * max_err(g_e, g_64) + 3e-5 * max(1.0, g_64.abs().max().item())


def test_fp32_features_with_bf16_queue():
    x = make_inputs(5, 37, 24, torch.float32, DEVICE, queue_dtype=torch.bfloat16)
    loss = albef_fast.itc_loss(*_args(x), 0.07, backend="triton", precision="highest")
    args = list(_args(x))
    args[4:] = [args[4].float(), args[5].float()]
    torch.testing.assert_close(loss, reference.itc_loss(*args, 0.07), rtol=1e-5, atol=1e-5)


def test_strided_queue_is_read_in_place():
    x = make_inputs(5, 37, 24, torch.float32, DEVICE)
    iq, tq = x.image_queue.T.contiguous().T, x.text_queue.T.contiguous().T  # [D, Q] with strides (1, D)
    assert iq.stride() == (1, 24)
    got = albef_fast.itc_loss(*_args(x)[:4], iq, tq, 0.07, backend="triton", precision="highest")
    torch.testing.assert_close(got, reference.itc_loss(*_args(x), 0.07), rtol=1e-5, atol=1e-5)


def test_mixed_layouts_give_the_contiguous_results():
    """Features whose strides differ (one column-major, one a row slice) and queues of two layouts:
    copied to common strides before the kernels; the same bits as the contiguous call."""
    x = make_inputs(5, 37, 24, torch.float32, DEVICE)
    feats = list(_args(x)[:4])
    feats[1] = feats[1].T.contiguous().T  # stride(1) != 1
    feats[2] = torch.cat([feats[2], feats[2]], dim=1)[:, :24]  # row stride 48
    tq = x.text_queue.T.contiguous().T  # [D, Q] with strides (1, D), the image queue (Q, 1)
    a = albef_fast.itc_loss(*feats, x.image_queue, tq, 0.07, backend="triton", precision="highest")
    b = albef_fast.itc_loss(*_args(x), 0.07, backend="triton", precision="highest")
    assert torch.equal(a, b)


@pytest.mark.parametrize("retrieval", [False, True])
def test_details_match_torch_backend(retrieval):
    x = make_inputs(6, 29, 16, torch.float32, DEVICE, retrieval=retrieval)
    kw = dict(idx=x.idx, idx_queue=x.idx_queue, return_details=True, precision="highest")
    fast = albef_fast.itc_loss(*_args(x), 0.07, 0.0, backend="triton", **kw)
    slow = albef_fast.itc_loss(*_args(x), 0.07, 0.0, backend="torch", **kw)
    for name, a, b in zip(fast._fields, fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert fast.kl_i2t > 0  # alpha 0 with details still computes the teacher


def test_bitwise_deterministic():
    x = make_inputs(9, 45, 24, torch.float32, DEVICE, retrieval=True)
    runs = [_run(lambda *a: _triton(*a, precision="highest"), x, 0.07, 0.4, 1.0) for _ in range(2)]
    (l1, g1), (l2, g2) = runs
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,dtype,atol", [("highest", torch.float32, 1e-5), ("high", torch.float32, 2e-3),
                                                  ("medium", torch.float32, 1e-2), (None, torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b", [64, 256])
def test_cuda_albef_shape(precision, dtype, atol, b):
    x = make_inputs(b, 65536, 256, dtype, "cuda")
    _check_rule(x, 0.4, atol=atol, precision=precision)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,dtype,atol", [("high", torch.float32, 2e-3), (None, torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b", [64, 200])
def test_cuda_retrieval_odd_dim(precision, dtype, atol, b):
    """Masked D (200: no power of two), a queue length no multiple of any tile, retrieval targets."""
    _check_rule(make_inputs(b, 4001, 200, dtype, "cuda", retrieval=True), 0.4, atol=atol, precision=precision)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("b,q,d,retrieval", [(64, 65536, 256, False), (512, 65536, 256, False), (64, 4001, 200, True)])
def test_cuda_f16_products(monkeypatch, b, q, d, retrieval):
    """ALBEF_FAST_TF32=f16s at ALBEF's shapes and a masked odd one: within the rule against eager
    TF32, and not the TF32 path's bits (fp16 tensor-core products)."""
    x = make_inputs(b, q, d, torch.float32, "cuda", retrieval=retrieval)
    monkeypatch.setenv("ALBEF_FAST_TF32", "f16s")
    _check_rule(x, 0.4, atol=2e-3, precision="high")
    f16 = _run(lambda *a: _triton(*a, precision="high"), x, 0.07, 0.4, 1.0)
    monkeypatch.setenv("ALBEF_FAST_TF32", "tf32rn")
    tf32 = _run(lambda *a: _triton(*a, precision="high"), x, 0.07, 0.4, 1.0)
    assert not torch.equal(f16[1][0], tf32[1][0])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["f16x3", "f16x3p"])
@pytest.mark.parametrize("b,q,d,retrieval", [(64, 65536, 256, False), (512, 65536, 256, False), (64, 4001, 200, True)])
def test_cuda_f16x3_products(monkeypatch, mode, b, q, d, retrieval):
    """ALBEF_FAST_FP32_DOT=f16x3 on the Triton path, and f16x3p (the pairs converted first, in
    chunks at B = 512): within the fp32 rule against eager fp32."""
    monkeypatch.setenv("ALBEF_FAST_FP32_DOT", mode)
    _check_rule(make_inputs(b, q, d, torch.float32, "cuda", retrieval=retrieval), 0.4, precision="highest")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("b,q,d,retrieval", [(64, 65536, 256, False), (512, 65536, 256, False), (64, 4001, 200, True)])
def test_cuda_converted_operands(monkeypatch, b, q, d, retrieval):
    """ALBEF_FAST_TF32=f16p on a GPU: the rule against eager TF32; and with f16s's config, one
    split and one chunk (f16s's order of sums, the same fp16 operands), f16s's values to the
    last bits (the compiler may contract the two kernels' fp32 arithmetic differently)."""
    x = make_inputs(b, q, d, torch.float32, "cuda", retrieval=retrieval)
    monkeypatch.setenv("ALBEF_FAST_TF32", "f16p")
    _check_rule(x, 0.4, atol=2e-3, precision="high")
    monkeypatch.setenv("ALBEF_FAST_CONFIG", "128,32,256,1,0,8,4")
    monkeypatch.setenv("ALBEF_FAST_SPLITS", "1")
    monkeypatch.setenv("ALBEF_FAST_CHUNK_TILES", "100000")
    runs = []
    for mode in ("f16s", "f16p"):
        monkeypatch.setenv("ALBEF_FAST_TF32", mode)
        loss, grads = _run(lambda *a: _triton(*a, precision="high"), x, 0.07, 0.4, 1.0)
        runs.append((loss, *grads))
    for got, expected in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_direct_launch_matches_jit_bitwise(offset, monkeypatch):
    """The direct launches (kernels/launch.py) give the bits of Triton's own launch path, for
    aligned and misaligned (offset 1: no 16-byte specialization) features."""
    from albef_fast.kernels import launch

    if not launch.direct_launch_enabled():
        pytest.skip(f"direct launches are off for Triton {triton.__version__}")
    x = make_inputs(64, 4001, 256, torch.bfloat16, "cuda")
    x.image_feat = torch.cat([x.image_feat.new_zeros(offset), x.image_feat.reshape(-1)])[offset:].view(64, 256)
    runs = []
    for direct in (True, True, False):  # the first call compiles, the second launches directly
        for launcher in itc._LAUNCH.values():
            monkeypatch.setattr(launcher, "_direct", direct)
        runs.append(_run(_triton, x, 0.07, 0.4, 1.3))
    (l1, g1), (l2, g2) = runs[1:]
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_automatic_backend_choice():
    from albef_fast.functional import resolve_backend

    feat = torch.zeros(2, 2, device="cuda")
    assert resolve_backend(None, "highest", feat)[0] == "triton"
    assert resolve_backend(None, "high", feat)[0] == "triton"
    assert resolve_backend(None, None, feat.double())[0] == "torch"
    assert resolve_backend(None, None, feat.bfloat16())[0] == "triton"


def test_on_device_makes_the_tensors_device_current(monkeypatch):
    """kernels/launch.py:on_device: a guard to the tensors' GPU where another one is current,
    nothing where it is current already or the tensors are not on a GPU."""
    from albef_fast.kernels import launch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for device in (torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda")):
        assert isinstance(launch.on_device(device), contextlib.nullcontext), device
    guard = launch.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_every_launch_runs_with_the_features_device_current(monkeypatch):
    """Triton compiles and launches on the current device, not on its tensors'
    (triton-lang/triton#2441): with features on cuda:1 and cuda:0 current, a launch outside
    on_device fails ("cannot be accessed from Triton") or runs on cuda:0's stream. Every launch of
    the forward and of the fused backward runs inside on_device(the features' device)."""
    from albef_fast.kernels import itc_backward, launch

    current, seen = [], []

    @contextlib.contextmanager
    def on_device(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    call = launch.PreparedLaunch.__call__

    def recorded(self, tensors, floats):
        seen.append(current[-1] if current else None)
        return call(self, tensors, floats)

    monkeypatch.setattr(launch, "on_device", on_device)
    monkeypatch.setattr(itc_backward, "on_device", on_device)
    monkeypatch.setattr(launch.PreparedLaunch, "__call__", recorded)
    x = make_inputs(6, 29, 16, torch.float32, DEVICE)
    _run(_triton, x, 0.07, 0.4, 1.3)  # grad_output != 1: the fused backward scales
    assert len(seen) >= 3 and seen == [x.image_feat.device] * len(seen), seen


def test_a_plan_recorded_while_another_thread_launches_keeps_its_launches(monkeypatch):
    """nn.DataParallel runs its replicas' forwards in threads (ITCLoss evaluates there), and
    Triton's launcher lets go of the GIL. Thread A records its plan's launches for the C++ step
    (kernels/launch.py:recording); thread B's first call, made after A's first launch, ended A's
    recording early before, so A's plan lost its merge, which the C++ step would then never
    replay (outputs nothing wrote). Now A's plan keeps every launch, B's launches stay out of it,
    B records on its next call, and both calls give their solo values."""
    import threading

    from albef_fast.kernels import launch

    registered = []

    class RecordingStub:  # the C++ step's record_plan: what each plan would replay
        @staticmethod
        def record_plan(plan, call, records, workspace, outputs):
            launches = [(id(r[0].launcher), r[0].grid, r[0].ints, sorted(r[0].constexprs.items())) for r in records]
            registered.append((threading.current_thread().name, launches))
            return -1

    shapes = {"A": make_inputs(5, 29, 16, torch.float32, DEVICE, seed=1),
              "B": make_inputs(6, 31, 16, torch.float32, DEVICE, seed=2)}
    monkeypatch.setattr(itc, "CPP", RecordingStub)
    solo = {}
    for name, x in shapes.items():
        monkeypatch.setattr(itc, "_PLANS", {})
        registered.clear()
        solo[name] = (_run(_triton, x, 0.07, 0.4, 1.0), registered[0][1])
    assert all(len(launches) >= 2 for _, launches in solo.values())
    monkeypatch.setattr(itc, "_PLANS", {})
    registered.clear()
    a_launched, b_done = threading.Event(), threading.Event()
    call = launch.PreparedLaunch.__call__

    def paced(self, tensors, floats):
        call(self, tensors, floats)
        if threading.current_thread().name == "A" and not a_launched.is_set():
            a_launched.set()
            b_done.wait(30)

    monkeypatch.setattr(launch.PreparedLaunch, "__call__", paced)
    results = {}

    def run(name):
        if name == "B":
            a_launched.wait(30)
        try:
            results[name] = _run(_triton, shapes[name], 0.07, 0.4, 1.0)
        finally:
            b_done.set() if name == "B" else None

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert registered == [("A", solo["A"][1])], [(n, len(r)) for n, r in registered]
    results["B again"] = _run(_triton, shapes["B"], 0.07, 0.4, 1.0)
    assert registered[1][1] == solo["B"][1]
    for name, (loss, grads) in results.items():
        (loss_solo, grads_solo), _ = solo[name.split()[0]]
        assert torch.equal(loss, loss_solo) and all(torch.equal(a, b) for a, b in zip(grads, grads_solo)), name


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_features_on_a_gpu_that_is_not_current():
    """Features and queues on cuda:1 while cuda:0 is current (a model moved with .to("cuda:1")
    and no set_device): the first call (Python path, plan recorded) and the later ones (the C++
    step) give the bits of the same calls with cuda:1 current."""
    x = make_inputs(64, 4001, 256, torch.bfloat16, "cuda:1", retrieval=True)
    torch.cuda.set_device(0)
    runs = [_run(_triton, x, 0.07, 0.4, 1.3) for _ in range(3)]
    with torch.cuda.device(1):
        expected = _run(_triton, x, 0.07, 0.4, 1.3)
    for loss, grads in runs:
        assert torch.equal(loss, expected[0]) and all(torch.equal(a, b) for a, b in zip(grads, expected[1]))


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("retrieval", [False, True])
def test_forward_without_gradients_gives_the_same_values(alpha, retrieval):
    x = make_inputs(6, 29, 16, torch.float32, DEVICE, retrieval=retrieval)
    kw = dict(idx=x.idx, idx_queue=x.idx_queue, return_details=True, backend="triton", precision="highest")
    with torch.no_grad():
        fast = albef_fast.itc_loss(*_args(x), 0.07, alpha, **kw)
    a = x.image_feat.clone().requires_grad_()
    full = albef_fast.itc_loss(a, *_args(x)[1:], 0.07, alpha, **kw)
    for name, got, expected in zip(fast._fields, fast, full):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6, msg=name)


@triton.jit
def _round_tf32_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, itc_operands._round_tf32(tl.load(x_ptr + offs)))


def test_round_tf32_is_nearest_ties_away():
    """The rounding applied before TF32 dots: nearest TF32 value, ties away from zero."""
    x = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-8, 8, (1000,)),
                   torch.tensor([1.0 + 2.0 ** -11, -(1.0 + 2.0 ** -11), 1.0 + 2.0 ** -12, 0.0, -0.0])])
    x = torch.nn.functional.pad(x, (0, 1024 - x.numel()))
    xd = x.to(DEVICE)
    out = torch.empty_like(xd)
    _round_tf32_kernel[(1,)](xd, out, N=1024)
    got = out.cpu()
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # as uint32: sign bit untouched below
    r = ((bits + 0x1000) >> 13) << 13
    expected = (r - (r >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    assert torch.equal(got, expected)
    assert ((got - x).abs() <= x.abs() * 2.0 ** -11).all()  # within half a TF32 ulp
    assert got[1000] == 1.0 + 2.0 ** -10 and got[1001] == -(1.0 + 2.0 ** -10)  # ties away from zero


@pytest.mark.parametrize("retrieval", [False, True])
def test_merge_tilings_agree(monkeypatch, retrieval):
    """ALBEF_FAST_MERGE changes the merge's tiles and how many splits it loads at once, so the
    order of its sums, and nothing else (7 splits: chunks of 2, 4 and 8 all end partial). The
    settings: partial row / D blocks and chunks at 17 x 33, the loads pipelined, 8 warps; one
    test per target kind, the default computed once (each call is ~5 s on the interpreter)."""
    x = make_inputs(17, 40, 33, torch.float32, DEVICE, retrieval=retrieval)
    monkeypatch.setenv("ALBEF_FAST_SPLITS", "7")
    kw = dict(idx=x.idx, idx_queue=x.idx_queue, return_details=True, backend="triton", precision="highest")
    a = x.image_feat.clone().requires_grad_()
    default = albef_fast.itc_loss(a, *_args(x)[1:], 0.07, 0.4, **kw)
    (grad_default,) = torch.autograd.grad(default.loss, a)
    for merge in ["8,16,4", "4,32,2", "16,8,8", "8,16,4,3", "8,16,4,1,8"]:
        monkeypatch.setenv("ALBEF_FAST_MERGE", merge)
        tiled = albef_fast.itc_loss(a, *_args(x)[1:], 0.07, 0.4, **kw)
        (grad_tiled,) = torch.autograd.grad(tiled.loss, a)
        for name, got, expected in zip(tiled._fields, tiled, default):
            torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-6, atol=1e-6, msg=f"{merge}: {name}")
        torch.testing.assert_close(grad_tiled, grad_default, rtol=1e-6, atol=1e-7, msg=merge)


@pytest.mark.parametrize("merge", ["8,16", "8,12,4", "a,b,c", "0,16,4", "8,16,4,0", "8,16,4,2,3", "8,16,4,2,4,1"])
def test_bad_merge_setting_is_named(monkeypatch, merge):
    x = make_inputs(5, 12, 8, torch.float32, DEVICE)
    monkeypatch.setenv("ALBEF_FAST_MERGE", merge)
    with pytest.raises(ValueError, match="ALBEF_FAST_MERGE"):
        albef_fast.itc_loss(*_args(x), 0.07, 0.4, backend="triton")


def _garbage_empty(monkeypatch):
    """torch.empty's floating tensors filled with NaN from now on (the test's end undoes it): the
    kernels' workspace and outputs start as garbage, so an element nothing writes shows."""
    empty = torch.empty

    def filled(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", filled)


@pytest.mark.parametrize("alpha,retrieval,grad", [(0.4, True, True), (0.0, False, True), (0.4, False, False)])
@pytest.mark.parametrize("merge", ["", "8,16,4"])  # 1 / 2 x 3 x 2 merge programs at 9 x 33
def test_finish_in_merge_gives_the_finish_kernels_bits(monkeypatch, alpha, retrieval, grad, merge):
    """The merge's last program writes the scalars (kernels/itc_merge.py:_finish_last, the default)
    or a kernel of their own does (ALBEF_FAST_FINISH=kernel): the same bits. Workspace and outputs
    start as NaN: the ticket counts from the split kernel's zero, and a finish that never ran, or
    ran before the last program's partials, leaves NaN."""
    x = make_inputs(9, 40, 33, torch.float32, DEVICE, retrieval=retrieval)
    _garbage_empty(monkeypatch)
    env = {"ALBEF_FAST_SPLITS": "3", "ALBEF_FAST_MERGE": merge}
    fused = _outputs(monkeypatch, x, alpha, "highest", env, grad=grad)
    kernel = _outputs(monkeypatch, x, alpha, "highest", dict(env, ALBEF_FAST_FINISH="kernel"), grad=grad)
    assert all(torch.isfinite(t).all() for t in fused)
    assert all(torch.equal(f, k) for f, k in zip(fused, kernel))


def test_bad_finish_setting_is_named(monkeypatch):
    x = make_inputs(5, 12, 8, torch.float32, DEVICE)
    monkeypatch.setenv("ALBEF_FAST_FINISH", "merged")
    with pytest.raises(ValueError, match="ALBEF_FAST_FINISH"):
        albef_fast.itc_loss(*_args(x), 0.07, 0.4, backend="triton")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, None), (torch.float32, "high")])
def test_cuda_finish_in_merge_is_stable(monkeypatch, dtype, precision):
    """The fused finish's memory ordering on the card (the interpreter runs programs one by one):
    at ALBEF's B = 64, 200 steps with the merge's last program finishing give the finish kernel's
    bits every time (a program reading partials before they are visible would differ)."""
    x = make_inputs(64, 65536, 256, dtype, DEVICE)
    kernel = _outputs(monkeypatch, x, 0.4, precision, {"ALBEF_FAST_FINISH": "kernel"}, dtype=dtype)
    monkeypatch.setenv("ALBEF_FAST_FINISH", "merge")
    args = _args(x)
    for _ in range(200):
        out = albef_fast.itc_loss(*args, 0.07, 0.4, return_details=True, backend="triton", precision=precision)
        assert all(torch.equal(f, k) for f, k in zip(out, kernel[:9]))


def _plan_variants():
    """Backend calls: a base one, then others that differ from it in one thing the launch
    plan depends on."""
    base = dict(b=5, q=37, d=24, dtype=torch.float32, queue_dtype=None, alpha=0.4, details=False, grad=True,
                precision="high", temp=torch.tensor(0.07), retrieval=False, env={}, layout="plain")
    changes = [{}, dict(b=8), dict(q=19), dict(d=16), dict(dtype=torch.bfloat16), dict(queue_dtype=torch.float16),
               dict(alpha=0.0), dict(grad=False), dict(precision="medium"), dict(temp=0.05),
               dict(temp=torch.tensor(0.07, dtype=torch.float64)), dict(retrieval=True),
               dict(env={"ALBEF_FAST_SPLITS": "2"}), dict(env={"ALBEF_FAST_MERGE": "8,16,4"}),
               dict(env={"ALBEF_FAST_FINISH": "kernel"}),
               dict(layout="row-padded"), dict(layout="queue-transposed")]
    return [dict(base, **change) for change in changes]


def _backend_call(v, monkeypatch):
    x = make_inputs(v["b"], v["q"], v["d"], v["dtype"], DEVICE, queue_dtype=v["queue_dtype"],
                    retrieval=v["retrieval"])
    feats, queues = list(_args(x)[:4]), list(_args(x)[4:])
    if v["layout"] == "row-padded":  # row stride D + 3: the feature strides change, not their values
        feats = [torch.cat([f, f[:, :3]], 1)[:, : v["d"]] for f in feats]
    if v["layout"] == "queue-transposed":  # [D, Q] views of [Q, D] storage
        queues = [q.t().contiguous().t() for q in queues]
    with monkeypatch.context() as env:
        for name, value in v["env"].items():
            env.setenv(name, value)
        temp = v["temp"].to(DEVICE) if isinstance(v["temp"], torch.Tensor) else v["temp"]  # the backend takes it as is
        return itc.itc_triton(*feats, *queues, temp, v["alpha"], x.idx, x.idx_queue, v["details"], v["grad"],
                              v["precision"])


def test_cached_plans_match_fresh_ones(monkeypatch):
    """Launch plans are cached by what they depend on (kernels/itc.py _Plan). Every variant gets
    a plan of its own, and with all of them cached each call gives the bits it gave when its plan
    was new (a key missing a field would reuse another variant's plan: wrong shapes or flags)."""
    itc._PLANS.clear()
    fresh = []
    for n, v in enumerate(_plan_variants(), 1):
        fresh.append(_backend_call(v, monkeypatch))
        assert len(itc._PLANS) == n, v
    for v, outputs in zip(_plan_variants(), fresh):
        cached = _backend_call(v, monkeypatch)
        assert all(torch.equal(c, f) for c, f in zip(cached, outputs)), v
    assert len(itc._PLANS) == len(fresh)


def test_plan_cache_starts_over_when_full(monkeypatch):
    """Shapes that keep changing do not grow the plan cache (or the launchers' kernel caches)
    without bound; calls after a reset give the same bits."""
    monkeypatch.setattr(itc, "_MAX_PLANS", 2)
    itc._PLANS.clear()
    variants = _plan_variants()[:3]
    first = [_backend_call(v, monkeypatch) for v in variants]
    assert len(itc._PLANS) == 1  # the third plan found the cache full
    again = [_backend_call(v, monkeypatch) for v in variants]
    assert len(itc._PLANS) <= 2
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("b,q,d", [(5, 37, 24), (6, 0, 8)])
@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
@pytest.mark.parametrize("retrieval", [False, True])
def test_no_buffer_is_read_before_it_is_written(b, q, d, precision, retrieval):
    """Under torch.use_deterministic_algorithms(True) torch.empty fills its memory with NaN: every
    output, workspace and scratch buffer the launches take from torch.empty must be written before
    it is read, or the results would change (they give the same bits)."""
    x = make_inputs(b, q, d, device=DEVICE, retrieval=retrieval)

    def run():
        a, t = x.image_feat.clone().requires_grad_(), torch.tensor(0.07, device=DEVICE, requires_grad=True)
        out = _triton(a, *_args(x)[1:], t, 0.4, x.idx, x.idx_queue, precision=precision, return_details=True)
        (out.loss * 1.3).backward()
        return list(out) + [a.grad, t.grad]

    expected = run()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        got = run()
    finally:
        torch.use_deterministic_algorithms(False)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
