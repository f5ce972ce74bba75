"""What ITCLoss needs from torch.distributed: ALBEF's concat_all_gather, in rank order."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_initialized", "world_size", "gather_rows"]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] on every rank -> [world * N, ...], rank order; x itself without a process group."""
    if world_size() == 1:
        return x
    x = x.detach().contiguous()
    out = x.new_empty((world_size() * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x)
    return out
