"""f16s's key tiles (fp32 features, "high"): which tiles enter the fp16 products as they are
(kernels/itc_operands.py:_f16_as_is), and ALBEF_FAST_KEYS_AS_IS=1, which converts them before
their largest element is known and streams a split's keys again where one falls outside. Under
the interpreter on the CPU (conftest); on a GPU the same tests run on the compiled kernels.
"""
import inspect

import pytest
import torch

import albef_fast
from tests.helpers import make_inputs, max_err

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from albef_fast.kernels import itc, itc_operands  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _key_scales_kernel(amax_ptr, down_ptr, up_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    down, up = itc_operands._f16_key_scales(tl.load(amax_ptr + offs))
    tl.store(down_ptr + offs, down)
    tl.store(up_ptr + offs, up)


def test_key_tiles_in_the_band_are_not_scaled():
    """A key tile whose largest |element| lies in [2^-4, 2^15) keeps scale 1 (fp16 holds it with
    TF32's 11 bits down to 2^-10 of that element, and cannot overflow); outside, the scale puts
    the largest element in [2^14, 2^15) as for the query rows; inf, 0 and NaN go to the scaled path."""
    below, top = 2.0 ** -4, 2.0 ** 15
    amax = torch.tensor([below, 0.3, 1.0, 65504.0 / 2, top * (1 - 2.0 ** -24),  # in the band
                         below * (1 - 2.0 ** -24), 1e-3, 2.0 ** -30, top, 1e6, 2.0 ** 40,  # outside
                         0.0, float("inf"), float("nan"), 0.5, 0.5])
    down, up = torch.empty(16, device=DEVICE), torch.empty(16, device=DEVICE)
    _key_scales_kernel[(1,)](amax.to(DEVICE), down, up, N=16)
    down, up = down.cpu(), up.cpu()
    assert torch.equal(down[:5], torch.ones(5)) and torch.equal(up[:5], torch.ones(5))
    assert torch.equal(down[14:], torch.ones(2))
    scaled = amax[5:11] * down[5:11]
    assert ((scaled >= 2.0 ** 14) & (scaled < 2.0 ** 15)).all(), scaled
    assert torch.equal(down[5:11] * up[5:11], torch.ones(6))  # exact inverses (powers of two)
    assert (down[11:14] != 1).all() and (up[11:14] != 1).all()


def _outputs(monkeypatch, x, env, backend="triton", dtype=torch.float32):
    """Every output of itc_loss(..., alpha=0.4, return_details=True) at "high", then
    d (1.3 loss) / d image_feat, with the settings in env."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [t.to(dtype) for t in (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue,
                                  x.text_queue)]
    a = args[0].clone().requires_grad_()
    out = albef_fast.itc_loss(a, *args[1:], 0.07, 0.4, idx=x.idx, idx_queue=x.idx_queue, return_details=True,
                              backend=backend, precision="high")
    return list(out) + [torch.autograd.grad(out.loss * 1.3, a)[0]]


def _scaled_inputs(case: str):
    """B = 7, Q = 41, D = 24 (16-key tiles: tile 0 the in-batch keys, tiles 1-3 the queue's)."""
    x = make_inputs(7, 41, 24, torch.float32, DEVICE, retrieval=True)
    if case == "huge":  # every tile outside: queues 2^30 larger, features 2^30 smaller
        for name in ("image_feat", "text_feat", "image_feat_m", "text_feat_m"):
            setattr(x, name, getattr(x, name) * 2.0 ** -30)
        x.image_queue, x.text_queue = x.image_queue * 2.0 ** 30, x.text_queue * 2.0 ** 30
    elif case == "one-tile":  # queue tile 2 (keys 16-31) 2^-20 smaller: one split's tiles again
        x.text_queue = x.text_queue.clone()
        x.text_queue[:, 16:32] *= 2.0 ** -20
    return x


# the first pass over "huge" tiles converts them to fp16 infinities and computes with them (numpy's
# warnings under the interpreter) before the split streams its keys again: its values are dropped
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("config", ["16,16,32,1,0,1", "16,16,16,0,0,1", "16,16,32,1,1,1", "16,16,32,0,0,1,2,0,1"])
@pytest.mark.parametrize("case", ["normalized", "huge", "one-tile"])
def test_keys_as_is_gives_the_same_bits(monkeypatch, config, case):
    """ALBEF_FAST_KEYS_AS_IS=1 changes when each key tile's scale is known, not the scale: every
    output bit for bit as with it off, whether every tile is in the band (one pass), none is
    (every split streams its keys again) or one is not (that split only). KIND_AXIS, D blocks
    (16 of 24), KT_LOAD, transposed logits; retrieval targets."""
    x = _scaled_inputs(case)
    env = {"ALBEF_FAST_SPLITS": "3", "ALBEF_FAST_CONFIG": config, "ALBEF_FAST_TF32": "f16s"}
    plain = _outputs(monkeypatch, x, dict(env, ALBEF_FAST_KEYS_AS_IS="0"))
    as_is = _outputs(monkeypatch, x, dict(env, ALBEF_FAST_KEYS_AS_IS="1"))
    assert torch.isfinite(plain[-1]).all() and plain[-1].abs().max() > 0
    for got, expected in zip(as_is, plain):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("case", ["normalized", "one-tile"])
def test_unscaled_key_tiles_keep_tf32s_error(monkeypatch, case):
    """Tiles in the band enter unscaled, so their elements below 2^-14 are fp16 subnormals
    (absolute error <= 2^-25). The outputs stay as close to fp64 as TF32-rounded products are
    (ALBEF_FAST_TF32=tf32rn: every element with 11 significant bits), within twice its error."""
    x = _scaled_inputs(case)
    env = {"ALBEF_FAST_SPLITS": "3", "ALBEF_FAST_CONFIG": "16,16,32,1,0,1"}
    f16s = _outputs(monkeypatch, x, dict(env, ALBEF_FAST_TF32="f16s"))
    tf32 = _outputs(monkeypatch, x, dict(env, ALBEF_FAST_TF32="tf32rn"))
    exact = _outputs(monkeypatch, x, {}, "torch", torch.float64)
    for got, ref, e in zip(f16s, tf32, exact):
        assert max_err(got, e) <= 2 * max_err(ref, e) + 1e-6 * max(1.0, e.abs().max().item())


def test_keys_as_is_is_off_by_default_and_only_for_f16s(monkeypatch):
    monkeypatch.delenv("ALBEF_FAST_KEYS_AS_IS", raising=False)
    assert itc._keys_as_is("f16s") is False
    monkeypatch.setenv("ALBEF_FAST_KEYS_AS_IS", "1")
    assert itc._keys_as_is("f16s") is True
    assert itc._keys_as_is("f16x3") is False and itc._keys_as_is("ieee") is False



@pytest.mark.skipif(DEVICE == "cuda", reason="a compiled kernel keeps the globals it was compiled with")
@pytest.mark.skipif("can_reorder" not in inspect.signature(tl.reshape).parameters,
                    reason="this Triton has no reorderable reshape (3.10 on): only the plain form runs")
@pytest.mark.filterwarnings("ignore:tl.reshape\\(can_reorder=True\\) is deprecated:UserWarning")  # 3.9
@pytest.mark.parametrize("precision", ["high", "highest"])  # f16s, f16x3: the modes that take _tile_amax
@pytest.mark.parametrize("case", ["normalized", "huge"])
def test_tile_amax_forms_give_the_same_bits(monkeypatch, precision, case):
    """_tile_amax's two forms, the reorderable reshape (Triton before 3.9) and the plain reduction
    (3.9 on), give every output bit for bit: each runs here whatever Triton is installed. Each
    key tile's max picks its power-of-two scale (for "huge" tiles) or whether it is scaled at all
    ("normalized"): a max 2^8 too small fails every case here (tried)."""
    x = _scaled_inputs(case)
    monkeypatch.setenv("ALBEF_FAST_SPLITS", "3")
    monkeypatch.setenv("ALBEF_FAST_CONFIG", "16,16,32,1,0,1")
    args = (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue)
    runs = []
    for tree in (False, True):
        monkeypatch.setattr(itc_operands, "_TREE_REDUCTIONS", tl.constexpr(tree))
        a = args[0].clone().requires_grad_()
        out = albef_fast.itc_loss(a, *args[1:], 0.07, 0.4, idx=x.idx, idx_queue=x.idx_queue, return_details=True,
                                  backend="triton", precision=precision)
        runs.append(list(out) + [torch.autograd.grad(out.loss * 1.3, a)[0]])
    assert torch.isfinite(runs[0][-1]).all() and runs[0][-1].abs().max() > 0
    for reshaped, plain in zip(*runs):
        assert torch.equal(reshaped, plain)
