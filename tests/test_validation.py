"""Bad input raises a ValueError / TypeError that names the argument, before any state changes."""
import pytest
import torch

import albef_fast
from albef_fast import _extension
from tests.helpers import make_inputs, use_state_ops


def _kw(x, **over):
    kw = dict(image_feat=x.image_feat, text_feat=x.text_feat, image_feat_m=x.image_feat_m,
              text_feat_m=x.text_feat_m, image_queue=x.image_queue, text_queue=x.text_queue, temp=0.07,
              alpha=0.4, idx=x.idx, idx_queue=x.idx_queue)
    kw.update(over)
    return kw


x0 = make_inputs(5, 37, 24)
xr = make_inputs(5, 37, 24, retrieval=True)

CASES = [
    ("text_feat", dict(text_feat=torch.randn(5, 23)), ValueError),
    ("image_feat_m", dict(image_feat_m=torch.randn(4, 24)), ValueError),
    ("text_feat_m", dict(text_feat_m=torch.randn(6, 24)), ValueError),
    ("image_feat", dict(image_feat=torch.randn(5, 24, 1)), ValueError),
    ("image_feat", dict(image_feat=[[0.0]]), TypeError),
    ("image_feat", dict(image_feat=torch.ones(5, 24, dtype=torch.long)), TypeError),
    ("image_queue", dict(image_queue=torch.randn(37, 24)), ValueError),
    ("text_queue", dict(text_queue=torch.randn(24, 36)), ValueError),
    ("text_queue", dict(text_queue=torch.randn(24)), ValueError),
    ("alpha", dict(alpha=1.5), ValueError),
    ("alpha", dict(alpha=-0.1), ValueError),
    ("alpha", dict(alpha="0.4"), TypeError),
    ("temp", dict(temp=0.0), ValueError),
    ("temp", dict(temp=-0.07), ValueError),
    ("temp", dict(temp=torch.tensor(-0.07)), ValueError),
    ("temp: expected a positive temperature", dict(temp=torch.tensor(0.0)), ValueError),
    ("temp: expected a 0-dim \\(or \\[1\\]\\)", dict(temp=torch.tensor([0.07, 0.07])), ValueError),
    ("temp", dict(temp=torch.tensor([[0.07]])), ValueError),
    ("temp: expected a positive temperature", dict(temp=torch.tensor([0.0])), ValueError),
    ("temp", dict(temp="hot"), TypeError),
    ("^idx_queue: required with idx", dict(idx=torch.arange(5)), ValueError),
    ("^idx: required with idx_queue", dict(idx_queue=torch.zeros(37, dtype=torch.long)), ValueError),
    ("idx", dict(idx=torch.arange(5).view(5, 1, 1), idx_queue=torch.zeros(37, dtype=torch.long)), ValueError),
    ("idx_queue", dict(idx=torch.arange(5), idx_queue=torch.zeros(1, 37, 1, dtype=torch.long)), ValueError),
    ("idx", dict(idx=torch.arange(4), idx_queue=torch.zeros(37, dtype=torch.long)), ValueError),
    ("idx", dict(idx=torch.ones(5), idx_queue=torch.zeros(37, dtype=torch.long)), TypeError),
    ("idx_queue", dict(idx=torch.arange(5), idx_queue=torch.zeros(36, dtype=torch.long)), ValueError),
    ("idx_queue", dict(idx=torch.arange(5), idx_queue=torch.zeros(37, 1, dtype=torch.long)), ValueError),
    ("image_queue", dict(image_queue=torch.randn(24, 37, device="meta")), ValueError),
    ("text_feat_m", dict(text_feat_m=torch.randn(5, 24, dtype=torch.float64)), TypeError),
    ("text_queue", dict(text_queue=torch.randn(24, 37).bfloat16()), TypeError),
    ("backend", dict(backend="cuda"), ValueError),
    ("precision", dict(precision="fp8"), ValueError),
    # dtypes no path has kernels for (the torch path raised torch's own error, the Triton path ran)
    ("^image_feat: expected a floating-point dtype", dict(image_feat=torch.randn(5, 24).to(torch.float8_e4m3fn)),
     TypeError),
    ("image_queue", dict(image_queue=torch.randn(24, 37).to(torch.float8_e5m2),
                         text_queue=torch.randn(24, 37).to(torch.float8_e5m2)), TypeError),
    ("temp", dict(temp=torch.tensor(0.07).to(torch.float8_e4m3fn)), ValueError),
    ("idx", dict(idx=torch.arange(5).to(torch.complex64), idx_queue=torch.zeros(37, dtype=torch.long)), TypeError),
]


