"""``ITCLoss``: the drop-in nn.Module for ALBEF's ITC block, queues and temperature included."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate, distributed
from .functional import ITCOutput, itc_loss, resolve_backend
from .state import enqueue_

__all__ = ["ITCLoss"]


class ITCLoss(nn.Module):
    """ALBEF's image-text contrastive loss with momentum distillation and feature queues.

    Keeps ALBEF's names and shapes, so an ALBEF checkpoint's entries load into it:
    ``image_queue``/``text_queue`` [D, Q] (L2-normalized columns), ``queue_ptr`` [1] int64,
    ``idx_queue`` [1, Q] int64 filled with -100 (only with use_idx), ``temp`` a 0-dim Parameter.
    A BLIP retrieval checkpoint's ``ptr_queue`` loads as ``queue_ptr``. FSDP2's ``fully_shard``
    takes no 0-dim parameter: ``itc.temp = nn.Parameter(itc.temp.detach().reshape(1))`` first
    (a [1] temp loads a 0-dim one from a checkpoint, and the other way round).

    forward(image_feat, text_feat, image_feat_m, text_feat_m, alpha=None, idx=None) -> ITCOutput:
    clamps temp in place to [0.001, 0.5] (unless clamp_temp=False, as ALBEF's retrieval model),
    computes the loss against the queues as they were, then enqueues the momentum features
    (gathered from all ranks under torch.distributed) and ids at queue_ptr. In eval mode
    (``module.eval()``, e.g. a validation step that reuses the training step) it changes nothing,
    as BatchNorm leaves its statistics: the loss against the queues with temp clamped out of
    place, no enqueue, no collective, any batch size on any rank (a RuntimeWarning where that loss
    takes gradients: a model trained in eval mode would never fill its queues).

    Under torch.distributed: the first forward broadcasts rank 0's queues and ptr, so ranks
    seeded differently agree from the start; every step then enqueues the same gathered rows on
    every rank, so the queues stay identical (DDP without its per-forward buffer sync,
    forward_sync_buffers=False or, before torch 2.14, broadcast_buffers=False, is safe and
    cheaper); every rank must bring the same batch size (checked on the host over gloo, no device
    sync).
    The loss of each rank uses its local batch plus the queue, as in ALBEF.
    """

    def __init__(self, embed_dim: int = 256, queue_size: int = 65536, temp: float = 0.07, alpha: float = 0.4, *,
                 clamp_temp: bool = True, use_idx: bool = False, queue_dtype: torch.dtype = torch.float32):
        super().__init__()
        embed_dim, queue_size = _validate.count("embed_dim", embed_dim), _validate.count("queue_size", queue_size)
        if queue_dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"queue_dtype: expected one of {list(_validate.FLOAT_DTYPES)}, got {queue_dtype}")
        _validate.temperature(temp, torch.device("cpu"))
        self.alpha = _validate.unit_interval("alpha", alpha)
        self.clamp_temp = clamp_temp
        self.use_idx = use_idx
        self._temp_init = float(temp)
        self.register_buffer("image_queue", torch.empty(embed_dim, queue_size, dtype=queue_dtype))
        self.register_buffer("text_queue", torch.empty(embed_dim, queue_size, dtype=queue_dtype))
        self.register_buffer("queue_ptr", torch.empty(1, dtype=torch.long))
        if use_idx:
            self.register_buffer("idx_queue", torch.empty(1, queue_size, dtype=torch.long))
        self.temp = nn.Parameter(torch.empty([]))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ALBEF's initial state, in place: unit-norm random queue columns, ptr 0, ids -100 and temp
        as constructed. For a module built on the meta device and materialized by ``to_empty()``
        (FSDP's meta-device init calls it, as it does nn.Linear's)."""
        for queue in (self.image_queue, self.text_queue):
            queue.copy_(F.normalize(torch.randn(queue.shape, device=queue.device), dim=0))
        self.queue_ptr.zero_()
        if self.use_idx:
            self.idx_queue.fill_(-100)
        self.temp.fill_(self._temp_init)
        self._queues_synced = False  # under torch.distributed: rank 0's queues are broadcast once

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[1]

    def forward(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                text_feat_m: torch.Tensor, alpha: Optional[float] = None,
                idx: Optional[torch.Tensor] = None) -> ITCOutput:
        alpha = self.alpha if alpha is None else alpha
        idx_queue = self._check(image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx)
        temp = self._prepare(image_feat, text_feat)
        temp = temp if temp.dim() == 0 else temp.view(())  # [1] for FSDP2 (README): the C++ entry takes 0-dim
        out = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue, self.text_queue,
                       temp, alpha, idx=idx, idx_queue=idx_queue, return_details=True)
        if self.training:
            self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx)
        return out

    def _prepare(self, image_feat, text_feat) -> torch.Tensor:
        """The temperature the loss reads. Training: rank 0's queues broadcast once, temp clamped in
        place. Evaluation changes no state: temp clamped out of place, no collective."""
        if not self.training:
            self._warn_if_training_in_eval(image_feat, text_feat)
            return self.temp.clamp(0.001, 0.5) if self.clamp_temp else self.temp
        if distributed.world_size() > 1 and not self._queues_synced:
            distributed.broadcast_(self._state_buffers())
            self._queues_synced = True
        if self.clamp_temp:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        return self.temp

    @staticmethod
    def _warn_if_training_in_eval(image_feat, text_feat) -> None:
        # a model trained in eval mode (to turn dropout off) would otherwise never fill its queues
        taking_grads = torch.is_grad_enabled() and (image_feat.requires_grad or text_feat.requires_grad)
        if taking_grads and not torch.compiler.is_compiling():
            warnings.warn("ITCLoss is in eval mode while its loss takes gradients: the queues are not updated and "
                          "temp is not clamped in place; call module.train() to train", RuntimeWarning, stacklevel=3)

    def _check(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx):
        """Everything forward needs, checked before the temp clamp or any write."""
        if self.use_idx != (idx is not None):
            raise ValueError("idx: required when use_idx=True, not accepted otherwise; "
                             f"use_idx={self.use_idx}, got {'None' if idx is None else 'a tensor'}")
        idx_queue = self.idx_queue if self.use_idx else None
        d = self.image_queue.shape[0]
        if isinstance(image_feat, torch.Tensor) and image_feat.dim() == 2 and image_feat.shape[1] != d:
            raise ValueError(f"image_feat: expected [B, {d}] (embed_dim = {d}), got {list(image_feat.shape)}")
        if isinstance(image_feat, torch.Tensor) and image_feat.device != self.image_queue.device:
            raise ValueError(f"image_feat: expected a tensor on {self.image_queue.device}, where the module's queues "
                             f"are, got {image_feat.device}; move the module with .to({str(image_feat.device)!r})")
        # With the clamp (ALBEF's forward clamps first) temp is positive when the loss reads it, even
        # where an optimizer step left it <= 0, which the CPU check (it reads the value) would reject
        temp = 0.5 if self.clamp_temp else self.temp  # a positive stand-in
        _validate.itc_inputs(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue, self.text_queue,
                             temp, alpha, idx, idx_queue, None, None)
        resolve_backend(None, None, image_feat, self.image_queue)  # its errors (ALBEF_FAST_BACKEND) before the clamp
        if not self.training:  # nothing enqueued: any batch size, on any rank
            return idx_queue
        if getattr(self, "_is_replica", False):  # set by nn.DataParallel's replicate
            raise RuntimeError("ITCLoss: training under nn.DataParallel would lose the enqueues of every replica "
                               "but the first device's (its replicas' buffers are copies, discarded after the "
                               "step); use DistributedDataParallel, under which ranks gather before they enqueue "
                               "(ALBEF's concat_all_gather needs a process group too)")
        distributed.check_equal_rows("image_feat_m", image_feat_m.shape[0])
        n = image_feat_m.shape[0] * distributed.world_size()
        if n > self.queue_size:
            raise ValueError(f"image_feat_m: the step enqueues N = {n} rows (all ranks), "
                             f"expected N <= queue_size = {self.queue_size}")
        return idx_queue

    def _state_buffers(self):
        return [self.image_queue, self.text_queue, self.queue_ptr] + ([self.idx_queue] if self.use_idx else [])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # BLIP's retrieval models (and LAVIS's) name the pointer ptr_queue: taken for queue_ptr
        if prefix + "queue_ptr" not in state_dict and prefix + "ptr_queue" in state_dict:
            state_dict[prefix + "queue_ptr"] = state_dict.pop(prefix + "ptr_queue")
        # temp as [1] (FSDP2's fully_shard takes no 0-dim parameter) loads ALBEF's 0-dim one, and back
        temp = state_dict.get(prefix + "temp")
        if isinstance(temp, torch.Tensor) and temp.numel() == 1 and temp.shape != self.temp.shape:
            state_dict[prefix + "temp"] = temp.reshape(self.temp.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._queues_synced = False  # a checkpoint may come from elsewhere: broadcast rank 0's again

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat_m, text_feat_m, idx) -> None:
        queues = [self.image_queue, self.text_queue]
        items = [distributed.gather_rows(image_feat_m), distributed.gather_rows(text_feat_m)]
        if self.use_idx:
            queues.append(self.idx_queue)
            items.append(distributed.gather_rows(idx.reshape(-1, 1).to(torch.long)))
        enqueue_(queues, items, self.queue_ptr)

    def extra_repr(self) -> str:
        d, q = self.image_queue.shape
        return (f"embed_dim={d}, queue_size={q}, alpha={self.alpha}, clamp_temp={self.clamp_temp}, "
                f"use_idx={self.use_idx}, queue_dtype={self.image_queue.dtype}")
