"""The registered ops: torch.library.opcheck, torch.compile(fullgraph=True), and the extension."""
import importlib
import os

import pytest
import torch

import albef_fast
from albef_fast import _extension, reference
from albef_fast.itc_op import BACKEND_IMPLS
from tests.helpers import make_inputs

HAS_EXT = _extension.has_ops()
CUDA = torch.cuda.is_available()


def _itc_args(x, temp, backend="torch", details=True):
    return (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, x.image_queue, x.text_queue, temp, 0.0, 0.4,
            x.idx, x.idx_queue, details, True, backend, "highest")


@pytest.mark.parametrize("retrieval", [False, True])
def test_opcheck_itc(retrieval):
    x = make_inputs(4, 9, 8, torch.float64, retrieval=retrieval)
    x.image_feat.requires_grad_()
    x.text_feat.requires_grad_()
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.albef_fast.itc.default, _itc_args(x, temp))


@pytest.mark.parametrize("eager", [True, False])
def test_only_the_losses_are_differentiable(eager):
    """The op's eight outputs: the mean loss and the direction losses carry gradients; the saved
    gradients, sims and terms are marked non-differentiable (no autograd bookkeeping for them),
    through the eager Function and the registered op alike."""
    x = make_inputs(4, 9, 8, torch.float64)
    x.image_feat.requires_grad_()
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    args = _itc_args(x, temp)
    outputs = albef_fast.itc_op.itc_apply(*args) if eager else torch.ops.albef_fast.itc(*args)
    assert [t.requires_grad for t in outputs] == [True, True] + [False] * 6


@pytest.mark.skipif(not HAS_EXT, reason="C++ extension not built")
def test_opcheck_state_ops():
    params_m, params = [torch.randn(5), torch.randn(3, 4)], [torch.randn(5), torch.randn(3, 4)]
    torch.library.opcheck(torch.ops.albef_fast.ema_update_.default, (params_m, params, 0.9))
    queues = [torch.randn(4, 10), torch.zeros(1, 10, dtype=torch.long)]
    items = [torch.randn(3, 4), torch.arange(3).view(3, 1)]
    torch.library.opcheck(torch.ops.albef_fast.enqueue_.default, (queues, items, torch.tensor([8])))


@pytest.mark.skipif(not HAS_EXT, reason="C++ extension not built")
def test_extension_reports_its_build():
    info = _extension.build_info()
    assert info["extension"] is True and isinstance(info["cuda"], bool)


def test_fallbacks_serve_when_the_extension_is_disabled(monkeypatch):
    """The PyTorch fallbacks give the same results as the ops (and ALBEF) with the extension off."""
    monkeypatch.setattr(_extension, "has_ops", lambda: False)
    called = []
    from albef_fast import fallbacks

    monkeypatch.setattr(fallbacks, "enqueue_", lambda *a, _f=fallbacks.enqueue_: (called.append(1), _f(*a)))
    queue, ptr = torch.zeros(2, 5), torch.tensor([4])
    albef_fast.enqueue_([queue], [torch.ones(2, 2)], ptr)
    assert called and ptr.item() == 1 and queue[:, [4, 0]].eq(1).all() and queue[:, 1:4].eq(0).all()
    p_m, p = [torch.randn(33)], [torch.randn(33)]
    expected = [p_m[0].clone()]
    reference.ema_update_(expected, p, 0.995)
    albef_fast.ema_update_(p_m, p, 0.995)
    assert torch.equal(p_m[0], expected[0])


def _train_step(module, updater, enc, enc_m, image, text, alpha):
    updater.update()
    with torch.no_grad():
        feat_m = torch.nn.functional.normalize(enc_m(image), dim=-1)
        text_m = torch.nn.functional.normalize(enc_m(text), dim=-1)
    out = module(torch.nn.functional.normalize(enc(image), dim=-1),
                 torch.nn.functional.normalize(enc(text), dim=-1), feat_m, text_m, alpha=alpha)
    return out.loss


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # set by conftest.py where there is no GPU


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + ([("cpu", "triton")] if INTERPRET else [])
                         + ([("cuda", "triton")] if CUDA else []))
def test_compile_fullgraph_training_step(device, backend, monkeypatch):
    """torch.compile(fullgraph=True) traces a whole forward step: EMA, momentum features, loss, enqueue.
    The "triton" backend runs under the interpreter on the CPU, compiled kernels on a GPU."""
    monkeypatch.setenv("ALBEF_FAST_BACKEND", backend)
    if backend == "triton":
        importlib.import_module("albef_fast.kernels")  # registers the backend
    calls = []
    impl = BACKEND_IMPLS[backend]
    monkeypatch.setitem(BACKEND_IMPLS, backend, lambda *a: (calls.append(1), impl(*a))[1])
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc, enc_m = torch.nn.Linear(8, 8).to(device), torch.nn.Linear(8, 8).to(device)
    image, text = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        module = albef_fast.ITCLoss(embed_dim=8, queue_size=12).to(device)
        enc_c, enc_mc = [torch.nn.Linear(8, 8).to(device) for _ in range(2)]
        enc_c.load_state_dict(enc.state_dict())
        enc_mc.load_state_dict(enc_m.state_dict())
        updater = albef_fast.MomentumUpdater([(enc_c, enc_mc)], momentum=0.9)
        step = torch.compile(_train_step, fullgraph=True, backend="aot_eager") if compiled else _train_step
        losses = []
        for alpha in (0.1, 0.2, 0.3, 0.4):  # ALBEF's ramp changes alpha every step
            loss = step(module, updater, enc_c, enc_mc, image, text, alpha)
            loss.backward()  # compiled: the backward graph of the traced step
            losses.append(loss.detach())
        results.append((losses, module.image_queue.clone(), module.queue_ptr.clone(), enc_c.weight.grad.clone()))
    assert len(calls) == 8  # every step of both runs went through the requested backend
    (l_e, q_e, p_e, g_e), (l_c, q_c, p_c, g_c) = results
    torch.testing.assert_close(torch.stack(l_c), torch.stack(l_e))
    assert torch.equal(p_c, p_e) and p_c.item() == (4 * 4) % 12
    torch.testing.assert_close(q_c, q_e)
    torch.testing.assert_close(g_c, g_e)
