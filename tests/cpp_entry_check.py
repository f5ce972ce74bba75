"""itc_loss's usual call in C++ (csrc/itc_entry.cpp) against the Python path, with no GPU.

    python tests/cpp_entry_check.py   ->  one JSON line: {"variations": V, "declined": N}

Set up as tests/cpp_launch_check.py (a fake driver compiling for sm_90, CPU tensors whose C++
launches the extension records). For each call: with the entry off, the Python path (after its
first call, through the C++ step) gives the expected launches; with it on, the call must first
miss (the Python path runs and teaches the entry its plan), then hit (no Python path) with the
same launches: the same inputs in the same places, the same ints and floats. Every part of the
key is varied once; calls of another form, and invalid calls sharing a learned key, must never
hit, and the invalid ones still raise the Python path's named errors; torch.compile traces past
the entry; ITCLoss steps go through it. Run by
tests/test_cpp_launch.py in a child process.
"""
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["ALBEF_FAST_BACKEND"] = "triton"  # CPU tensors: the automatic choice would be "torch"
from tests import cpp_launch_check as base  # noqa: E402  (fake driver, ALBEF_FAST_LAUNCH=cpp)

import albef_fast  # noqa: E402
from albef_fast import functional  # noqa: E402
from albef_fast.kernels import cpp_launch  # noqa: E402

EXT = base.EXT
ENTRY = functional.CPP_ENTRY
SLOW_CALLS = []  # one per itc_loss call that ran the Python path
_apply = functional.itc_apply


def _counted_apply(*inputs):
    SLOW_CALLS.append(1)
    return _apply(*inputs)


functional.itc_apply = _counted_apply


def _recorded(call, inputs):
    """Run call(); its C++ launches, every pointer labelled as input k of `inputs` or the k-th other
    pointer of the call (the workspace's and the outputs', in their order of first use)."""
    EXT.itc_take_recorded()
    result = call()
    known = {t.data_ptr(): k for k, t in enumerate(inputs) if isinstance(t, torch.Tensor)}
    fresh = {}
    launches = []
    for function, grid, threads, shared, values in EXT.itc_take_recorded():
        params = []
        for v in values:
            if isinstance(v, int) and v > 2 ** 32:
                v = ("in", known[v]) if v in known else ("new", fresh.setdefault(v, len(fresh)))
            params.append(v)
        launches.append((function, tuple(grid), threads, shared, params))
    return result, launches


def _slow(args, kwargs):
    """The launches of the call through the Python path (its C++ step), the entry off."""
    functional.CPP_ENTRY = None
    try:
        albef_fast.itc_loss(*args, **kwargs)  # the plan recorded, if new
        _, launches = _recorded(lambda: albef_fast.itc_loss(*args, **kwargs), args)
    finally:
        functional.CPP_ENTRY = ENTRY
    assert launches, "the Python path did not take the C++ step"
    return launches


def _hit(args, kwargs, learned=False):
    """The call misses first (unless its key was learned), is learned, then hits with the Python
    path's launches. Returns the hit's result."""
    expected = _slow(args, kwargs)
    if not learned:
        del SLOW_CALLS[:]
        albef_fast.itc_loss(*args, **kwargs)
        assert SLOW_CALLS == [1], "a new key hit before it was learned"
    del SLOW_CALLS[:]
    result, got = _recorded(lambda: albef_fast.itc_loss(*args, **kwargs), args)
    assert SLOW_CALLS == [], "a learned call took the Python path"
    assert got == expected, (kwargs, expected, got)
    return result


def _usual(dtype=torch.bfloat16, temp_kind="tensor", b=8, q=40, d=32):
    feats, queues, temp, _, _ = base._inputs(b, q, d, dtype, 0, False, temp_kind)
    return [*feats, *queues, temp, 0.4]


def _check_variations():
    """Each part of the key, changed alone, is a new key: a miss, then its own plan's launches."""
    args = _usual()
    _hit(args, {})
    result = _hit(args, {"return_details": True})
    assert isinstance(result, albef_fast.ITCOutput) and result.loss.requires_grad
    assert not result.sim_i2t_batch.requires_grad and not result.kl_t2i.requires_grad
    _hit(args[:7] + [0.0], {})  # alpha 0: no teacher
    _hit(args[:7] + [0.25], {}, learned=True)  # another alpha, same key: its value reaches the kernels
    _hit(args[:6] + [0.05, 0.4], {})  # a float temperature
    _hit(args[:6] + [0.09, 0.4], {}, learned=True)
    with torch.no_grad():
        _hit(args, {})
    _hit(args, {"backend": "triton"})
    _hit(args, {"precision": "medium"})
    _hit(_usual(b=5, q=33, d=24), {})  # shapes
    _hit(_usual(dtype=torch.float32), {"precision": "high"})
    ids = {"idx": torch.arange(8) % 3, "idx_queue": (torch.arange(40) % 3).view(1, 40)}  # ALBEF's [1, Q] queue
    _hit(args, ids)
    _hit(args, {"idx": ids["idx"].view(8, 1).int(), "idx_queue": ids["idx_queue"]})  # [B, 1] int32
    fp32 = _usual(dtype=torch.float32)
    before = torch.get_float32_matmul_precision()
    for precision in ("high", "highest"):
        torch.set_float32_matmul_precision(precision)
        try:
            _hit(fp32, {})
        finally:
            torch.set_float32_matmul_precision(before)
    os.environ["ALBEF_FAST_WAVES"] = "2"
    try:
        _hit(args, {})
    finally:
        del os.environ["ALBEF_FAST_WAVES"]
    _hit(args, {}, learned=True)  # the first key again
    return 17 + _check_per_backend_precision(fp32)


