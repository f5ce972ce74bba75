"""Sharded parameters (FSDP2's ``fully_shard``, tensor parallelism): the EMA works shard by shard.

Between steps FSDP2 holds parameters as DTensors. The EMA is elementwise, so a pair of DTensors
laid out alike (same mesh, placements and global shape) is updated by updating the two local
shards: the state ops never see a DTensor (they have no sharding rule) and no collective runs.
Inside a sharded module's forward FSDP2 swaps in gathered copies, which it discards afterwards:
an update there (where ALBEF calls ``_momentum_update()``) would be lost, so it is detected.
DeepSpeed ZeRO-3 leaves each parameter an empty tensor outside the forward of its module (its
shard in ``ds_tensor``): an update there would change nothing. MomentumUpdater gathers them
for the update (``zero3_gathered``); ``ema_update_`` detects them.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from typing import List, Tuple

import torch

__all__ = ["any_dtensor", "local_pairs", "local_shards", "gathered_by_fsdp", "deepspeed_imported", "any_zero3",
           "zero3_statuses", "zero3_gathered"]


def _dtensor_type():
    # no DTensor exists unless its module was imported: a plain model pays one dict lookup
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def any_dtensor(tensors) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def _layout(p) -> str:
    return f"{list(p.shape)} on {p.device_mesh} as {list(p.placements)}"


def _check_pair(k: int, p_m, p, dtensor) -> None:
    if isinstance(p_m, dtensor) != isinstance(p, dtensor):
        sharded, plain = ("params_m", "params") if isinstance(p_m, dtensor) else ("params", "params_m")
        raise ValueError(f"{sharded}[{k}] is a DTensor (a sharded model, e.g. FSDP2's fully_shard) but {plain}[{k}] "
                         "is not: shard the online and the momentum models alike")
    if isinstance(p, dtensor) and (p.shape != p_m.shape or p.device_mesh != p_m.device_mesh
                                   or tuple(p.placements) != tuple(p_m.placements)):
        raise ValueError(f"params[{k}]: expected a DTensor laid out like params_m[{k}] ({_layout(p_m)}), "
                         f"got {_layout(p)}: shard the online and the momentum models alike")


@torch.no_grad()
def local_pairs(params_m: List[torch.Tensor], params: List[torch.Tensor]) -> Tuple[list, list]:
    """The pairs with every DTensor replaced by its local shard (writes to it reach the DTensor).

    A DTensor paired with a plain tensor, or with a DTensor laid out otherwise, is a ValueError
    naming the pair. Lists of unequal length are returned as they are, for the caller's check.
    """
    dtensor = _dtensor_type()
    if dtensor is None or len(params_m) != len(params) or not any_dtensor(params_m + params):
        return params_m, params
    for k, (p_m, p) in enumerate(zip(params_m, params)):
        _check_pair(k, p_m, p, dtensor)
    return local_shards(params_m), local_shards(params)


def local_shards(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Each DTensor's local shard, other tensors as they are; no checks (local_pairs checks)."""
    dtensor = _dtensor_type()
    return [_shard(t) if isinstance(t, dtensor) else t for t in tensors]


def _shard(t) -> torch.Tensor:
    # the shard itself, as FSDP2 reads it: to_local() makes a new view of a parameter's shard at
    # every call, several times the time for ALBEF's 822 tensors, which update() unwraps every step
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()


def _fsdp_states():
    # FSDP2 keeps no public registry of its states; this private one may change: then no check
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
        # a WeakKeyDictionary: torch.compile before torch 2.11 cannot trace its values() (their
        # iteration guard), so a compiled trace reads the dict beneath, a copy taken at once
        refs = list(_module_state_mapping.data.copy().values() if torch.compiler.is_compiling()
                    else _module_state_mapping.values())
    except (ImportError, AttributeError):
        return []
    states = [ref() if isinstance(ref, weakref.ref) else ref for ref in refs]  # weak in 2.13 and 2.14
    return [state for state in states if isinstance(state, FSDPState)]


def gathered_by_fsdp(tensors) -> bool:
    """Whether any of the tensors is a gathered (unsharded) copy of an FSDP2 parameter, which FSDP2
    swaps in for a forward or backward and discards after it, in-place writes and all."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    gathered = set()
    for state in _fsdp_states():
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # releases before multiple groups per module
            groups = [getattr(state, "_fsdp_param_group", None)]
        for group in filter(None, groups):
            copies = (getattr(param, "_unsharded_param", None) for param in group.fsdp_params)  # after 1st gather
            gathered.update(id(copy) for copy in copies if copy is not None)
    return any(id(t) in gathered for t in tensors)


def deepspeed_imported() -> bool:
    return "deepspeed" in sys.modules


def any_zero3(tensors) -> bool:
    """Whether any of the tensors is a DeepSpeed ZeRO-3 parameter (it carries ``ds_id``)."""
    return deepspeed_imported() and any(hasattr(t, "ds_id") for t in tensors)


def zero3_statuses(tensors) -> set:
    """The ds_status names of the ZeRO-3 parameters among the tensors: AVAILABLE (whole),
    NOT_AVAILABLE (an empty tensor, its shard in ds_tensor) or INFLIGHT (being fetched, as the
    prefetch for a forward's coming submodules does: it can be neither gathered nor partitioned)."""
    if not deepspeed_imported():
        return set()
    statuses = (getattr(t, "ds_status", None) for t in tensors)
    return {getattr(status, "name", status) for status in statuses if status is not None}


@contextlib.contextmanager
def zero3_gathered(params_m, params):
    """Whole ZeRO-3 parameters while open, through DeepSpeed's GatheredParameters (a collective:
    every rank enters, as every rank updates at each step): params read only, params_m written
    back to their partitions from rank 0's copies on exit (every rank computes the same EMA).
    Tensors that are not ZeRO-3 parameters pass through as they are."""
    gathered = sys.modules["deepspeed"].zero.GatheredParameters  # deepspeed.zero: an attribute, not a module

    with gathered(list(params)), gathered(list(params_m), modifier_rank=0):
        yield
