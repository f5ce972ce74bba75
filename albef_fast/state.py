"""The state around the loss: the momentum-encoder EMA and the circular feature queue.

Both run the registered C++ ops (csrc/) when the extension is built, else the pure-PyTorch
fallbacks; either way they are validated first and change nothing on bad input.
"""
from __future__ import annotations

import collections.abc
import contextlib
from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

from . import _extension, _sharding, _validate, fallbacks

__all__ = ["ema_update_", "enqueue_", "MomentumUpdater"]


def ema_update_(params_m: Iterable[torch.Tensor], params: Iterable[torch.Tensor], momentum: float) -> None:
    """In place, for every pair: p_m <- p_m * m + p * (1 - m) (bit-exact to ALBEF for fp32).

    params_m, params: matching sequences of tensors (same shape, dtype, device per pair; any
    layout: channels_last weights and views too; pairs may sit on several GPUs, not on the CPU
    and a GPU in one call; DTensors, as FSDP2's fully_shard keeps them, pairwise laid out alike,
    update shard by shard); momentum: float in [0, 1].
    """
    params_m, params = _validate.tensors("params_m", params_m), _validate.tensors("params", params)
    params_m, params = _sharding.local_pairs(params_m, params)
    _check_not_partitioned(params_m + params)
    _validate.ema_inputs(params_m, params, momentum)
    _ema_update_checked(params_m, params, float(momentum))


@torch.no_grad()
def _ema_update_checked(params_m: List[torch.Tensor], params: List[torch.Tensor], momentum: float) -> None:
    if not params_m:
        return
    if _extension.has_ops():  # the op checks for overlapping params_m itself, and for aliases (csrc/checks.h)
        torch.ops.albef_fast.ema_update_(params_m, params, momentum)
    else:
        _validate.writable("params_m", params_m)
        _validate.ema_disjoint(params_m, params)
        fallbacks.ema_update_(params_m, params, momentum)


def enqueue_(queues: Sequence[torch.Tensor], items: Sequence[torch.Tensor], ptr: torch.Tensor) -> None:
    """Write items[k] ([N, D_k]) as columns of queues[k] ([D_k, Q]) from ptr on, wrapping around.

    ptr: 1-element int64 tensor on the queues' device, read and advanced by N (mod Q) there,
    with no host synchronization. Ids go in as [N, 1] items into a [1, Q] id queue.
    """
    _validate.enqueue_inputs(queues, items, ptr)
    if items[0].shape[0] == 0:
        return
    if _extension.has_ops():  # the op checks for overlapping queues itself, and for aliases (csrc/checks.h)
        torch.ops.albef_fast.enqueue_(list(queues), [item.detach() for item in items], ptr)
    else:
        _validate.writable("queues", queues)
        _validate.enqueue_disjoint(queues, items, ptr)
        fallbacks.enqueue_(queues, items, ptr)


def _check_not_shared(model_pairs, params) -> None:
    """A momentum model holding one of the online parameters (a pair naming one module twice)
    would have copy_params() freeze that parameter for the online model too: raised instead."""
    online = set(map(id, params))
    for k, (_, model_m) in enumerate(model_pairs):
        for name, p_m in model_m.named_parameters():
            if id(p_m) in online:
                raise ValueError(f"model_pairs[{k}]: the momentum model's parameter {name!r} is also a parameter of "
                                 "the online models (copy_params() would freeze it); the momentum model must be a "
                                 "separate copy, e.g. copy.deepcopy(model)")


def _check_not_gathered(params) -> None:
    """Inside the forward of a module sharded by FSDP2 (where ALBEF calls _momentum_update), and
    after a no-grad forward of a momentum model sharded as a root, the parameters are gathered
    copies: the update would not reach the shards, silently."""
    if _sharding.gathered_by_fsdp(params):
        raise RuntimeError("MomentumUpdater: the models' parameters are FSDP2's gathered copies, which the shards "
                           "(what optimizers and checkpoints see) would never get: the update would be lost. Call "
                           "update() before the sharded model's forward, not inside it; a momentum model that FSDP2 "
                           "leaves gathered after its no-grad forward (a root of its own keeps its parameters for a "
                           "backward, as does reshard_after_forward=False): call its reshard() after that forward, "
                           "or shard it with fully_shard(model_m, reshard_after_forward=True)")


def _check_not_partitioned(params) -> None:
    """Outside the forward of its module a DeepSpeed ZeRO-3 parameter is an empty tensor: the EMA
    would change nothing, silently."""
    if _sharding.zero3_statuses(params) - {"AVAILABLE"}:
        raise RuntimeError("ema_update_: DeepSpeed ZeRO-3 has partitioned these parameters (each is an empty tensor "
                           "outside its module's forward, its shard in ds_tensor): the update would change nothing. "
                           "Use MomentumUpdater, which gathers them, or call it inside `with deepspeed.zero."
                           "GatheredParameters(params_m + params, modifier_rank=0):`, which writes the result back "
                           "to the partitions on exit")


