"""The C++ step (csrc/itc_launch.cpp, kernels/cpp_launch.py) against the Python path, with no GPU.

    python tests/cpp_launch_check.py   ->  one JSON line: {"cases": N, "registered": R, ...}

A fake Triton driver compiles the kernels for sm_90 for real (their signatures and PTX are
Triton's) and records each Python-path launch; with CPU tensors the C++ step records the
parameters it resolved instead of launching. For each case the first call registers its plan;
then the same inputs go once through the Python path and once through the C++ step, and each
launch's parameters must agree: every pointer the same input, output or workspace offset of its
own call, every int and float the same (the floats as fp32), the same grid, block and shared
memory. The backward's one launch, the aten backward (direction losses), and the fall-backs
(misaligned inputs, f16p's chunked launches) are checked too. Run by tests/test_cpp_launch.py
in a child process with ALBEF_FAST_LAUNCH=cpp and without TRITON_INTERPRET.
"""
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.pop("TRITON_INTERPRET", None)
os.environ["ALBEF_FAST_LAUNCH"] = "cpp"
from tests import fake_driver  # noqa: E402

fake_driver.install()

import albef_fast  # noqa: E402
from albef_fast import _extension, functional  # noqa: E402

functional._interpreting = lambda: True  # lets CPU tensors take the "triton" backend
from albef_fast.kernels import cpp_launch, itc  # noqa: E402

EXT = _extension._EXT


def _fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _inputs(b, q, d, dtype, offset, retrieval, temp_kind):
    """Features [B, D] starting `offset` elements into their storage (misaligned if odd), [D, Q] queues."""
    g = torch.Generator().manual_seed(b * 1000 + q)
    feats = [torch.randn(b * d + offset, generator=g).to(dtype)[offset:].view(b, d) for _ in range(4)]
    feats[0].requires_grad_(True)
    feats[1].requires_grad_(True)
    queues = [torch.randn(q, d, generator=g).to(dtype).t() for _ in range(2)]  # ALBEF's [D, Q] views
    temp = torch.tensor(0.07, requires_grad=True) if temp_kind == "tensor" else 0.07
    idx = torch.arange(b) % 3 if retrieval else None
    idx_queue = torch.arange(q) % 3 if retrieval else None
    return feats, queues, temp, idx, idx_queue


def _op_args(feats, queues, temp, idx, idx_queue, details=False):
    temp_t = temp if isinstance(temp, torch.Tensor) else None
    temp_v = 0.0 if temp_t is not None else float(temp)
    return (*feats, *queues, temp_t, temp_v, 0.4, idx, idx_queue, details, True, "triton", "high")


def _labeler(tensors, outputs, ws_base, ws_bytes):
    def label(ptr):
        for k, t in enumerate(tensors):
            if t is not None and t.data_ptr() == ptr:
                return ("in", k)
        for k, t in enumerate(outputs):
            if t is not None and t.data_ptr() == ptr:
                return ("out", k)
        if ws_base <= ptr < ws_base + ws_bytes:
            return ("ws", ptr - ws_base)
        return ("?", ptr)
    return label


def _kernels_by_launcher():
    """id of a compiled kernel's (fake) launcher -> the CompiledKernel."""
    from albef_fast.kernels import itc_backward
    found = {}
    for launcher in (*itc._LAUNCH.values(), itc_backward._LAUNCH):
        for entry in launcher._kernels.values():
            found[id(entry[0])] = entry[3]
    return found


