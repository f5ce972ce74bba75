"""ITCLoss: ALBEF's step semantics (clamp, loss on the pre-step queue, enqueue), state and errors."""
import io

import numpy as np
import pytest
import torch

import albef_fast
from albef_fast import reference
from tests.helpers import make_inputs, max_err


def _albef_step(state, x, alpha, use_idx):
    """ALBEF's own step on a copy of the state: clamp, loss, then enqueue."""
    temp = state["temp"]
    with torch.no_grad():
        temp.clamp_(0.001, 0.5)
    a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
    loss = reference.itc_loss(a, b, x.image_feat_m, x.text_feat_m, state["image_queue"], state["text_queue"], temp,
                              alpha, x.idx if use_idx else None, state.get("idx_queue"))
    loss.backward()
    queues = [state["image_queue"], state["text_queue"]]
    items = [x.image_feat_m, x.text_feat_m]
    if use_idx:
        queues.append(state["idx_queue"])
        items.append(x.idx.view(-1, 1))
    reference.enqueue_(queues, items, state["queue_ptr"])
    return loss, a.grad, b.grad


@pytest.mark.parametrize("use_idx", [False, True])
def test_steps_match_albef_including_wrap_around(use_idx):
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.9, use_idx=use_idx)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state["temp"].requires_grad_()
    for step in range(4):  # 4 x 5 > 13: the third step wraps around
        x = make_inputs(5, 0, 8, retrieval=use_idx, seed=step)
        a, b = x.image_feat.clone().requires_grad_(), x.text_feat.clone().requires_grad_()
        out = module(a, b, x.image_feat_m, x.text_feat_m, alpha=0.3, idx=x.idx)
        out.loss.backward()
        loss_r, grad_a, grad_b = _albef_step(state, x, 0.3, use_idx)
        assert max_err(out.loss, loss_r) < 1e-5
        assert max_err(a.grad, grad_a) < 1e-5 and max_err(b.grad, grad_b) < 1e-5
        assert max_err(module.temp.grad, state["temp"].grad) < 1e-3
        module.temp.grad = state["temp"].grad = None
        for name, value in state.items():
            assert torch.equal(getattr(module, name).detach(), value.detach()), name
    assert module.temp.item() == pytest.approx(0.5)  # clamped from 0.9


def test_clamp_temp_off_keeps_temperature():
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.9, clamp_temp=False)
    x = make_inputs(5, 0, 8)
    module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
    assert module.temp.item() == pytest.approx(0.9)


def test_state_dict_round_trip_is_bit_identical():
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, use_idx=True, queue_dtype=torch.bfloat16)
    x = make_inputs(5, 0, 8, retrieval=True)
    module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, idx=x.idx)
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh = albef_fast.ITCLoss(embed_dim=8, queue_size=13, use_idx=True, queue_dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(buf))
    for name in ("image_queue", "text_queue", "queue_ptr", "idx_queue", "temp"):
        assert torch.equal(getattr(fresh, name), getattr(module, name)), name
    assert fresh.queue_ptr.item() == 5


def test_albef_checkpoint_entries_load():
    d, q = 256, 64
    albef_state = {  # what ALBEF's model_retrieval registers, under the same names and shapes
        "image_queue": torch.nn.functional.normalize(torch.randn(d, q), dim=0),
        "text_queue": torch.nn.functional.normalize(torch.randn(d, q), dim=0),
        "queue_ptr": torch.tensor([7]),
        "idx_queue": torch.full((1, q), -100),
        "temp": torch.tensor(0.05),
    }
    module = albef_fast.ITCLoss(embed_dim=d, queue_size=q, use_idx=True)
    assert set(module.state_dict()) == set(albef_state)
    module.load_state_dict(albef_state)
    assert module.queue_ptr.item() == 7 and torch.equal(module.image_queue, albef_state["image_queue"])