ZERO3_INFLIGHT_ERROR = (
    "MomentumUpdater: DeepSpeed ZeRO-3 is fetching some of the models' parameters for the forward now "
    "(its prefetch), and they can be neither gathered for the update nor partitioned after it: call update() "
    "before the engine's forward, not inside the model's forward (where ALBEF calls _momentum_update()), or turn "
    "the prefetch off (\"stage3_prefetch_bucket_size\": 0 in the zero_optimization config)")


class MomentumUpdater:
    """ALBEF's momentum encoders: ``copy_params()`` once, ``update()`` every step.

    model_pairs: [(model, model_m), ...] whose parameters() zip one to one, as in ALBEF; a
    momentum model holding one of the online parameters is rejected (ValueError).
    The parameter lists are cached and rebuilt (and checked) when a model's parameter set changes.
    Models sharded by FSDP2's ``fully_shard`` (DTensor parameters) update shard by shard, with no
    collective, when the online and momentum models are sharded alike. DeepSpeed ZeRO-3's
    partitioned parameters are gathered for each call (a collective: every rank calls it, as
    every rank steps) and the momentum ones written back to their partitions.
    """

    def __init__(self, model_pairs: Sequence[Tuple[nn.Module, nn.Module]], momentum: float = 0.995):
        self.momentum = momentum  # checked first, by the setter
        if isinstance(model_pairs, nn.Module) or not isinstance(model_pairs, collections.abc.Iterable):
            raise TypeError(f"model_pairs: expected a list of (model, model_m) pairs, got {type(model_pairs).__name__}")
        model_pairs = list(model_pairs)  # a generator is walked once
        for k, pair in enumerate(model_pairs):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(m, nn.Module) for m in pair)):
                raise TypeError(f"model_pairs[{k}]: expected a (model, model_m) pair of nn.Modules, got {pair!r:.80}")
        self.model_pairs = [tuple(pair) for pair in model_pairs]
        self._key: tuple = ()
        self._lists: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
        self._sharded = self._zero3_found = False  # FSDP2's DTensors; DeepSpeed ZeRO-3's parameters

    @property
    def momentum(self) -> float:
        return self._momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        # a schedule may set it every step (MoCo v3's cosine ramp): checked here, not per update
        self._momentum = _validate.unit_interval("momentum", value)

    def _param_lists(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(params_m, params) as the models hold them now, unchecked."""
        params = [p for model, _ in self.model_pairs for p in model.parameters()]
        params_m = [p for _, model_m in self.model_pairs for p in model_m.parameters()]
        return params_m, params

    def _params(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        params_m, params = self._param_lists()
        key = tuple(map(id, params + params_m))
        if key != self._key:
            _check_not_shared(self.model_pairs, params)
            _check_not_gathered(params_m + params)
            _validate.ema_inputs(*_sharding.local_pairs(params_m, params), self.momentum)
            self._key, self._lists = key, (params_m, params)
            self._sharded = _sharding.any_dtensor(params_m + params)
        return self._lists

    def _zero3(self) -> bool:
        """Whether the models hold DeepSpeed ZeRO-3 parameters. ALBEF calls copy_params() when the
        model is built, before deepspeed.initialize() converts the same Parameter objects (zero.Init
        converts them as they are made): a model's first parameter tells, at every call while
        DeepSpeed is imported and none was found yet."""
        if not self._zero3_found and _sharding.deepspeed_imported():
            firsts = [next(model.parameters(), None) for pair in self.model_pairs for model in pair]
            self._zero3_found = _sharding.any_zero3([p for p in firsts if p is not None])
        return self._zero3_found

    @contextlib.contextmanager
    def _gathered(self):
        """The ZeRO-3 parameters whole while open (_sharding.zero3_gathered); one that ZeRO-3's
        prefetch holds in flight is a RuntimeError, before any write."""
        params_m, params = self._param_lists()
        if "INFLIGHT" in _sharding.zero3_statuses(params_m + params):
            raise RuntimeError(ZERO3_INFLIGHT_ERROR)
        with _sharding.zero3_gathered(params_m, params):
            yield

    def _local(self, params_m: List[torch.Tensor], params: List[torch.Tensor]):
        # FSDP2 may swap a DTensor's local shard (its lazy init does): unwrapped at every update,
        # the pairs' layouts checked when cached
        if not self._sharded:
            return params_m, params
        return _sharding.local_shards(params_m), _sharding.local_shards(params)

    @torch.no_grad()
    def copy_params(self) -> None:
        """p_m <- p for every pair, and freeze the momentum copies (requires_grad False)."""
        with self._gathered() if self._zero3() else contextlib.nullcontext():
            params_m, params = self._params()
            for p_m, p in zip(params_m, params):
                p_m.copy_(p)
                p_m.requires_grad_(False)

    def update(self) -> None:
        """One EMA step: p_m <- p_m * momentum + p * (1 - momentum), in place."""
        if self._zero3():
            with self._gathered():
                self._update()
        else:
            self._update()

    def _update(self) -> None:
        params_m, params = self._local(*self._params())  # validated when the parameter set was cached
        # model.half() or .to() since then keeps the Parameter objects: the op checks every pair
        # before its first write (csrc/checks.h), the fallback would mix dtypes or devices
        if not _extension.has_ops():
            _validate.ema_inputs(params_m, params, self.momentum)
        _ema_update_checked(params_m, params, self.momentum)