def _check_per_backend_precision(fp32) -> int:
    """torch.backends.cuda.matmul.fp32_precision = "tf32" alone (torch 2.9 on), where torch's legacy
    getter raises: its own key from 2.13 (the setting read by enum), no key before (declined)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return 0
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13):
            _hit(fp32, {})
        else:
            _never_hits(fp32, {})
        matmul.fp32_precision = "ieee"  # the legacy level "highest" agrees: the "highest" key of before
        _hit(fp32, {}, learned=True)
    finally:
        matmul.fp32_precision = saved
    return 2


def _check_backward():
    """A hit's loss backpropagates with the C++ step's one launch."""
    args = _usual()
    loss = _hit(args, {}, learned=True)  # the key of _check_variations' first call
    EXT.itc_take_recorded()
    loss.backward()
    assert len(EXT.itc_take_recorded()) == 1
    assert args[0].grad is not None and args[1].grad is not None and args[6].grad is not None


def _never_hits(args, kwargs, error=None):
    """Three calls, none through the entry; with `error`, each raises it (type, words)."""
    for _ in range(3):
        del SLOW_CALLS[:]
        try:
            albef_fast.itc_loss(*args, **kwargs)
            assert error is None, f"{kwargs} did not raise"
        except (TypeError, ValueError) as err:
            assert error is not None and isinstance(err, error[0]) and error[1] in str(err), err
        assert SLOW_CALLS == [1] or error is not None, kwargs


def _check_declined():
    """Other forms take the Python path every time; invalid calls whose key was learned still
    raise the Python path's errors."""
    args = _usual()
    _hit(args, {}, learned=True)
    feats_t = [f.t().contiguous().t() for f in args[:4]]  # column-major features
    cases = [
        (feats_t + args[4:], {}, None),
        (args[:7] + [0], {}, None),  # an int alpha
        (args, {"idx": torch.arange(8) % 2 == 0, "idx_queue": torch.arange(40) % 2 == 0}, None),  # bool ids
        (args, {"idx": torch.arange(8).view(2, 4), "idx_queue": torch.arange(40)}, (ValueError, "idx")),
        (args, {"idx": torch.arange(8)}, (ValueError, "idx_queue")),
        (args, {"idx": torch.arange(7), "idx_queue": torch.arange(40)}, (ValueError, "idx")),
        (args, {"idx": torch.arange(8.0), "idx_queue": torch.arange(40)}, (TypeError, "idx")),
        (args, {"backend": "torch"}, None),
        (args[:6] + [-0.07, 0.4], {}, (ValueError, "temp")),
        (args[:6] + [torch.tensor(-0.07), 0.4], {}, (ValueError, "temp")),
        (args[:7] + [1.5], {}, (ValueError, "alpha")),
        (args[:1] + [args[1][:4]] + args[2:], {}, (ValueError, "text_feat")),
        (args[:5] + [args[5].float()] + args[6:], {}, (TypeError, "text_queue")),
        (args, {"precision": "fp8"}, (ValueError, "precision")),
        (args, {"backend": "cuda"}, (ValueError, "backend")),
    ]
    for case_args, kwargs, error in cases:
        _never_hits(case_args, kwargs, error)
    return len(cases)


def _check_keys_that_require_grad():
    """A key (momentum features, queue) that requires grad gets none: with grad mode on, every such
    call takes the Python path, which warns; under no_grad it is the usual call (it hits)."""
    args = _usual()
    _hit(args, {}, learned=True)
    for k in range(2, 6):
        keyed = list(args)
        keyed[k] = args[k].detach().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _never_hits(keyed, {})
        named = [str(w.message).split(" require")[0] for w in caught]
        assert named == [f"itc_loss: {functional._KEY_NAMES[k - 2]}"] * 3, named
        with torch.no_grad():
            _hit(keyed, {}, learned=True)  # the no_grad key of _check_variations


def _check_compile():
    """torch.compile(fullgraph=True) traces itc_loss past the entry (the registered op, as before)."""
    args = _usual()
    _hit(args, {}, learned=True)
    compiled = torch.compile(lambda *a: albef_fast.itc_loss(*a), fullgraph=True, backend="eager")
    del SLOW_CALLS[:]
    assert compiled(*args).shape == () and SLOW_CALLS == [1]


def _check_module():
    """ITCLoss (return_details, its [1, Q] idx_queue with use_idx): from the third step on, the
    entry takes the whole loss; the queues change in place between steps, the key does not."""
    for use_idx in (False, True):
        module = albef_fast.ITCLoss(embed_dim=32, queue_size=40, use_idx=use_idx)
        slow = []
        for _ in range(4):
            feats = [torch.randn(8, 32).requires_grad_(k < 2) for k in range(4)]
            del SLOW_CALLS[:]
            out = module(*feats, idx=torch.arange(8) % 3 if use_idx else None)
            slow.append(len(SLOW_CALLS))
            out.loss.backward()
        assert slow == [1, 1, 0, 0] and module.temp.grad is not None, (use_idx, slow)


def _check_forget():
    """Dropping the plans drops what the entry learned: the next call takes the Python path."""
    args = _usual()
    _hit(args, {}, learned=True)
    cpp_launch.forget()
    base.itc._PLANS.clear()
    del SLOW_CALLS[:]
    albef_fast.itc_loss(*args)
    assert SLOW_CALLS == [1]


def main():
    assert ENTRY is not None and ENTRY is EXT.itc_loss_entry
    variations = _check_variations()
    _check_backward()
    declined = _check_declined()
    _check_keys_that_require_grad()
    _check_compile()
    _check_module()
    _check_forget()
    print(json.dumps({"variations": variations, "declined": declined}))


if __name__ == "__main__":
    main()