@pytest.mark.parametrize("name,over,exc", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_itc_loss_rejects(name, over, exc):
    kw = _kw(x0, **over)
    with pytest.raises(exc, match=name):
        albef_fast.itc_loss(kw.pop("image_feat"), kw.pop("text_feat"), kw.pop("image_feat_m"),
                            kw.pop("text_feat_m"), kw.pop("image_queue"), kw.pop("text_queue"),
                            kw.pop("temp"), kw.pop("alpha"), **kw)


@pytest.mark.parametrize("b,d", [(0, 24), (5, 0)])
def test_empty_features_are_rejected(b, d):
    feats = [torch.randn(b, d) for _ in range(4)]
    with pytest.raises(ValueError, match=r"image_feat: expected a non-empty \[B, D\] tensor"):
        albef_fast.itc_loss(*feats, torch.randn(d, 37), torch.randn(d, 37), 0.07)


def test_a_queue_in_the_other_layout_is_named_with_albefs():
    with pytest.raises(ValueError, match=r"image_queue: expected shape \[24, Q\] \(\[D, Q\] as ALBEF"):
        albef_fast.itc_loss(*(x0.image_feat, x0.text_feat, x0.image_feat_m, x0.text_feat_m), x0.image_queue.T,
                            x0.text_queue.T, 0.07)


def test_usual_call_takes_the_combined_check_and_bad_ones_do_not():
    """itc_inputs tries one combined test first: the usual call passes it, every case above fails
    it (and then raises from the named checks, test_itc_loss_rejects)."""
    from albef_fast._validate import _itc_usual_ok

    usual = _kw(x0, temp=torch.tensor(0.07), backend=None, precision=None)
    assert _itc_usual_ok(*usual.values()) and _itc_usual_ok(*dict(usual, temp=0.07).values())
    for _, over, _ in CASES:
        assert not _itc_usual_ok(*dict(usual, **over).values()), over


def test_error_message_gives_expected_and_received():
    with pytest.raises(ValueError) as err:
        albef_fast.itc_loss(x0.image_feat, x0.text_feat, torch.randn(4, 24), x0.text_feat_m, x0.image_queue,
                            x0.text_queue, 0.07)
    assert "[5, 24]" in str(err.value) and "[4, 24]" in str(err.value)


def _queues():
    return [torch.randn(4, 10), torch.randn(3, 10), torch.zeros(1, 10, dtype=torch.long)]


ENQUEUE_CASES = [
    ("items", lambda q: [torch.randn(11, 4), torch.randn(11, 3), torch.zeros(11, 1, dtype=torch.long)], None),
    ("items", lambda q: [torch.randn(2, 4), torch.randn(2, 3)], None),
    ("items\\[1\\]", lambda q: [torch.randn(2, 4), torch.randn(2, 5), torch.zeros(2, 1, dtype=torch.long)], None),
    ("items\\[1\\]", lambda q: [torch.randn(2, 4), torch.randn(3, 3), torch.zeros(2, 1, dtype=torch.long)], None),
    ("items\\[2\\]", lambda q: [torch.randn(2, 4), torch.randn(2, 3), torch.zeros(2, 1)], None),
    ("ptr", None, torch.tensor([0], dtype=torch.int32)),
    ("ptr", None, torch.tensor([0, 1])),
    ("ptr", None, 0),
    ("ptr", None, torch.tensor([0], device="meta")),
]


@pytest.mark.parametrize("name,items_fn,ptr", ENQUEUE_CASES)
def test_enqueue_rejects_and_changes_nothing(name, items_fn, ptr):
    queues = _queues()
    before = [q.clone() for q in queues]
    items = items_fn(queues) if items_fn else [torch.randn(2, 4), torch.randn(2, 3), torch.ones(2, 1, dtype=torch.long)]
    ptr = torch.tensor([3]) if ptr is None else ptr
    ptr_before = ptr.clone() if torch.is_tensor(ptr) and ptr.device.type == "cpu" else None
    with pytest.raises((ValueError, TypeError), match=name):
        albef_fast.enqueue_(queues, items, ptr)
    assert all(torch.equal(q, b) for q, b in zip(queues, before))
    if ptr_before is not None:
        assert torch.equal(ptr, ptr_before)


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.complex64, torch.float8_e4m3fn])
def test_enqueue_rejects_a_dtype_without_kernels_before_any_write(monkeypatch, ops, dtype):
    """The queues and items the CUDA op writes (float32, bfloat16, float16, float64, int64, int32),
    on every device: the CPU op wrote the queues before the failing one, then raised its dispatch
    error (bool, complex, float8), and took int8 where CUDA does not."""
    use_state_ops(monkeypatch, ops)
    queue, odd, ptr = torch.zeros(4, 10), torch.zeros(1, 10, dtype=dtype), torch.tensor([3])
    with pytest.raises(TypeError, match=r"queues\[1\]: expected dtype float32, .* or int32, got"):
        albef_fast.enqueue_([queue, odd], [torch.ones(2, 4), torch.ones(2, 1, dtype=dtype)], ptr)
    with pytest.raises(TypeError, match=r"items\[0\]: expected dtype"):
        albef_fast.enqueue_([queue], [torch.ones(2, 4).to(torch.float8_e4m3fn)], ptr)
    assert not queue.any() and ptr.tolist() == [3]


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
def test_ema_rejects_a_dtype_without_kernels_before_any_write(monkeypatch, ops):
    """A float8 pair after an fp32 one: both implementations updated the first, then raised."""
    use_state_ops(monkeypatch, ops)
    first, odd = torch.zeros(3), torch.zeros(2).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"params_m\[1\]: expected a floating-point dtype \(float32, "):
        albef_fast.ema_update_([first, odd], [torch.ones(3), torch.ones(2).to(odd.dtype)], 0.5)
    assert not first.any()