def _python_launches(prologue, args):
    """The Python path's launches of one call: [(grid, warps, shared, labelled non-constexpr args)]."""
    key, feats, image_queue, text_queue, temp_t, idx_v, idq_v = prologue
    plan = itc._PLANS[key]
    fake_driver.CALLS.clear()
    ws, outputs = itc._launch(plan, feats, image_queue, text_queue, args[7] if temp_t is None else temp_t, temp_t,
                              0.4, idx_v, idq_v, keep=True)
    inputs = (*feats, image_queue, text_queue, temp_t, idx_v, idq_v)
    label = _labeler(inputs, outputs, ws.max.data_ptr(), 4 * sum(plan.ws_shapes))
    kernels = _kernels_by_launcher()
    launches = []
    for launcher_id, _, grid, _, values in fake_driver.CALLS:
        kernel = kernels[launcher_id]
        signature = kernel.src.signature
        names = list(signature)
        params = []
        for name, value in zip(names, values):
            kind = signature[name]
            if kind == "constexpr":
                continue
            if kind.startswith("*"):
                params.append(label(value[0]))
            elif kind == "fp32":
                params.append(_fp32(value))
            else:
                params.append(value)
        launches.append((tuple(grid), 32 * kernel.metadata.num_warps, kernel.metadata.shared, params + [0, 0]))
    return launches


def _cpp_launches(prologue, args):
    """The C++ step's launches of one call, labelled as _python_launches labels."""
    key, feats, image_queue, text_queue, temp_t, idx_v, idq_v = prologue
    EXT.itc_take_recorded()
    outputs = cpp_launch.step(args)
    assert outputs is not None, "the registered plan's C++ step declined aligned inputs"
    recorded = EXT.itc_take_recorded()
    inputs = (*feats, image_queue, text_queue, temp_t, idx_v, idq_v)
    plan = itc._PLANS[key]
    known = {t.data_ptr() for t in (*inputs, *outputs) if t is not None}
    pointers = [v for r in recorded for v in r[4] if isinstance(v, int) and v > 2 ** 32 and v not in known]
    label = _labeler(inputs, outputs, min(pointers), 4 * sum(plan.ws_shapes))
    launches = []
    for function, grid, threads, shared, values in recorded:
        params = [label(v) if isinstance(v, int) and v > 2 ** 32 else v for v in values]
        launches.append((tuple(grid), threads, shared, params))
    return launches, outputs


def _check_case(case):
    b, q, d, dtype, offset, retrieval, temp_kind = case
    feats, queues, temp, idx, idx_queue = _inputs(b, q, d, dtype, offset, retrieval, temp_kind)
    args = _op_args(feats, queues, temp, idx, idx_queue)
    albef_fast.itc_loss(*feats, *queues, temp, 0.4, idx=idx, idx_queue=idx_queue, backend="triton",
                        precision="high").backward()  # compiles, records and registers the plan
    t = temp if isinstance(temp, torch.Tensor) else float(temp)
    prologue = itc.prologue(*feats, *queues, t, 0.4, idx, idx_queue, False, True, "high")
    plan = itc._PLANS[prologue[0]]
    assert plan.cpp is not None and plan.cpp >= 0, (case, plan.cpp_reason)
    expected = _python_launches(prologue, args)
    got, outputs = _cpp_launches(prologue, args)
    launches = 3 if os.environ.get("ALBEF_FAST_FINISH") == "kernel" else 2  # split, merge (, finish)
    assert len(expected) == launches and got == expected, (case, expected, got)
    _check_outputs_are_tensors_of_their_own(outputs)
    _check_backward(outputs, feats, temp)
    return len(got)


def _check_outputs_are_tensors_of_their_own(tensors):
    """The step packs its outputs (and the backward its gradients) into shared allocations
    (csrc/packed.h): each must still behave as a tensor of its own, 16-byte aligned for the
    kernels, and the loss must not hold the gradients' memory."""
    spans = []
    for t in tensors:
        assert t._base is None and t.is_contiguous() and t.data_ptr() % 16 == 0, (t.shape, t.data_ptr())
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans  # no overlap
    if len(tensors) == 8:
        assert tensors[0].untyped_storage().nbytes() <= 80  # the scalars alone
        logged = tensors[0].detach()
        logged.add_(1.0)  # in place on a piece: allowed, and its neighbours' versions stay
        assert tensors[1]._version == 0


