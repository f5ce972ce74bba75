"""itc_loss on the streaming torch backend against ALBEF's reference and the float64 oracle."""
import random
import warnings
from contextlib import nullcontext

import pytest
import torch

import albef_fast
from albef_fast import reference, streaming
from tests.helpers import every_other_column, make_inputs, max_err, oracle_loss

SHAPES = [(5, 37, 24), (8, 3, 16), (1, 10, 4), (6, 0, 8), (16, 100, 33)]


def _args(x):
    return (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue)


def _loss_and_grads(fn, x, temp, grad_out=1.0):
    """fn(image_feat, text_feat, temp) -> (loss, ...); returns loss and grads (image, text, temp)."""
    feats = [x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()]
    t = temp.detach().clone().requires_grad_() if torch.is_tensor(temp) else temp
    loss = fn(feats[0], feats[1], t)
    inputs = feats + ([t] if torch.is_tensor(t) else [])
    grads = torch.autograd.grad(loss * grad_out, inputs)
    return loss.detach(), grads


def _fast(x, alpha, **kw):
    return lambda a, b, t: albef_fast.itc_loss(a, b, *_args(x)[2:], t, alpha, idx=x.idx, idx_queue=x.idx_queue,
                                               backend="torch", **kw)


def _ref(x, alpha, dtype=None):
    def fn(a, b, t):
        cast = (lambda v: v.to(dtype)) if dtype else (lambda v: v)  # noqa: E731
        args = [cast(v) for v in (a, b, *_args(x)[2:])]
        tt = cast(t) if torch.is_tensor(t) else t
        return reference.itc_loss(*args, tt, alpha, x.idx, x.idx_queue)
    return fn