def test_state_ops_check_every_dtype_before_writing_when_called_directly():
    """The C++ ops' own dtype checks (csrc/checks.h), for calls that bypass the Python API."""
    if not _extension.has_ops():
        pytest.skip("C++ extension not built")
    first, odd, ptr = torch.zeros(3), torch.zeros(2).to(torch.float8_e4m3fn), torch.tensor([0])
    with pytest.raises(TypeError, match=r"params_m\[1\]: expected dtype float32"):
        torch.ops.albef_fast.ema_update_([first, odd], [torch.ones(3), torch.ones(2).to(odd.dtype)], 0.5)
    queue = torch.zeros(3, 4)
    with pytest.raises(TypeError, match=r"queues\[1\]: expected dtype float32"):
        torch.ops.albef_fast.enqueue_([queue, torch.zeros(1, 4, dtype=torch.int8)],
                                      [torch.ones(2, 3), torch.ones(2, 1, dtype=torch.int8)], ptr)
    with pytest.raises(TypeError, match=r"items\[0\]: expected dtype float32"):
        torch.ops.albef_fast.enqueue_([queue], [torch.ones(2, 3).to(torch.float8_e5m2)], ptr)
    assert not first.any() and not queue.any() and ptr.tolist() == [0]


def test_triton_backend_names_a_float64_queue():
    """float64 queues with fp32 features: the Triton path failed inside its kernels (on the CPU's
    interpreter, a bitcast error); the automatic choice takes the torch path for them."""
    from albef_fast import functional

    wide = [q.double() for q in (x0.image_queue, x0.text_queue)]
    with pytest.raises(ValueError, match=r"backend: 'triton' does not take float64 queues"):
        albef_fast.itc_loss(x0.image_feat, x0.text_feat, x0.image_feat_m, x0.text_feat_m, *wide, 0.07,
                            backend="triton")
    expected = albef_fast.itc_loss(x0.image_feat.double(), x0.text_feat.double(), x0.image_feat_m.double(),
                                   x0.text_feat_m.double(), *wide, 0.07)
    got = albef_fast.itc_loss(x0.image_feat, x0.text_feat, x0.image_feat_m, x0.text_feat_m, *wide, 0.07)
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) < 1e-5


def test_enqueue_rejects_mismatched_queue_lengths():
    queues = [torch.randn(4, 10), torch.randn(3, 9)]
    with pytest.raises(ValueError, match="queues\\[1\\]"):
        albef_fast.enqueue_(queues, [torch.randn(2, 4), torch.randn(2, 3)], torch.zeros(1, dtype=torch.long))


