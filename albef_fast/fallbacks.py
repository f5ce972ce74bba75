"""Pure-PyTorch implementations of the state ops, used when the C++ extension is not built.

Both match ALBEF's numbers bit for bit, in every dtype: the EMA rounds as
``p_m * m + p * (1. - m)`` does (two products rounded to the parameter dtype, then a rounded
add), and the enqueue writes the same columns. Neither reads a device value on the host.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch

__all__ = ["ema_update_", "enqueue_"]

# Bounds the temporary `p * (1 - m)` of one group of tensors.
_EMA_GROUP_BYTES = 64 << 20


def _groups(params_m: List[torch.Tensor], params: List[torch.Tensor]) -> Iterator[Tuple[list, list]]:
    group_m, group, size = [], [], 0
    for p_m, p in zip(params_m, params):
        group_m.append(p_m)
        group.append(p)
        size += p.numel() * p.element_size()
        if size >= _EMA_GROUP_BYTES:
            yield group_m, group
            group_m, group, size = [], [], 0
    if group:
        yield group_m, group


@torch.no_grad()
def ema_update_(params_m: List[torch.Tensor], params: List[torch.Tensor], momentum: float) -> None:
    """In place p_m <- p_m * m + p * (1 - m), rounded exactly as ALBEF's expression.

    fp32 / fp64 go through the multi-tensor (_foreach) kernels, which round as the plain
    expression does for them; 16-bit tensors take ALBEF's expression itself, since the
    _foreach kernels round the fp16 scalar differently on the CPU.
    """
    wide = [(p_m, p) for p_m, p in zip(params_m, params) if p.dtype in (torch.float32, torch.float64)]
    for group_m, group in _groups([pair[0] for pair in wide], [pair[1] for pair in wide]):
        scaled = torch._foreach_mul(group, 1.0 - momentum)
        torch._foreach_mul_(group_m, momentum)
        torch._foreach_add_(group_m, scaled)
    for p_m, p in zip(params_m, params):
        if p.dtype not in (torch.float32, torch.float64):
            torch.add(p_m * momentum, p * (1.0 - momentum), out=p_m)


@torch.no_grad()
def enqueue_(queues: Sequence[torch.Tensor], items: Sequence[torch.Tensor], ptr: torch.Tensor) -> None:
    """Write items[k].T into queues[k] at columns ptr, ptr+1, ... (mod Q); advance ptr by N mod Q."""
    n, q = items[0].shape[0], queues[0].shape[1]
    cols = torch.arange(n, device=ptr.device).add_(ptr.view(())).remainder_(q)
    for queue, item in zip(queues, items):
        queue.index_copy_(1, cols, item.detach().T.to(queue.dtype))
    ptr.add_(n).remainder_(q)
