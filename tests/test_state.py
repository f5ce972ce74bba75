"""ema_update_, enqueue_ and MomentumUpdater against ALBEF's reference (C++ ops or fallbacks)."""
import enum
import sys
import types

import pytest
import torch
from torch import nn

import albef_fast
from albef_fast import _extension, reference
from tests.helpers import check_ema_layouts, use_state_ops

SHAPES = [(7,), (3, 5), (1,), (129, 33), (2, 3, 4), (1000,)]


@pytest.mark.parametrize("momentum", [0.995, 0.9, 0.0, 1.0, 0.3333])
def test_ema_bit_exact_fp32(momentum):
    params = [torch.randn(s) for s in SHAPES]
    params_m = [torch.randn(s) for s in SHAPES]
    expected = [p.clone() for p in params_m]
    reference.ema_update_(expected, params, momentum)
    albef_fast.ema_update_(params_m, params, momentum)
    for got, exp in zip(params_m, expected):
        assert torch.equal(got, exp)


def test_ema_on_parameters_in_place():
    p_m = nn.Parameter(torch.randn(10))
    storage = p_m.data_ptr()
    albef_fast.ema_update_([p_m], [torch.randn(10)], 0.5)
    assert p_m.data_ptr() == storage


@pytest.mark.skipif(not _extension.has_ops(), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ema_half_precision_op_rounds_once(dtype):
    """The C++ op computes in fp32 and rounds once per store (ALBEF's expression rounds 3 times)."""
    p, p_m = torch.randn(5000).to(dtype), torch.randn(5000).to(dtype)
    expected = (p_m.float() * 0.995 + p.float() * (1 - 0.995)).to(dtype)
    albef_fast.ema_update_([p_m], [p], 0.995)
    assert torch.equal(p_m, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ema_fallback_rounds_as_albef(monkeypatch, dtype):
    monkeypatch.setattr(_extension, "has_ops", lambda: False)
    p, p_m = torch.randn(5000).to(dtype), torch.randn(5000).to(dtype)
    expected = [p_m.clone()]
    reference.ema_update_(expected, [p], 0.995)
    albef_fast.ema_update_([p_m], [p], 0.995)
    assert torch.equal(p_m, expected[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
def test_ema_any_layout_gives_the_contiguous_bits(monkeypatch, dtype, ops):
    """channels_last weights and views: the C++ op required contiguous tensors until session 20."""
    use_state_ops(monkeypatch, ops)
    check_ema_layouts(dtype, "cpu")


@pytest.mark.parametrize("q,n,start", [(10, 3, 0), (10, 3, 8), (10, 10, 4), (7, 5, 6), (64, 5, 63), (5, 1, 4)])
def test_enqueue_matches_reference_with_wrap_around(q, n, start):
    queues = [torch.randn(4, q), torch.randn(3, q).to(torch.bfloat16), torch.full((1, q), -100)]
    items = [torch.randn(n, 4), torch.randn(n, 3), torch.arange(n).view(n, 1)]
    expected = [x.clone() for x in queues]
    ptr, ptr_ref = torch.tensor([start]), torch.tensor([start])
    reference.enqueue_(expected, items, ptr_ref)
    albef_fast.enqueue_(queues, items, ptr)
    assert ptr.tolist() == ptr_ref.tolist() == [(start + n) % q]
    for got, exp in zip(queues, expected):
        assert torch.equal(got, exp)


def test_enqueue_of_nothing_is_a_no_op():
    queue, ptr = torch.randn(2, 5), torch.tensor([3])
    before = queue.clone()
    albef_fast.enqueue_([queue], [torch.randn(0, 2)], ptr)
    assert torch.equal(queue, before) and ptr.item() == 3


def _pair():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    torch.manual_seed(2)
    model_m = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    return model, model_m


def test_momentum_updater_copy_and_update_match_albef():
    model, model_m = _pair()
    updater = albef_fast.MomentumUpdater([(model, model_m)], momentum=0.995)
    updater.copy_params()
    for p, p_m in zip(model.parameters(), model_m.parameters()):
        assert torch.equal(p, p_m) and not p_m.requires_grad
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    expected = [p.detach().clone() for p in model_m.parameters()]
    reference.ema_update_(expected, [p.detach() for p in model.parameters()], 0.995)
    updater.update()
    for got, exp in zip(model_m.parameters(), expected):
        assert torch.equal(got, exp)


def test_momentum_updater_takes_pairs_from_a_generator():
    """Walked once: the pairs are kept as a list (a generator left none to update before)."""
    model, model_m = _pair()
    updater = albef_fast.MomentumUpdater(pair for pair in [(model, model_m)])
    updater.copy_params()
    assert updater.model_pairs == [(model, model_m)]
    assert all(torch.equal(p, p_m) for p, p_m in zip(model.parameters(), model_m.parameters()))


def test_momentum_updater_follows_a_changed_parameter_set():
    model, model_m = _pair()
    updater = albef_fast.MomentumUpdater([(model, model_m)], momentum=0.5)
    updater.copy_params()
    updater.update()  # caches the parameter lists
    model.append(nn.Linear(3, 2))
    model_m.append(nn.Linear(3, 2))
    bias, bias_m = model[3].bias.detach().clone(), model_m[3].bias.detach().clone()
    updater.update()
    assert torch.equal(model_m[3].bias, bias_m * 0.5 + bias * 0.5)
    model.append(nn.Linear(2, 2))  # now the two parameter lists no longer pair up
    with pytest.raises(ValueError, match="params"):
        updater.update()


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
@pytest.mark.parametrize("convert", ["momentum model to fp16", "online model to fp64"])
def test_momentum_updater_names_a_pair_whose_dtype_changed_since_it_was_cached(monkeypatch, ops, convert):
    """model.half() keeps the Parameter objects, so the cached lists look unchanged: the fallback
    mixed the dtypes silently and the op raised a RuntimeError, until session 28."""
    use_state_ops(monkeypatch, ops)
    model, model_m = _pair()
    updater = albef_fast.MomentumUpdater([(model, model_m)], momentum=0.5)
    updater.copy_params()
    updater.update()  # caches the parameter lists
    if convert == "momentum model to fp16":
        model_m.half()
    else:
        model.double()
    before = [p.clone() for p in model_m.parameters()]
    with pytest.raises(ValueError, match=r"params\[0\]: expected \[.*like params_m\[0\]"):
        updater.update()
    assert all(torch.equal(p, b) for p, b in zip(model_m.parameters(), before))


def test_momentum_updater_takes_a_scheduled_momentum_and_checks_it():
    """Set per step by a schedule (MoCo v3's cosine ramp): used by the next update, checked when
    set (until session 28 a value out of [0, 1] went to the update unchecked)."""
    model, model_m = _pair()
    updater = albef_fast.MomentumUpdater([(model, model_m)], momentum=0.9)
    expected = [p_m.detach() * 0.25 + p.detach() * 0.75 for p_m, p in zip(model_m.parameters(), model.parameters())]
    updater.momentum = 0.25
    updater.update()
    assert all(torch.equal(got, exp) for got, exp in zip(model_m.parameters(), expected))
    with pytest.raises(ValueError, match=r"momentum: expected a value in \[0, 1\], got 1.5"):
        updater.momentum = 1.5
    with pytest.raises(TypeError, match="momentum"):
        updater.momentum = "0.9"
    assert updater.momentum == 0.25


def test_momentum_updater_rejects_bad_pairs():
    with pytest.raises(TypeError, match="model_pairs"):
        albef_fast.MomentumUpdater([(nn.Linear(2, 2),)])
    with pytest.raises(TypeError, match=r"model_pairs: expected a list of \(model, model_m\) pairs, got NoneType"):
        albef_fast.MomentumUpdater(None)
    with pytest.raises(TypeError, match=r"model_pairs\[0\]: expected a \(model, model_m\) pair"):
        albef_fast.MomentumUpdater((nn.Linear(2, 2), nn.Linear(2, 2)))  # one pair, not a list of pairs
    with pytest.raises(ValueError, match="momentum"):
        albef_fast.MomentumUpdater([_pair()], momentum=2.0)


def test_momentum_updater_rejects_a_momentum_model_sharing_parameters():
    """A pair naming one module twice (or a momentum model holding an online parameter) is
    rejected before copy_params() freezes the online model's parameter or update() runs."""
    online, other = nn.Linear(3, 2), nn.Linear(3, 2)
    shared = nn.Sequential(nn.Linear(3, 2))
    shared[0].bias = online.bias  # one online parameter held by the momentum model
    for pairs in ([(online, online)], [(online, shared)], [(other, nn.Linear(3, 2)), (online, shared)]):
        updater = albef_fast.MomentumUpdater(pairs)
        for step in (updater.copy_params, updater.update):
            with pytest.raises(ValueError, match=r"model_pairs\[\d\]: the momentum model's parameter"):
                step()
        assert online.weight.requires_grad and online.bias.requires_grad


_ZeroParamStatus = enum.Enum("ZeroParamStatus", "AVAILABLE NOT_AVAILABLE INFLIGHT")  # DeepSpeed's names


def _zero3_partition(params, status=_ZeroParamStatus.NOT_AVAILABLE):
    """What DeepSpeed ZeRO-3 does to a parameter outside its module's forward (one rank): the
    data moves to ds_tensor, the parameter keeps an empty tensor."""
    for p in params:
        if not hasattr(p, "ds_id"):
            p.ds_id, p.ds_shape, p.ds_numel = id(p), p.shape, p.numel()
        p.ds_tensor = p.data.reshape(-1).clone()
        p.data, p.ds_status = torch.empty(0, dtype=p.dtype), status


class _GatheredParameters:
    """deepspeed.zero.GatheredParameters on one rank: whole data while open; on exit the data
    is partitioned again, written back to ds_tensor only with a modifier_rank."""
    entered = []

    def __init__(self, params, modifier_rank=None):
        self.params = [p for p in params if hasattr(p, "ds_id")]
        self.modifier_rank = modifier_rank

    def __enter__(self):
        _GatheredParameters.entered.append((len(self.params), self.modifier_rank))
        for p in self.params:
            p.data, p.ds_status = p.ds_tensor.view(p.ds_shape).clone(), _ZeroParamStatus.AVAILABLE

    def __exit__(self, *exc):
        for p in self.params:
            written = p.data.reshape(-1).clone() if self.modifier_rank is not None else p.ds_tensor
            p.data, p.ds_status, p.ds_tensor = torch.empty(0, dtype=p.dtype), _ZeroParamStatus.NOT_AVAILABLE, written


def _whole(p):
    return p.ds_tensor.view(p.ds_shape)


def test_momentum_updater_gathers_zero3_partitioned_parameters(monkeypatch):
    """DeepSpeed ZeRO-3 leaves a parameter empty outside its module's forward: the EMA over the
    empty tensors changed nothing, silently (DeepSpeed 0.19.8 on this CPU: tests/deepspeed_
    check.py). The updater gathers them (online read only, momentum written back), also when
    copy_params() ran before deepspeed.initialize() converted the same Parameter objects;
    ema_update_ refuses them; a parameter ZeRO-3 is prefetching (inside the forward) is a
    RuntimeError before any write."""
    deepspeed = types.ModuleType("deepspeed")
    deepspeed.zero = types.SimpleNamespace(GatheredParameters=_GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    monkeypatch.setattr(_GatheredParameters, "entered", [])
    model, model_m = _pair()
    updater = albef_fast.MomentumUpdater([(model, model_m)], momentum=0.5)
    updater.copy_params()  # caches the lists before ZeRO-3 converts the parameters
    params, params_m = list(model.parameters()), list(model_m.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    _zero3_partition(params + params_m)
    expected = [_whole(p_m) * 0.5 + _whole(p) * 0.5 for p_m, p in zip(params_m, params)]
    updater.update()
    assert all(torch.equal(_whole(p_m), e) for p_m, e in zip(params_m, expected))
    assert _GatheredParameters.entered == [(len(params), None), (len(params_m), 0)]
    assert all(p.numel() == 0 for p in params + params_m)  # partitioned again
    with pytest.raises(RuntimeError, match="ema_update_: DeepSpeed ZeRO-3 has partitioned .*GatheredParameters"):
        albef_fast.ema_update_(params_m, params, 0.5)
    updater.copy_params()
    assert all(torch.equal(_whole(p_m), _whole(p)) for p_m, p in zip(params_m, params))
    shards = [p.ds_tensor.clone() for p in params_m]
    params[0].ds_status = _ZeroParamStatus.INFLIGHT
    with pytest.raises(RuntimeError, match="prefetch"):
        updater.update()
    assert all(torch.equal(p.ds_tensor, s) for p, s in zip(params_m, shards))


@pytest.mark.skipif(not _extension.has_ops(), reason="the C++ extension registers the ops")
def test_state_ops_run_on_devices_without_a_cpp_kernel():
    """MPS, XPU and PrivateUse1 tensors reach the ops' default kernel (albef_fast/_default_ops.py:
    the fallbacks), where the dispatcher had none (NotImplementedError on an ITCLoss step on MPS).
    That kernel, run on CPU tensors through a PrivateUse1 key set: ALBEF's bits, and the C++ ops'
    checks before any write."""
    for name in ("albef_fast::ema_update_", "albef_fast::enqueue_"):
        for key in ("MPS", "XPU", "PrivateUse1", "CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, key), (name, key)
    other = torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1)
    ema, enqueue = torch.ops.albef_fast.ema_update_.default, torch.ops.albef_fast.enqueue_.default
    params_m, params = [torch.randn(5, 3), torch.randn(4).bfloat16()], [torch.randn(5, 3), torch.randn(4).bfloat16()]
    expected = [p.clone() for p in params_m]
    reference.ema_update_(expected, params, 0.995)
    ema.redispatch(other, params_m, params, 0.995)
    assert all(torch.equal(a, b) for a, b in zip(params_m, expected))
    queues, ptr = [torch.randn(4, 10), torch.full((1, 10), -1)], torch.tensor([8])
    items = [torch.randn(3, 4), torch.arange(3).view(3, 1)]
    expected, ptr_ref = [q.clone() for q in queues], ptr.clone()
    reference.enqueue_(expected, items, ptr_ref)
    enqueue.redispatch(other, queues, items, ptr)
    assert torch.equal(ptr, ptr_ref) and all(torch.equal(a, b) for a, b in zip(queues, expected))
    before = [p.clone() for p in params_m]
    with pytest.raises(ValueError, match=r"params\[1\]"):
        ema.redispatch(other, params_m, [params[0], params[1].float()], 0.5)
    with pytest.raises(ValueError, match=r"params_m\[0\]"):
        ema.redispatch(other, [torch.zeros(3).expand(5, 3), params_m[1]], params, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(params_m, before))
    with pytest.raises(ValueError, match=r"queues\[0\]"):
        enqueue.redispatch(other, [torch.zeros(4, 1).expand(4, 10), queues[1]], items, ptr)


def test_fsdps_registry_is_read_without_its_iteration_guard_when_compiling(monkeypatch):
    """torch.compile before torch 2.11 cannot trace a WeakKeyDictionary's values() (their iteration
    guard, a context manager: "unhashable type ... GenericContextWrappingVariable" on 2.9 and 2.10),
    which the FSDP2 check of a MomentumUpdater's first update reads: a compiled training step with
    update() inside failed to trace. Compiling, the check reads the dict beneath (a copy); eagerly,
    values() as before. The same states either way."""
    import weakref

    from torch.distributed import _composable_state
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    from albef_fast import _sharding

    class GuardedValues(weakref.WeakKeyDictionary):
        def values(self):
            assert not torch.compiler.is_compiling(), "values() iterated under its guard while compiling"
            return super().values()

    module, state = nn.Linear(2, 2), FSDPState()
    registry = GuardedValues({module: weakref.ref(state), nn.Linear(2, 2): None})  # a second key, collected
    monkeypatch.setattr(_composable_state, "_module_state_mapping", registry)
    assert _sharding._fsdp_states() == [state]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _sharding._fsdp_states() == [state]


@pytest.mark.parametrize("ops", [True, False], ids=["op", "fallback"])
def test_updater_refuses_a_model_pair_nested_in_another(monkeypatch, ops):
    """[(model, model_m), (model.head, model_m.head)] lists the head's momentum parameters twice:
    one launch would write them twice at once on CUDA. A ValueError naming them, nothing updated;
    copy_params() (copies, twice) is harmless and still works."""
    use_state_ops(monkeypatch, ops)
    model, model_m = [nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)) for _ in range(2)]
    updater = albef_fast.MomentumUpdater([(model, model_m), (model[1], model_m[1])], momentum=0.5)
    updater.copy_params()
    assert all(torch.equal(p_m, p) for p_m, p in zip(model_m.parameters(), model.parameters()))
    with torch.no_grad():
        model[1].weight.add_(1.0)
    before = [p.clone() for p in model_m.parameters()]
    with pytest.raises(ValueError, match=r"params_m\[2\]: shares memory with params_m\[4\] \(the same tensor listed"):
        updater.update()
    assert all(torch.equal(p, b) for p, b in zip(model_m.parameters(), before))