def test_enqueue_rejects_a_bare_tensor_and_an_empty_queue():
    queue, ptr = torch.randn(4, 10), torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match="queues, items: expected sequences"):
        albef_fast.enqueue_(queue, [torch.randn(2, 4)], ptr)
    with pytest.raises(TypeError, match="queues, items: expected sequences"):
        albef_fast.enqueue_([queue], torch.randn(2, 4), ptr)
    with pytest.raises(ValueError, match=r"queues\[0\]: expected a queue with Q >= 1"):
        albef_fast.enqueue_([torch.randn(4, 0)], [torch.randn(0, 4)], ptr)


def test_temperature_tensor_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="temp: expected a tensor on cpu"):
        albef_fast.itc_loss(*(x0.image_feat, x0.text_feat, x0.image_feat_m, x0.text_feat_m), x0.image_queue,
                            x0.text_queue, torch.tensor(0.07, device="meta"))


def test_idx_as_a_column_is_albefs_and_a_row_is_rejected():
    """ALBEF passes idx.view(-1, 1); a [1, B] row is not read as ids."""
    args = (xr.image_feat, xr.text_feat, xr.image_feat_m, xr.text_feat_m, xr.image_queue, xr.text_queue, 0.07)
    column = albef_fast.itc_loss(*args, idx=xr.idx.view(-1, 1), idx_queue=xr.idx_queue)
    assert torch.equal(column, albef_fast.itc_loss(*args, idx=xr.idx, idx_queue=xr.idx_queue))
    with pytest.raises(ValueError, match=r"idx: expected shape \[5\] or \[5, 1\]"):
        albef_fast.itc_loss(*args, idx=xr.idx.view(1, -1), idx_queue=xr.idx_queue)


def test_ema_rejects_and_changes_nothing():
    p_m = [torch.zeros(3), torch.zeros(4)]
    with pytest.raises(ValueError, match="params\\[1\\]"):
        albef_fast.ema_update_(p_m, [torch.ones(3), torch.ones(5)], 0.9)
    with pytest.raises(ValueError, match="params"):
        albef_fast.ema_update_(p_m, [torch.ones(3)], 0.9)
    with pytest.raises(ValueError, match="momentum"):
        albef_fast.ema_update_(p_m, [torch.ones(3), torch.ones(4)], 1.1)
    with pytest.raises(ValueError, match="params\\[0\\]"):
        albef_fast.ema_update_(p_m, [torch.ones(3, dtype=torch.float64), torch.ones(4)], 0.9)
    assert all(p.abs().sum() == 0 for p in p_m)


def test_ema_and_enqueue_reject_what_is_not_a_sequence_of_tensors():
    p, ptr = [torch.zeros(3)], torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match="params_m: expected a sequence of tensors, got Tensor"):
        albef_fast.ema_update_(torch.zeros(3), p, 0.9)
    with pytest.raises(TypeError, match="params: expected a sequence of tensors, got NoneType"):
        albef_fast.ema_update_(p, None, 0.9)
    albef_fast.ema_update_((t for t in p), iter([torch.ones(3)]), 0.5)  # generators: model.parameters()
    assert torch.equal(p[0], torch.full((3,), 0.5))
    with pytest.raises(TypeError, match="queues, items"):
        albef_fast.enqueue_(None, [torch.zeros(1, 3)], ptr)


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
def test_ema_rejects_a_momentum_tensor_whose_elements_share_memory(monkeypatch, ops):
    """An expand()ed params_m after a strided one (updated first, one pair at a time): the update
    of the first was kept and a RuntimeError raised until session 27."""
    use_state_ops(monkeypatch, ops)
    strided, expanded = torch.zeros(3, 2).t(), torch.zeros(1).expand(4)
    with pytest.raises(ValueError, match=r"params_m\[1\]: expected a tensor whose elements do not share memory"):
        albef_fast.ema_update_([strided, expanded], [torch.ones(2, 3), torch.ones(4)], 0.5)
    assert not strided.any() and not expanded.any()
    albef_fast.ema_update_([strided], [torch.ones(1).expand(2, 3)], 0.5)  # reading from one is fine
    assert torch.equal(strided, torch.full((2, 3), 0.5))


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
def test_enqueue_rejects_a_queue_whose_elements_share_memory(monkeypatch, ops):
    """Written in place, an expand()ed queue kept one of the columns meant for it, silently."""
    use_state_ops(monkeypatch, ops)
    queue, shared, ptr = torch.zeros(4, 10), torch.zeros(3, 1).expand(3, 10), torch.tensor([3])
    with pytest.raises(ValueError, match=r"queues\[1\]: expected a tensor whose elements do not share memory"):
        albef_fast.enqueue_([queue, shared], [torch.ones(2, 4), torch.ones(2, 3)], ptr)
    assert not queue.any() and not shared.any() and ptr.tolist() == [3]