def test_blip_retrieval_checkpoint_entries_load():
    """BLIP's retrieval models (blip_retrieval.py, LAVIS) name the pointer ptr_queue: it loads as
    queue_ptr, on the module itself, under a parent's prefix, and with strict=False from a whole
    model's state (the README's recipe); the caller's dict is left as it was."""
    d, q = 16, 32
    blip_state = {
        "image_queue": torch.nn.functional.normalize(torch.randn(d, q), dim=0),
        "text_queue": torch.nn.functional.normalize(torch.randn(d, q), dim=0),
        "idx_queue": torch.full((1, q), -100),
        "ptr_queue": torch.tensor([9]),
        "temp": torch.tensor(0.05),
    }
    module = albef_fast.ITCLoss(embed_dim=d, queue_size=q, use_idx=True)
    module.load_state_dict(blip_state)
    assert module.queue_ptr.item() == 9 and "ptr_queue" in blip_state
    parent = torch.nn.Module()
    parent.itc = albef_fast.ITCLoss(embed_dim=d, queue_size=q, use_idx=True)
    parent.load_state_dict({f"itc.{k}": v for k, v in blip_state.items()})
    assert parent.itc.queue_ptr.item() == 9 and torch.equal(parent.itc.text_queue, blip_state["text_queue"])
    fresh = albef_fast.ITCLoss(embed_dim=d, queue_size=q, use_idx=True)
    missing, unexpected = fresh.load_state_dict({**blip_state, "visual_encoder.weight": torch.ones(2)}, strict=False)
    assert missing == [] and unexpected == ["visual_encoder.weight"] and fresh.queue_ptr.item() == 9


def _features(x, d):
    """The four feature arguments cut to their first d columns (another embed_dim)."""
    return {name: getattr(x, name)[:, :d] for name in ("image_feat", "text_feat", "image_feat_m", "text_feat_m")}


BAD_CALLS = [
    ("image_feat_m", lambda x: dict(image_feat_m=x.image_feat_m[:4])),
    ("text_feat", lambda x: dict(text_feat=torch.randn(5, 7))),
    ("alpha", lambda x: dict(alpha=2.0)),
    (r"image_feat: expected \[B, 8\] \(embed_dim = 8\)", lambda x: _features(x, d=6)),
    ("idx: required when use_idx=True", lambda x: dict(idx=None)),
    ("idx", lambda x: dict(idx=torch.arange(4))),
    (r"image_feat: expected a tensor on cpu, where the module's queues are, got meta; move the module with "
     r"\.to\('meta'\)", lambda x: {k: v.to("meta") for k, v in _features(x, d=8).items()}),
]


@pytest.mark.parametrize("name,over", BAD_CALLS)
def test_failed_call_leaves_state_unchanged(name, over):
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.9, use_idx=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = make_inputs(5, 0, 8, retrieval=True)
    kw = dict(image_feat=x.image_feat, text_feat=x.text_feat, image_feat_m=x.image_feat_m,
              text_feat_m=x.text_feat_m, alpha=0.4, idx=x.idx)
    kw.update(over(x))
    with pytest.raises((ValueError, TypeError), match=name):
        module(**kw)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("backend", ["gpu", "triton"])
def test_a_backend_that_cannot_run_is_rejected_before_the_clamp(monkeypatch, backend):
    """ALBEF_FAST_BACKEND naming no backend, or Triton for CPU tensors without the interpreter:
    itc_loss raised after the temperature was clamped, until session 28."""
    from albef_fast import functional

    monkeypatch.setenv("ALBEF_FAST_BACKEND", backend)
    monkeypatch.setattr(functional, "_interpreting", lambda: False)
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.9)
    x = make_inputs(5, 0, 8)
    with pytest.raises(ValueError, match="ALBEF_FAST_BACKEND" if backend == "gpu" else "needs CUDA tensors"):
        module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
    assert module.temp.item() == pytest.approx(0.9) and module.queue_ptr.item() == 0


def test_batch_larger_than_queue_is_rejected_before_the_clamp():
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=4, temp=0.9)
    x = make_inputs(5, 0, 8)
    with pytest.raises(ValueError, match="queue_size"):
        module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
    assert module.temp.item() == pytest.approx(0.9) and module.queue_ptr.item() == 0


@pytest.mark.parametrize("dtype", [torch.long, torch.float8_e4m3fn, "float32"])
def test_queue_dtype_must_be_one_the_loss_computes_in(dtype):
    with pytest.raises(TypeError, match="queue_dtype"):
        albef_fast.ITCLoss(embed_dim=8, queue_size=13, queue_dtype=dtype)


def test_idx_without_use_idx_is_rejected():
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13)
    x = make_inputs(5, 0, 8, retrieval=True)
    with pytest.raises(ValueError, match="idx: required when use_idx=True, not accepted otherwise"):
        module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, idx=x.idx)