def _check_backward(outputs, feats, temp):
    """loss.backward(): one scale launch on the saved gradients; direction losses: the aten products.
    Only the losses are differentiable (the rest come back beside the C++ autograd Function)."""
    assert [t.requires_grad for t in outputs] == [True, True] + [False] * 6
    b, d = feats[0].shape
    EXT.itc_take_recorded()
    g = torch.full((), -2.0, dtype=torch.float32)
    torch.autograd.backward(outputs[0], g)
    (launch,) = EXT.itc_take_recorded()
    values = launch[4]
    saved = [t.data_ptr() for t in outputs[2:5]]
    assert values[:4] == saved + [g.data_ptr()], (values, saved)
    fresh = values[4:7] if isinstance(temp, torch.Tensor) else values[4:6]  # without T: out_temp is unused
    assert len(set(fresh)) == len(fresh) and not set(fresh) & set(saved), values
    assert isinstance(temp, torch.Tensor) or values[6] == saved[0], values  # (a stand-in pointer)
    assert values[7:] == [b * d, 0, 0], values
    _check_outputs_are_tensors_of_their_own([f.grad for f in feats[:2]])
    for f in feats[:2]:
        assert f.grad.shape == f.shape and f.grad.dtype == f.dtype
        f.grad = None
    _check_aten_backward(feats, temp)


def _check_aten_backward(feats, temp):
    """g_losses given: the aten products of itc_op._backward, no launch."""
    d, dtype = feats[0].shape[1], feats[0].dtype
    args = _op_args(feats, [torch.zeros(d, 3, dtype=dtype), torch.ones(d, 3, dtype=dtype)], temp, None, None)
    prologue = itc.prologue(*args[:6], args[6] if args[6] is not None else args[7], 0.4, None, None, False, True,
                            "high")
    if itc._PLANS.get(prologue[0]) is None or itc._PLANS[prologue[0]].cpp is None:
        itc.itc_triton(*args[:6], args[6] if args[6] is not None else args[7], 0.4, None, None, False, True, "high")
    outputs = cpp_launch.step(args)
    values = [torch.randn(o.shape, generator=torch.Generator().manual_seed(k)).to(o.dtype)
              for k, o in enumerate(outputs[2:6])]
    for out, value in zip(outputs[2:6], values):
        out.data.copy_(value)  # the saved gradients (nothing ran on the CPU): known values
    EXT.itc_take_recorded()
    g_losses = torch.tensor([0.5, -1.5], dtype=torch.float32)
    inputs = [feats[0], feats[1]] + ([temp] if isinstance(temp, torch.Tensor) else [])
    grads = torch.autograd.grad(outputs[1], inputs, g_losses, retain_graph=True)
    assert EXT.itc_take_recorded() == []
    assert torch.equal(grads[0], values[0] * (g_losses[0] * 2)) and torch.equal(grads[1], values[1] * (g_losses[1] * 2))
    if len(grads) == 3:
        assert torch.equal(grads[2], torch.dot(values[3], g_losses).to(temp.dtype))
    _check_second_order(outputs[1], inputs, g_losses, grads)
    outputs = cpp_launch.step(args)  # the mean loss: the backward a plain call gives one launch
    for out, value in zip(outputs[2:6], values):
        out.data.copy_(value)
    EXT.itc_take_recorded()
    g = torch.tensor(-0.75, dtype=torch.float32)  # the fp32 loss's grad_output, whatever the default dtype
    grads = [values[0] * g, values[1] * g] + ([(values[2] * g).to(temp.dtype)] if len(inputs) == 3 else [])
    _check_second_order(outputs[0], inputs, g, grads)


def _check_second_order(loss, inputs, g, grads):
    """create_graph=True: the aten products, the same values, recorded; d / d grad_output exact
    (the gradients are linear in it: d_g . g gives them back); a backward through the gradients
    to the features or T raises (itc_launch.cpp: no_second_order)."""
    w = g.clone().requires_grad_()
    graphed = torch.autograd.grad(loss, inputs, w, create_graph=True)
    assert EXT.itc_take_recorded() == []
    assert all(x.requires_grad and torch.equal(x, e) for x, e in zip(graphed, grads)), (graphed, grads)
    (d_w,) = torch.autograd.grad(graphed[0].sum(), w, retain_graph=True)
    loose = {} if graphed[0].dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}  # bf16 sums
    torch.testing.assert_close((d_w * w).sum(), graphed[0].float().sum(), **loose)
    for g in graphed:
        try:
            torch.autograd.grad(g.sum(), inputs, retain_graph=True)
        except RuntimeError as err:
            assert "second order" in str(err), err
        else:
            raise AssertionError("a backward through the gradient to the features did not raise")


