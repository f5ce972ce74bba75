"""What ITCLoss needs from torch.distributed: ALBEF's concat_all_gather (rank order), the
first-step broadcast of the queues, and a check that every rank brings the same batch size.

Without an initialized process group every function is the one-process identity.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_initialized", "world_size", "gather_rows", "broadcast_", "check_equal_rows"]

# _cpu_group's (default group it was made under, gloo group) where the default group is not gloo
_CPU_GROUP: Optional[Tuple[object, object]] = None

# torch 2.13 deprecates all_gather_into_tensor for all_gather_single (a FutureWarning per call);
# older releases may lack the new name (neither exists in a torch built without distributed
# support, where nothing calls it)
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
try:  # what torch.compile traces (c10d's in-place collectives break a fullgraph trace)
    from torch.distributed import _functional_collectives as _funcol
except ImportError:  # a torch built without distributed support
    _funcol = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] on every rank -> [world * N, ...] in rank order; x itself without a process group."""
    if world_size() == 1:
        return x
    x = x.detach().contiguous()
    if torch.compiler.is_compiling():
        return _funcol.all_gather_tensor(x, 0, dist.group.WORLD)
    out = x.new_empty((world_size() * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x)
    return out


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite the tensors on every rank with rank src's, in place."""
    if world_size() == 1:
        return
    for t in tensors:
        if torch.compiler.is_compiling():
            t.copy_(_funcol.broadcast(t, src, dist.group.WORLD))
        else:
            dist.broadcast(t, src)


def _cpu_group():
    """A gloo group for host-side values: the default group if it is gloo (nothing kept, so that
    destroy_process_group leaves no reference to it here), else one made under the default group
    on first use and again under each new default group; first use must come at the same step
    on every rank (new_group is collective)."""
    global _CPU_GROUP
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world
    if _CPU_GROUP is None or _CPU_GROUP[0] is not world:
        _CPU_GROUP = (world, dist.new_group(backend="gloo"))
    return _CPU_GROUP[1]


def check_equal_rows(name: str, n: int) -> None:
    """Raise ValueError on every rank unless all ranks pass the same n.

    The sizes travel as CPU tensors over gloo: no device synchronization in the step. Not under
    torch.compile, which cannot trace a host-side exchange (uneven batches then fail in the
    gather, as they would in ALBEF's concat_all_gather).
    """
    if world_size() == 1 or torch.compiler.is_compiling():
        return
    # on the CPU whatever the default device (torch.set_default_device("cuda") would sync here)
    sizes = [torch.zeros(1, dtype=torch.long, device="cpu") for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], device="cpu"), group=_cpu_group())
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"{name}: every rank must bring the same batch size to keep the queues identical, "
                         f"got {sizes} by rank (drop the uneven last batch, e.g. DataLoader(drop_last=True))")