def _ema_aliases():
    """(momentum tensors, online tensors, the error's words or None: accepted)."""
    p, q, r, flat = torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(8)
    return [
        ([p, p], [q, r], r"params_m\[0\]: shares memory with params_m\[1\]"),  # a model pair listed twice
        ([flat[:4], flat[2:6]], [q, r], r"params_m\[0\]: shares memory with params_m\[1\]"),
        ([p, r], [q, p], r"params_m\[0\]: shares memory with params\[1\]"),
        ([p], [p], None),  # a pair's p_m may be its own p: each element read, then written
        ([p, r], [q, q], None),  # online tensors read twice
        ([flat[:4], flat[4:]], [q, r], None),  # views of one storage, apart
        ([flat[::2], flat[1::2]], [q, r], None),  # interleaved: ATen's overlap check cannot tell, passes
    ]


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
@pytest.mark.parametrize("case", range(len(_ema_aliases())))
def test_ema_rejects_a_momentum_tensor_that_aliases_another_operand(monkeypatch, ops, case):
    """One launch updates every pair: a momentum tensor listed twice (or sharing memory with
    another operand) was written by two blocks at once on CUDA (a race), and twice in turn on
    the CPU. A ValueError naming both, before any write; the harmless aliases pass."""
    use_state_ops(monkeypatch, ops)
    params_m, params, error = _ema_aliases()[case]
    before = [t.clone() for t in params_m]
    if error is None:
        albef_fast.ema_update_(params_m, params, 0.5)
        return
    with pytest.raises(ValueError, match=error + r" \(the same tensor listed twice\?\)"):
        albef_fast.ema_update_(params_m, params, 0.5)
    assert all(torch.equal(t, b) for t, b in zip(params_m, before))


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
def test_enqueue_rejects_a_queue_or_pointer_that_aliases_another_operand(monkeypatch, ops):
    """Queues listed twice, a pointer inside a queue, an item read from the queue it is written
    to: a ValueError naming both, nothing written; one item for two queues is fine."""
    use_state_ops(monkeypatch, ops)
    queue, ids, ptr = torch.zeros(4, 10), torch.zeros(1, 10, dtype=torch.long), torch.tensor([3])
    cases = [([queue, queue], [torch.ones(2, 4)] * 2, ptr, r"queues\[0\]: shares memory with queues\[1\]"),
             ([ids], [torch.ones(2, 1, dtype=torch.long)], ids[0, :1], r"ptr: shares memory with queues\[0\]"),
             ([ids], [ids[0, :2].view(2, 1)], ptr, r"queues\[0\]: shares memory with items\[0\]")]
    for queues, items, pointer, error in cases:
        with pytest.raises(ValueError, match=error):
            albef_fast.enqueue_(queues, items, pointer)
    assert not queue.any() and not ids.any() and ptr.tolist() == [3]
    other = torch.zeros(4, 10)
    albef_fast.enqueue_([queue, other], [torch.ones(2, 4)] * 2, ptr)
    assert torch.equal(queue, other) and queue[:, 3:5].eq(1).all() and ptr.tolist() == [5]


def test_state_ops_reject_a_tensor_whose_elements_share_memory_when_called_directly():
    """The C++ op's own check (csrc/checks.h), for calls that bypass albef_fast.ema_update_."""
    if not _extension.has_ops():
        pytest.skip("C++ extension not built")
    expanded = torch.zeros(1).expand(4)
    with pytest.raises(ValueError, match=r"params_m\[0\]"):
        torch.ops.albef_fast.ema_update_([expanded], [torch.ones(4)], 0.5)
    with pytest.raises(ValueError, match=r"queues\[0\]"):
        torch.ops.albef_fast.enqueue_([torch.zeros(2, 1).expand(2, 4)], [torch.ones(1, 2)], torch.tensor([0]))
    assert not expanded.any()