def _check_fallbacks():
    """Misaligned features after an aligned plan: the Python path (and no C++ launch); a failed
    recording; f16p's chunked launches: never registered."""
    feats, queues, temp, _, _ = _inputs(8, 40, 32, torch.bfloat16, 0, False, "tensor")
    albef_fast.itc_loss(*feats, *queues, temp, 0.4, backend="triton")
    moved, _, _, _, _ = _inputs(8, 40, 32, torch.bfloat16, 1, False, "tensor")
    EXT.itc_take_recorded()
    fake_driver.CALLS.clear()
    albef_fast.itc_loss(*moved, *queues, temp, 0.4, backend="triton")
    assert EXT.itc_take_recorded() == [] and len(fake_driver.CALLS) == 2
    _check_failed_recording()
    os.environ["ALBEF_FAST_TF32"] = "f16p"
    try:
        feats, queues, temp, _, _ = _inputs(5, 33, 24, torch.float32, 0, False, "tensor")
        albef_fast.itc_loss(*feats, *queues, temp, 0.4, backend="triton", precision="high")
        key = itc.prologue(*feats, *queues, temp, 0.4, None, None, False, True, "high")[0]
        assert itc._PLANS[key].cpp == -1 and "chunked" in itc._PLANS[key].cpp_reason
    finally:
        del os.environ["ALBEF_FAST_TF32"]


def _check_failed_recording():
    """An unexpected error while recording (say, another Triton's metadata): a warning, the plan
    left on the Python path, the call's results returned."""
    import warnings

    spec = cpp_launch._launch_spec
    cpp_launch._launch_spec = lambda *args: (_ for _ in ()).throw(AttributeError("no signature"))
    try:
        feats, queues, temp, _, _ = _inputs(3, 9, 8, torch.float32, 0, False, "tensor")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = albef_fast.itc_loss(*feats, *queues, temp, 0.4, backend="triton", precision="high")
        key = itc.prologue(*feats, *queues, temp, 0.4, None, None, False, True, "high")[0]
        assert itc._PLANS[key].cpp == -1 and "no signature" in itc._PLANS[key].cpp_reason
        assert any("ALBEF_FAST_LAUNCH=cpp" in str(w.message) for w in caught) and loss.shape == ()
    finally:
        cpp_launch._launch_spec = spec


def main():
    assert cpp_launch.enabled() and itc.CPP is cpp_launch
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = [  # (B, Q, D, dtype, feature offset, retrieval, temp): odd shapes, both temp kinds, retrieval
        (8, 40, 32, bf16, 0, False, "tensor"), (5, 33, 24, fp32, 0, False, "float"),
        (16, 1, 32, fp32, 0, True, "tensor"), (7, 37, 40, bf16, 1, True, "float"),
    ]
    launches = sum(_check_case(case) for case in cases)
    os.environ["ALBEF_FAST_FINISH"] = "kernel"  # the finish in a launch of its own
    try:
        launches += _check_case((5, 33, 24, fp32, 0, True, "tensor"))
    finally:
        del os.environ["ALBEF_FAST_FINISH"]
    # a plan recorded and replayed under a float64 default: it runs and matches (that the Python
    # path's buffers stay fp32 there is test_itc_loss.py's test_the_default_dtype_changes_nothing)
    torch.set_default_dtype(torch.float64)
    try:
        launches += _check_case((6, 29, 24, fp32, 0, False, "tensor"))
    finally:
        torch.set_default_dtype(torch.float32)
    _check_fallbacks()
    print(json.dumps({"cases": len(cases) + 2, "launches": launches}))


if __name__ == "__main__":
    main()