def test_defaults_are_albefs():
    module = albef_fast.ITCLoss()
    assert module.image_queue.shape == module.text_queue.shape == (256, 65536)
    assert module.temp.item() == pytest.approx(0.07) and module.alpha == 0.4
    assert module.clamp_temp and not module.use_idx and module.image_queue.dtype == torch.float32
    retrieval = albef_fast.ITCLoss(embed_dim=8, queue_size=13, use_idx=True)
    assert retrieval.idx_queue.shape == (1, 13) and (retrieval.idx_queue == -100).all()  # ALBEF's "no id"
    for queue in (retrieval.image_queue, retrieval.text_queue):  # unit columns, as ALBEF normalizes dim 0
        torch.testing.assert_close(queue.norm(dim=0), torch.ones(13))


@pytest.mark.parametrize("temp,clamped", [(1e-4, 0.001), (0.9, 0.5), (0.07, 0.07)])
def test_temperature_is_clamped_as_albef(temp, clamped):
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=temp)
    x = make_inputs(5, 0, 8)
    module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
    assert module.temp.item() == pytest.approx(clamped, rel=1e-6)


def test_eval_mode_changes_nothing():
    """module.eval() (a validation step reusing the training step; Lightning's sanity check runs
    it before the first training step): the loss against the queues as they are, with temp
    clamped out of place, and no state written; train() enqueues again. Until session 28 an
    evaluation enqueued its features into the training queues. A loss that takes gradients in
    eval mode (training with dropout off) warns that the queues stay as they are."""
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.9, use_idx=True)
    x = make_inputs(5, 13, 8, retrieval=True)
    feats = (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    expected = reference.itc_loss(*feats, module.image_queue, module.text_queue, 0.5, 0.4, x.idx, module.idx_queue)
    out = module.eval()(*feats, alpha=0.4, idx=x.idx)
    torch.testing.assert_close(out.loss, expected)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    with pytest.warns(RuntimeWarning, match="ITCLoss is in eval mode while its loss takes gradients"):
        module(x.image_feat.clone().requires_grad_(), *feats[1:], idx=x.idx)  # training in eval mode
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    module.train()(*feats, idx=x.idx)
    assert module.queue_ptr.item() == 5 and module.temp.item() == pytest.approx(0.5)
    small = albef_fast.ITCLoss(embed_dim=8, queue_size=4).eval()  # nothing enqueued: B > Q is fine
    assert torch.isfinite(small(*feats).loss)


@pytest.mark.parametrize("clamp_temp", [True, False])
def test_a_temperature_an_optimizer_step_left_negative(clamp_temp):
    """ALBEF clamps first, so a step that left temp <= 0 trains on at T = 0.001; the CPU check
    (which reads temp's value) rejected it before the clamp until session 28. Without the clamp
    (ALBEF's retrieval model) it stays an error."""
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, clamp_temp=clamp_temp)
    with torch.no_grad():
        module.temp.fill_(-0.06)
    x = make_inputs(5, 13, 8)
    queues = (module.image_queue.clone(), module.text_queue.clone())
    if not clamp_temp:
        with pytest.raises(ValueError, match="temp: expected a positive temperature"):
            module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
        assert module.queue_ptr.item() == 0
        return
    out = module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, alpha=0.4)
    assert module.temp.item() == pytest.approx(0.001)
    expected = reference.itc_loss(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m, *queues, 0.001, 0.4)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("embed_dim,queue_size,exc,name", [
    (0, 13, ValueError, "embed_dim"), (8, 0, ValueError, "queue_size"), (-1, 13, ValueError, "embed_dim"),
    (2.5, 13, TypeError, "embed_dim"), ("8", 13, TypeError, "embed_dim"), (True, 13, TypeError, "embed_dim"),
    (None, 13, TypeError, "embed_dim"), (8, 13.0, TypeError, "queue_size")])
def test_queue_shapes_must_be_positive_ints(embed_dim, queue_size, exc, name):
    with pytest.raises(exc, match=f"{name}: expected an int >= 1"):
        albef_fast.ITCLoss(embed_dim=embed_dim, queue_size=queue_size)


def test_queue_shapes_take_numpys_ints():
    module = albef_fast.ITCLoss(embed_dim=np.int64(8), queue_size=np.int32(13))
    assert module.image_queue.shape == (8, 13) and module.queue_size == 13


