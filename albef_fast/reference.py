"""ALBEF's own formulation of the ITC block, in plain PyTorch.

This is the baseline every test and benchmark compares against. It follows ALBEF's
``model_pretrain.py`` / ``model_retrieval.py`` line for line (clone + cat of the queues,
B x (B+Q) logits, ``int(queue_ptr)``), so it is deliberately *not* fast.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["itc_loss", "itc_logits", "ema_update_", "enqueue_", "enqueue_slices_"]


def itc_logits(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits [B, B+Q] of both directions, as ALBEF builds them."""
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    return sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m


def _hard_targets(sim: torch.Tensor, idx: Optional[torch.Tensor], idx_queue: Optional[torch.Tensor]):
    if idx is None:
        sim_targets = torch.zeros(sim.size(), device=sim.device, dtype=sim.dtype)
        sim_targets.fill_diagonal_(1)
        return sim_targets
    idx = idx.view(-1, 1)
    idx_all = torch.cat([idx.t(), idx_queue.view(1, -1).clone().detach()], dim=1)
    pos_idx = torch.eq(idx, idx_all).to(sim.dtype)
    return pos_idx / pos_idx.sum(1, keepdim=True)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp,
    alpha: float = 0.4,
    idx: Optional[torch.Tensor] = None,
    idx_queue: Optional[torch.Tensor] = None,
    return_logits: bool = False,
):
    """ALBEF's ``loss_ita`` (and optionally its i2t / t2i parts and logits).

    image_feat, text_feat, image_feat_m, text_feat_m: [B, D]; image_queue, text_queue: [D, Q];
    temp: float or 0-dim tensor; idx: [B] and idx_queue: [Q] or [1, Q] select retrieval targets.
    Returns loss_ita, or (loss_ita, loss_i2t, loss_t2i, sim_i2t, sim_t2i) when return_logits.
    """
    sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m = itc_logits(
        image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp
    )
    with torch.no_grad():
        sim_targets = _hard_targets(sim_i2t_m, idx, idx_queue)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2
    if return_logits:
        return loss_ita, loss_i2t, loss_t2i, sim_i2t, sim_t2i
    return loss_ita


@torch.no_grad()
def ema_update_(params_m: Iterable[torch.Tensor], params: Iterable[torch.Tensor], momentum: float) -> None:
    """ALBEF's ``_momentum_update``: one ``p_m * m + p * (1. - m)`` per parameter pair."""
    for param_m, param in zip(params_m, params):
        param_m.data = param_m.data * momentum + param.data * (1.0 - momentum)


@torch.no_grad()
def enqueue_(queues: Sequence[torch.Tensor], items: Sequence[torch.Tensor], ptr: torch.Tensor) -> None:
    """ALBEF's ``_dequeue_and_enqueue`` (without the gather), host sync and all.

    Unlike ALBEF it wraps around instead of asserting that Q is a multiple of N, so that it
    can serve as the reference for albef_fast.enqueue_ at any N <= Q.
    """
    n = items[0].shape[0]
    q = queues[0].shape[1]
    start = int(ptr)
    cols = [(start + i) % q for i in range(n)]
    for queue, item in zip(queues, items):
        queue[:, cols] = item.T.to(queue.dtype)
    ptr[0] = (start + n) % q


@torch.no_grad()
def enqueue_slices_(queues: Sequence[torch.Tensor], items: Sequence[torch.Tensor], ptr: torch.Tensor) -> None:
    """ALBEF's _dequeue_and_enqueue body as written (no gather, no wrap-around: Q % N == 0 assumed):
    int(queue_ptr), slice writes, ptr update. The baseline of the enqueue benchmark."""
    start = int(ptr)
    n = items[0].shape[0]
    for queue, item in zip(queues, items):
        queue[:, start:start + n] = item.T
    ptr[0] = (start + n) % queues[0].shape[1]