@pytest.mark.parametrize("b,q,d", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("retrieval", [False, True])
def test_float64_matches_reference(b, q, d, alpha, retrieval):
    x = make_inputs(b, q, d, torch.float64, retrieval=retrieval)
    temp = torch.tensor(0.07, dtype=torch.float64)
    loss, grads = _loss_and_grads(_fast(x, alpha), x, temp, grad_out=2.5)
    loss_r, grads_r = _loss_and_grads(_ref(x, alpha), x, temp, grad_out=2.5)
    assert max_err(loss, loss_r) < 1e-12
    for g, g_r in zip(grads, grads_r):
        assert max_err(g, g_r) < 1e-12


@pytest.mark.parametrize("b,q,d", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("temp_kind", ["float", "param"])
def test_float32_within_twice_eager_error(b, q, d, alpha, retrieval, temp_kind):
    """flash-attention's rule: err(fast fp32) <= 2 * err(eager fp32) + atol, both vs fp64."""
    x = make_inputs(b, q, d, torch.float32, retrieval=retrieval)
    temp = 0.05 if temp_kind == "float" else torch.nn.Parameter(torch.tensor(0.05))
    loss, grads = _loss_and_grads(_fast(x, alpha), x, temp, grad_out=-0.7)
    loss_e, grads_e = _loss_and_grads(_ref(x, alpha), x, temp, grad_out=-0.7)
    temp64 = temp if temp_kind == "float" else temp.double()
    loss_64, grads_64 = _loss_and_grads(_ref(x, alpha, torch.float64), x, temp64, grad_out=-0.7)
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert max_err(loss, loss_64) <= 2 * max_err(loss_e, loss_64) + 1e-5
    for g, g_e, g_64 in zip(grads, grads_e, grads_64):
        assert max_err(g, g_64) <= 2 * max_err(g_e, g_64) + 1e-5 * max(1.0, g_64.abs().max().item())


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunking_does_not_change_the_result(monkeypatch, chunk):
    x = make_inputs(6, 29, 8, torch.float64, retrieval=True)
    expected = albef_fast.itc_loss(*_args(x), 0.07, 0.4, idx=x.idx, idx_queue=x.idx_queue, backend="torch")
    monkeypatch.setitem(streaming.DEFAULT_CHUNK, "cpu", chunk)
    got = albef_fast.itc_loss(*_args(x), 0.07, 0.4, idx=x.idx, idx_queue=x.idx_queue, backend="torch")
    assert max_err(got, expected) < 1e-13


def _random_case(seed: int) -> dict:
    rnd = random.Random(seed)
    return dict(b=rnd.choice([1, 2, 3, 8, 13, 31]), q=rnd.choice([0, 1, 7, 100, 513]), d=rnd.choice([1, 3, 24, 33]),
                alpha=rnd.choice([0.0, 0.123, 0.4, 1.0]), retrieval=rnd.random() < 0.4,
                temp=rnd.choice([0.001, 0.07, 0.5, 2.0]), temp_param=rnd.random() < 0.5,
                details=rnd.random() < 0.5, grad_out=rnd.choice([1.0, -2.5]), strided=rnd.random() < 0.3,
                chunk=rnd.choice([None, 1, 3, 64]))


@pytest.mark.parametrize("seed", range(24))
def test_random_float64_call_matches_the_oracle(monkeypatch, seed):
    """Shapes, options, ALBEF's temperature bounds (and past them) and key chunks drawn together;
    the parametrized tests above vary one knob at a time."""
    case = _random_case(seed)
    if case["chunk"]:
        monkeypatch.setitem(streaming.DEFAULT_CHUNK, "cpu", case["chunk"])
    x = make_inputs(case["b"], case["q"], case["d"], torch.float64, retrieval=case["retrieval"], seed=seed)
    if case["strided"]:
        x.image_queue, x.text_queue = every_other_column(x.image_queue), every_other_column(x.text_queue)
    a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    temp = torch.tensor(case["temp"], dtype=torch.float64, requires_grad=True) if case["temp_param"] else case["temp"]
    out = albef_fast.itc_loss(a, b, *_args(x)[2:], temp, case["alpha"], idx=x.idx, idx_queue=x.idx_queue,
                              return_details=case["details"], backend="torch")
    loss = out.loss if case["details"] else out
    (loss * case["grad_out"]).backward()
    a64, b64 = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    temp64 = torch.tensor(case["temp"], dtype=torch.float64, requires_grad=True)
    want, want_i2t, want_t2i, _ = oracle_loss(a64, b64, *_args(x)[2:], temp64, case["alpha"], x.idx, x.idx_queue)
    (want * case["grad_out"]).backward()
    got = [loss, a.grad, b.grad] + ([temp.grad] if case["temp_param"] else [])
    expected = [want, a64.grad, b64.grad] + ([temp64.grad] if case["temp_param"] else [])
    if case["details"]:
        got, expected = got + [out.loss_i2t, out.loss_t2i], expected + [want_i2t, want_t2i]
    for k, (g, w) in enumerate(zip(got, expected)):
        assert max_err(g, w) <= 1e-9 * max(1.0, w.abs().max().item()), (k, case)


@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_details_match_oracle_and_decompose_the_loss(retrieval, alpha):
    x = make_inputs(5, 37, 24, torch.float64, retrieval=retrieval)
    out = albef_fast.itc_loss(*_args(x), 0.07, alpha, idx=x.idx, idx_queue=x.idx_queue, return_details=True,
                              backend="torch")
    loss, loss_i2t, loss_t2i, terms = oracle_loss(*_args(x), 0.07, alpha, x.idx, x.idx_queue)
    assert isinstance(out, albef_fast.ITCOutput)
    assert max_err(out.loss, loss) < 1e-12
    assert max_err(out.loss_i2t, loss_i2t) < 1e-12 and max_err(out.loss_t2i, loss_t2i) < 1e-12
    for name in ("ce_i2t", "ce_t2i", "kl_i2t", "kl_t2i"):
        assert max_err(getattr(out, name), terms[name]) < 1e-12, name
        assert not getattr(out, name).requires_grad
    for d in ("i2t", "t2i"):
        parts = (1 - alpha) * getattr(out, f"ce_{d}") + alpha * (getattr(out, f"kl_{d}") + terms[f"ent_{d}"])
        assert max_err(parts, getattr(out, f"loss_{d}")) < 1e-12


def test_sim_blocks_equal_reference_logits():
    x = make_inputs(6, 20, 16, torch.float32)
    out = albef_fast.itc_loss(*_args(x), 0.07, return_details=True, backend="torch")
    _, _, _, sim_i2t, sim_t2i = reference.itc_loss(*_args(x), 0.07, 0.4, return_logits=True)
    assert out.sim_i2t_batch.shape == (6, 6) and not out.sim_i2t_batch.requires_grad
    torch.testing.assert_close(out.sim_i2t_batch, sim_i2t[:, :6])
    torch.testing.assert_close(out.sim_t2i_batch, sim_t2i[:, :6])


def test_partial_losses_backpropagate_separately():
    x = make_inputs(5, 12, 8, torch.float64)
    a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    out = albef_fast.itc_loss(a, b, *_args(x)[2:], 0.07, return_details=True, backend="torch")
    out.loss_i2t.backward()
    a_r, b_r = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    reference.itc_loss(a_r, b_r, *_args(x)[2:], 0.07, 0.4, return_logits=True)[1].backward()
    assert max_err(a.grad, a_r.grad) < 1e-12
    assert b.grad is None or b.grad.abs().max() == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weights", [(2.5, 0.7, -1.3), (0.0, 0.7, 0.0), (1.5, 0.0, 0.0)])
def test_weighted_outputs_backpropagate(backend, weights):
    """Any weighted sum of loss, loss_i2t and loss_t2i gets the reference's gradients, T included
    (the op saves the mean loss's gradients; a direction's loss weighs twice as much)."""
    device = _device_for(backend)
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = make_inputs(5, 12, 8, dtype, device=device)
    w, w_i2t, w_t2i = weights

    def grads(fn):
        a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
        t = torch.tensor(0.07, dtype=dtype, device=device, requires_grad=True)
        loss, loss_i2t, loss_t2i = fn(a, b, t)
        return torch.autograd.grad(w * loss + w_i2t * loss_i2t + w_t2i * loss_t2i, (a, b, t), allow_unused=True)

    def fast(a, b, t):
        out = albef_fast.itc_loss(a, b, *_args(x)[2:], t, 0.0, return_details=True, backend=backend,
                                  precision="highest")
        return out.loss, out.loss_i2t, out.loss_t2i

    got = grads(fast)
    want = grads(lambda a, b, t: reference.itc_loss(a, b, *_args(x)[2:], t, 0.0, return_logits=True)[:3])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, g_ref in zip(got, want):
        g = torch.zeros_like(g_ref) if g is None else g
        g_ref = torch.zeros_like(g) if g_ref is None else g_ref
        assert max_err(g, g_ref) < tol * max(1.0, g_ref.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("retrieval", [False, True])
def test_autocast_changes_nothing(backend, retrieval):
    """Under autocast (mixed-precision training, as LAVIS runs BLIP) the loss keeps its fp32
    products and outputs: the op's own matmuls are out= forms, which autocast leaves alone."""
    device = _device_for(backend)
    x = make_inputs(5, 37, 24, torch.float32, device=device, retrieval=retrieval)

    def run():
        a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
        t = torch.tensor(0.07, device=device, requires_grad=True)
        out = albef_fast.itc_loss(a, b, *_args(x)[2:], t, 0.4, idx=x.idx, idx_queue=x.idx_queue,
                                  return_details=True, backend=backend, precision="highest")
        return (*out, *torch.autograd.grad(out.loss, (a, b, t)))

    want = run()
    with torch.autocast(device, dtype=torch.bfloat16):
        got = run()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_for(backend: str) -> str:
    """Where a test of `backend` runs; one of "triton" skips without a GPU or the interpreter."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and not _interpreting():
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def test_bf16_queue_with_fp32_features():
    x = make_inputs(5, 37, 24, torch.float32, queue_dtype=torch.bfloat16)
    got = albef_fast.itc_loss(*_args(x), 0.07, backend="torch")
    args = list(_args(x))
    args[4:] = [args[4].float(), args[5].float()]
    torch.testing.assert_close(got, reference.itc_loss(*args, 0.07), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_gradcheck_float64(retrieval, alpha):
    """With alpha > 0 the teacher also depends on T but (as in ALBEF) passes it no gradient, so
    finite differences in T agree with the analytic gradient only at alpha = 0."""
    x = make_inputs(3, 7, 5, torch.float64, retrieval=retrieval)
    a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    temp = torch.tensor(0.1, dtype=torch.float64, requires_grad=alpha == 0.0)
    fn = lambda a, b, t: albef_fast.itc_loss(a, b, *_args(x)[2:], t, alpha, idx=x.idx,  # noqa: E731
                                             idx_queue=x.idx_queue, backend="torch")
    assert torch.autograd.gradcheck(fn, (a, b, temp))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_momentum_inputs_get_no_gradient_and_a_warning_says_so(backend):
    """Keys that require grad get none (as ALBEF's, computed under no_grad); the call says so where
    a gradient was meant (CLIP's loss passes trainable keys): a warning naming them, none under
    no_grad or for detached keys. The queries' gradients are the detached keys' ones."""
    if backend == "triton":
        pytest.importorskip("triton")
    x = make_inputs(4, 9, 8, torch.float32)
    image_feat = x.image_feat.clone().requires_grad_()
    x.image_feat_m.requires_grad_()
    x.image_queue.requires_grad_()
    keys = _args(x)[2:]
    with pytest.warns(UserWarning, match="^itc_loss: image_feat_m, image_queue require grad, but the loss gives"):
        loss = albef_fast.itc_loss(image_feat, x.text_feat, *keys, 0.07, backend=backend)
    grad, = torch.autograd.grad(loss, image_feat)
    assert x.image_feat_m.grad is None and x.image_queue.grad is None
    detached = [k.detach() for k in keys]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected, = torch.autograd.grad(albef_fast.itc_loss(image_feat, x.text_feat, *detached, 0.07,
                                                            backend=backend), image_feat)
        with torch.no_grad():
            albef_fast.itc_loss(image_feat, x.text_feat, *keys, 0.07, backend=backend)
    assert not [w for w in caught if str(w.message).startswith("itc_loss")]  # the interpreter's own may come
    assert torch.equal(grad, expected)


def test_env_variable_picks_the_backend(monkeypatch):
    x = make_inputs(4, 9, 8, torch.float32)
    monkeypatch.setenv("ALBEF_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ALBEF_FAST_BACKEND"):
        albef_fast.itc_loss(*_args(x), 0.07)
    monkeypatch.setenv("ALBEF_FAST_BACKEND", "torch")
    torch.testing.assert_close(albef_fast.itc_loss(*_args(x), 0.07), reference.itc_loss(*_args(x), 0.07))


def test_automatic_backend_is_triton_for_cuda_but_fp64(monkeypatch):
    """backend=None: Triton for CUDA features at every precision (fp32 "highest" too, since
    session 8: f16x3 products), torch for fp64 features or queues and off CUDA. The rule alone, on stand-in
    features (the CUDA test in test_triton.py checks it on real ones)."""
    from types import SimpleNamespace

    from albef_fast import functional

    monkeypatch.delenv("ALBEF_FAST_BACKEND", raising=False)
    monkeypatch.setattr(functional, "_triton_registered", lambda: True)
    cuda = lambda dtype: SimpleNamespace(dtype=dtype, is_cuda=True, shape=(4, 8), stride=lambda: (8, 1))  # noqa: E731
    for precision in ("highest", "high", "medium", None):
        assert functional.resolve_backend(None, precision, cuda(torch.float32))[0] == "triton"
    assert functional.resolve_backend(None, None, cuda(torch.bfloat16))[0] == "triton"
    assert functional.resolve_backend(None, None, cuda(torch.float64)) == ("torch", "highest")
    assert functional.resolve_backend(None, None, cuda(torch.float32), cuda(torch.float64))[0] == "torch"
    assert functional.resolve_backend(None, None, cuda(torch.float32), cuda(torch.bfloat16))[0] == "triton"
    assert functional.resolve_backend(None, "highest", torch.zeros(1))[0] == "torch"


def test_queues_past_32_bit_offsets_take_the_torch_path(monkeypatch):
    """The Triton kernels index the queues in 32-bit arithmetic (i32 strides): a queue whose last
    element lies 2^31 or more elements after its first (D * Q >= 2^31: Q = 2^21 at D = 1024) would
    be read from wrapped-around offsets. The automatic choice takes the torch path there, and an
    explicit "triton" names the queue. Meta tensors give the shapes without the memory."""
    from types import SimpleNamespace

    from albef_fast import functional

    monkeypatch.delenv("ALBEF_FAST_BACKEND", raising=False)
    monkeypatch.setattr(functional, "_triton_registered", lambda: True)
    feat = SimpleNamespace(dtype=torch.bfloat16, is_cuda=True)
    largest = torch.empty(1024, 2 ** 21, dtype=torch.bfloat16, device="meta")  # last offset 2^31 - 1
    for queue, backend in ((largest, "triton"), (largest.t().contiguous().t(), "triton"),
                           (torch.empty(1024, 2 ** 21 + 1, dtype=torch.bfloat16, device="meta"), "torch"),
                           (torch.empty(2048, 2 ** 21, device="meta")[::2], "torch")):  # a view's strides count
        assert functional.resolve_backend(None, None, feat, queue)[0] == backend
        if backend == "torch":
            with pytest.raises(ValueError, match="backend: 'triton' indexes the queues with 32-bit offsets"):
                functional.resolve_backend("triton", None, feat, queue)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("details", [False, True])
def test_forward_without_gradients_gives_the_same_values(alpha, retrieval, details):
    """Nothing requires grad: the student's key sums are skipped, the values stay the same."""
    x = make_inputs(5, 37, 24, torch.float64, retrieval=retrieval)
    kw = dict(idx=x.idx, idx_queue=x.idx_queue, return_details=details, backend="torch")
    with torch.no_grad():
        fast = albef_fast.itc_loss(*_args(x), 0.07, alpha, **kw)
    a = x.image_feat.clone().requires_grad_()
    full = albef_fast.itc_loss(a, *_args(x)[1:], 0.07, alpha, **kw)
    for got, expected in zip(fast if details else [fast], full if details else [full]):
        assert max_err(got, expected) < 1e-12


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    x = make_inputs(4, 9, 8, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA"):
        albef_fast.itc_loss(*_args(x), 0.07, backend="triton")


def test_triton_backend_refuses_float64_and_a_missing_triton(monkeypatch):
    from albef_fast import functional

    x = make_inputs(4, 9, 8, torch.float64)
    with pytest.raises(ValueError, match="backend: 'triton' does not take float64 features"):
        albef_fast.itc_loss(*_args(x), 0.07, backend="triton")
    monkeypatch.setattr(functional, "_triton_registered", lambda: False)
    with pytest.raises(ValueError, match="backend: 'triton' requested, but triton is not installed"):
        albef_fast.itc_loss(*_args(make_inputs(4, 9, 8, torch.float32)), 0.07, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moco_v3_loss_is_a_scaled_itc_loss(backend):
    """README "MoCo-style steps": MoCo v3's symmetric loss ctr(q1, k2) + ctr(q2, k1), each
    cross_entropy(q @ k.T / T, arange(N)) * 2T, is 4T * itc_loss(q1, q2, k1, k2, empty queues,
    T, alpha=0); values and gradients (fp64 on the torch backend, fp32 on the interpreter)."""
    if backend == "triton":
        pytest.importorskip("triton")
    dtype = torch.float64 if backend == "torch" else torch.float32
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    n, d, temp = 6, 16, 0.2
    gen = torch.Generator().manual_seed(3)
    q1, q2, k1, k2 = [torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1).to(device)
                      for _ in range(4)]
    empty = torch.empty(d, 0, dtype=dtype, device=device)

    def ctr(q, k):
        return torch.nn.functional.cross_entropy(q @ k.t() / temp, torch.arange(n, device=device)) * 2 * temp

    def moco(a, b):
        return ctr(a, k2) + ctr(b, k1)

    def ours(a, b):
        return 4 * temp * albef_fast.itc_loss(a, b, k1, k2, empty, empty, temp, 0.0, backend=backend,
                                              precision="highest")

    results = []
    for fn in (moco, ours):
        a, b = q1.clone().requires_grad_(), q2.clone().requires_grad_()
        loss = fn(a, b)
        results.append((loss, *torch.autograd.grad(loss, (a, b))))
    tol = {} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got.to(expected.dtype), expected, **tol)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_torch_backend_runs_fp32_products_at_the_precision_asked(monkeypatch, precision):
    """precision= sets torch's float32 matmul precision for the torch backend's products of fp32
    features (on CUDA: cuBLAS's TF32 or not), and then restores it, also after an error; half
    features keep torch's setting. Until session 23 the torch backend ignored precision=."""
    from albef_fast.itc_op import float32_matmul_precision, matmul_precision

    seen, real = [], streaming.stream_itc

    def spy(*args, **kwargs):
        seen.append(float32_matmul_precision())
        if kwargs.get("details"):
            raise RuntimeError("from the products")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "stream_itc", spy)
    x, half = make_inputs(5, 37, 24), make_inputs(5, 37, 24, torch.bfloat16)
    with matmul_precision("highest"):
        got = albef_fast.itc_loss(*_args(x), 0.07, backend="torch", precision=precision)
        albef_fast.itc_loss(*_args(half), 0.07, backend="torch", precision=precision)
        with pytest.raises(RuntimeError, match="from the products"):
            albef_fast.itc_loss(*_args(x), 0.07, backend="torch", precision=precision, return_details=True)
        after = float32_matmul_precision()
    with matmul_precision(precision):
        want = albef_fast.itc_loss(*_args(x), 0.07, backend="torch")
    assert seen == [precision, "highest", precision, precision] and after == "highest"
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("details", [False, True])
def test_a_one_element_temperature_is_a_scalar_one(backend, details):
    """temp of shape [1] (FSDP2's fully_shard takes no 0-dim parameter, so a sharded model holds
    its temperature that way): the 0-dim temperature's loss and gradients, T's shaped [1]."""
    device = _device_for(backend)
    x = make_inputs(5, 12, 8, device=device, retrieval=True)

    def loss_fn(a, b, t):
        out = albef_fast.itc_loss(a, b, *_args(x)[2:], t, 0.4, idx=x.idx, idx_queue=x.idx_queue,
                                  return_details=details, backend=backend)
        return out.loss if details else out

    loss0, grads0 = _loss_and_grads(loss_fn, x, torch.tensor(0.07, device=device), grad_out=1.7)
    loss1, grads1 = _loss_and_grads(loss_fn, x, torch.tensor([0.07], device=device), grad_out=1.7)
    assert grads1[2].shape == (1,)
    assert torch.equal(loss0, loss1)
    for g0, g1 in zip(grads0, grads1):
        assert torch.equal(g0, g1.reshape(g0.shape))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temp_dtype", [torch.float32, torch.float64])
def test_the_default_dtype_changes_nothing(backend, temp_dtype):
    """torch.set_default_dtype(torch.float64) (a float64 script, or ALBEF's temp made under it):
    the Triton path allocated its loss, term and key-sum buffers in the default dtype, so its
    loss came out float64 and its kernels ran on float64 buffers, until session 29."""
    device = _device_for(backend)
    x = make_inputs(5, 12, 8, device=device, retrieval=True)

    def run():
        t = torch.tensor(0.07, dtype=temp_dtype, device=device, requires_grad=True)
        a = x.image_feat.clone().requires_grad_()
        out = albef_fast.itc_loss(a, x.text_feat, *_args(x)[2:], t, 0.4, idx=x.idx, idx_queue=x.idx_queue,
                                  return_details=True, backend=backend)
        out.loss.backward()
        return list(out) + [a.grad, t.grad]

    expected = run()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run()
    finally:
        torch.set_default_dtype(default)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)
    assert got[0].dtype == torch.float32 and got[-1].dtype == temp_dtype


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_default_device_changes_nothing(backend):
    """A default device other than the tensors' (torch.set_default_device("cuda") with the torch
    backend's CPU tables: pin_memory() of a CUDA tensor failed; meta stands for it here): the
    torch backend built its coefficient table there until session 29."""
    device = _device_for(backend)
    x = make_inputs(5, 12, 8, device=device, retrieval=True)
    streaming._COEFFICIENTS.clear()  # built at first use: under the default device below

    def run():
        out = albef_fast.itc_loss(*_args(x), 0.07, 0.3, idx=x.idx, idx_queue=x.idx_queue, return_details=True,
                                  backend=backend)
        return list(out)

    with torch.device("meta"):
        got = run()
    for g, e in zip(got, run()):
        assert g.device == e.device and torch.equal(g, e)


@pytest.fixture
def per_backend_precision():
    """torch >= 2.9's per-backend float32 precision settings, restored after the test."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has no per-backend float32 precision")
    saved = (torch.backends.fp32_precision, matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    yield
    torch.backends.fp32_precision, matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torchs_per_backend_precision_setting_is_read(per_backend_precision, backend):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (torch's notes advise it over
    set_float32_matmul_precision): torch.get_float32_matmul_precision() raises then, and so did
    every fp32 itc_loss call until session 29. Now "tf32" reads as "high", "ieee" as "highest",
    and precision= on the torch path leaves the user's settings as they were."""
    device = _device_for(backend)
    x = make_inputs(5, 12, 8, device=device)
    expected = {p: albef_fast.itc_loss(*_args(x), 0.07, backend=backend, precision=p) for p in ("high", "highest")}
    for setting, precision in (("tf32", "high"), ("ieee", "highest")):
        torch.backends.cuda.matmul.fp32_precision = setting
        if setting == "tf32":
            with pytest.raises(RuntimeError):  # what the call met before
                torch.get_float32_matmul_precision()
        assert albef_fast.functional.resolve_backend(backend, None, x.image_feat) == (backend, precision)
        assert torch.equal(albef_fast.itc_loss(*_args(x), 0.07, backend=backend), expected[precision])
        mixed = setting == "tf32" and backend == "torch"  # its legacy level unreadable: precision= not applied
        with pytest.warns(RuntimeWarning, match="precision='medium' not applied") if mixed else nullcontext():
            albef_fast.itc_loss(*_args(x), 0.07, backend=backend, precision="medium")
        assert torch.backends.cuda.matmul.fp32_precision == setting
        assert torch.backends.mkldnn.matmul.fp32_precision == "none"