def test_batch_as_large_as_the_queue_replaces_it():
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=5, temp=0.9)
    x = make_inputs(5, 0, 8)
    module(x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
    assert torch.equal(module.image_queue, x.image_feat_m.T) and torch.equal(module.text_queue, x.text_feat_m.T)
    assert module.queue_ptr.item() == 0


def test_checkpoint_pointer_names():
    """ALBEF's queue_ptr wins over a ptr_queue beside it; a checkpoint with neither reports it missing."""
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13)
    both = {**module.state_dict(), "queue_ptr": torch.tensor([3]), "ptr_queue": torch.tensor([9])}
    _, unexpected = module.load_state_dict(both, strict=False)
    assert module.queue_ptr.item() == 3 and unexpected == ["ptr_queue"]
    neither = {k: v for k, v in module.state_dict().items() if k != "queue_ptr"}
    missing, _ = albef_fast.ITCLoss(embed_dim=8, queue_size=13).load_state_dict(neither, strict=False)
    assert missing == ["queue_ptr"]


@pytest.mark.filterwarnings("ignore:ITCLoss is in eval mode:RuntimeWarning")  # the third step's gradients
def test_a_one_element_temperature_trains_as_albefs():
    """FSDP2's fully_shard takes no 0-dim parameter (it asks for a one-element 1-D one): with
    temp reshaped to [1] the module clamps, trains and evaluates as with ALBEF's 0-dim temp, and
    the two shapes load each other's checkpoints."""
    scalar = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.9, use_idx=True)
    sharded = albef_fast.ITCLoss(embed_dim=8, queue_size=13, use_idx=True)
    sharded.temp = torch.nn.Parameter(torch.zeros(1))
    sharded.load_state_dict(scalar.state_dict())  # 0-dim into [1]
    assert sharded.temp.shape == (1,) and sharded.temp.item() == pytest.approx(0.9)
    for step in range(3):
        x = make_inputs(5, 0, 8, retrieval=True, seed=step)
        losses = []
        for module in (scalar, sharded):
            module.train(step < 2)
            a = x.image_feat.clone().requires_grad_()
            out = module(a, x.text_feat, x.image_feat_m, x.text_feat_m, alpha=0.3, idx=x.idx)
            out.loss.backward()
            losses.append((out.loss, a.grad, module.temp.grad.clone()))
            module.temp.grad = None
        (loss0, grad0, temp_grad0), (loss1, grad1, temp_grad1) = losses
        assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
        assert temp_grad1.shape == (1,) and torch.equal(temp_grad0, temp_grad1[0])
        for name, value in scalar.state_dict().items():
            assert torch.equal(value, sharded.state_dict()[name].reshape(value.shape)), name
    assert sharded.temp.item() == pytest.approx(0.5)  # clamped in place, as ALBEF's
    scalar.load_state_dict({**sharded.state_dict(), "temp": torch.tensor([0.25])})  # [1] into 0-dim
    assert scalar.temp.shape == () and scalar.temp.item() == 0.25


@pytest.mark.parametrize("use_idx", [False, True])
def test_a_module_built_on_the_meta_device_resets_to_albefs_initial_state(use_idx):
    """Meta-device init (FSDP materializes with to_empty() and then calls each module's
    reset_parameters()): to_empty() leaves uninitialized memory, reset_parameters() ALBEF's
    initial state, which is what the constructor builds from the same random numbers."""
    torch.manual_seed(5)
    eager = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.05, use_idx=use_idx, queue_dtype=torch.bfloat16)
    with torch.device("meta"):
        module = albef_fast.ITCLoss(embed_dim=8, queue_size=13, temp=0.05, use_idx=use_idx,
                                    queue_dtype=torch.bfloat16)
    module.to_empty(device="cpu")
    with torch.no_grad():
        module.queue_ptr.fill_(7)
        module.temp.fill_(3.0)
    torch.manual_seed(5)
    module.reset_parameters()
    assert module.state_dict().keys() == eager.state_dict().keys()
    for name, value in eager.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
    assert module.queue_ptr.item() == 0 and module.temp.item() == pytest.approx(0.05)


def test_training_under_data_parallel_is_refused():
    """nn.DataParallel replicates the module each step (torch's _replicate_for_data_parallel, called
    here directly: replicating needs GPUs): only the first device's replica shares the buffers, so
    the others' enqueues would be lost silently. Refused in training before any change (ALBEF's
    concat_all_gather fails there too); evaluation is fine."""
    module = albef_fast.ITCLoss(embed_dim=8, queue_size=13)
    x = make_inputs(5, 0, 8)
    feats = (x.image_feat, x.text_feat, x.image_feat_m, x.text_feat_m)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    replica = module._replicate_for_data_parallel()
    replica.temp = module.temp * 1  # replicate() sets each parameter's differentiable copy so
    with pytest.raises(RuntimeError, match="ITCLoss: training under nn.DataParallel"):
        replica(*feats)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    replica.eval()
    assert torch.isfinite(replica(*feats).loss)
