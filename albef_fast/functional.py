"""Functional API: ``itc_loss``, ALBEF's ITC loss with momentum distillation, streamed."""
from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from . import _validate
from .itc_op import BACKEND_IMPLS, float32_matmul_precision, itc_apply

__all__ = ["itc_loss", "ITCOutput", "resolve_backend"]


class ITCOutput(NamedTuple):
    """What ``itc_loss(..., return_details=True)`` and ``ITCLoss.forward`` return.

    loss, loss_i2t, loss_t2i: 0-dim, differentiable (fp32; fp64 for fp64 inputs).
    sim_i2t_batch, sim_t2i_batch: [B, B] detached student logits against the in-batch momentum
        keys (ALBEF's ``sim_i2t[:, :bs]``), for ITM hard-negative sampling.
    ce_*: detached mean hard-target cross-entropy -sum h log p_s.
    kl_*: detached mean KL(p_m || p_s), the distillation ("pseudo-target") term.
    loss_x = (1 - alpha) * ce_x + alpha * (kl_x + H(p_m)) exactly.
    """

    loss: torch.Tensor
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    sim_i2t_batch: torch.Tensor
    sim_t2i_batch: torch.Tensor
    ce_i2t: torch.Tensor
    ce_t2i: torch.Tensor
    kl_i2t: torch.Tensor
    kl_t2i: torch.Tensor


# Settings read on the host. Under torch.compile they are taken as constants of the trace
# (dynamo cannot trace them); changing one later means a recompile, not a wrong result.
@torch.compiler.assume_constant_result
def _matmul_precision() -> str:
    return float32_matmul_precision()


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    return os.environ.get("ALBEF_FAST_BACKEND", "")


@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def _triton_registered() -> bool:
    if "triton" not in BACKEND_IMPLS:
        try:
            from . import kernels  # noqa: F401  (registers the "triton" backend)
        except ImportError:
            return False
    return "triton" in BACKEND_IMPLS


def _queue_span(queue: torch.Tensor) -> int:
    """How many elements apart the queue's first and last elements lie (its storage's extent)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(queue.shape, queue.stride()) if size > 0)


# The Triton kernels compute element offsets in 32 bits (the queue's strides are i32 arguments)
_TRITON_MAX_SPAN = 2 ** 31 - 1


def resolve_backend(backend: Optional[str], precision: Optional[str], feat: torch.Tensor,
                    queue: Optional[torch.Tensor] = None) -> Tuple[str, str]:
    """Pick (backend, precision) for features `feat` and queues like `queue`. Automatic: Triton
    for CUDA tensors (fp32 at "highest" too: three fp16 products of (hi, lo) pairs there,
    kernels/itc.py:_dot_flags), else torch; float64 features or queues, and queues spanning
    2^31 elements or more (past the kernels' 32-bit offsets), only on torch."""
    if precision is None:
        precision = _matmul_precision() if feat.dtype == torch.float32 else "medium"
    if feat.dtype == torch.float64:
        precision = "highest"
    if backend is None:
        backend = _env_backend() or None
        _validate.choice("ALBEF_FAST_BACKEND", backend, _validate.BACKENDS)
    wide_queue = queue is not None and queue.dtype == torch.float64
    huge_queue = queue is not None and _queue_span(queue) > _TRITON_MAX_SPAN
    if backend is None:
        triton_ok = (feat.is_cuda and feat.dtype != torch.float64 and not wide_queue and not huge_queue
                     and _triton_registered())
        backend = "triton" if triton_ok else "torch"
    if backend == "triton":
        if feat.dtype == torch.float64 or wide_queue:
            what = "features" if feat.dtype == torch.float64 else "queues (image_queue, text_queue)"
            raise ValueError(f"backend: 'triton' does not take float64 {what}; use backend='torch'")
        if huge_queue:
            raise ValueError(f"backend: 'triton' indexes the queues with 32-bit offsets, and image_queue spans "
                             f"{_queue_span(queue) + 1} elements (2^31 at most); use backend='torch'")
        if not feat.is_cuda and not _interpreting():  # checked before triton is first imported
            raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {feat.device}")
        if not _triton_registered():
            raise ValueError("backend: 'triton' requested, but triton is not installed")
    return backend, precision


_KEY_NAMES = ("image_feat_m", "text_feat_m", "image_queue", "text_queue")


def _warn_if_keys_require_grad(*keys: torch.Tensor) -> None:
    """The keys are constants of the loss (ALBEF computes them under torch.no_grad()), so a key that
    requires grad gets no gradient from it: said aloud, since that is a wrong gradient where one
    was meant (CLIP's loss, whose keys are the other tower's trainable features, is not this one)."""
    if not torch.is_grad_enabled():
        return
    named = [name for name, key in zip(_KEY_NAMES, keys) if key.requires_grad]
    if named and not torch.compiler.is_compiling():
        verb = "requires" if len(named) == 1 else "require"
        warnings.warn(f"itc_loss: {', '.join(named)} {verb} grad, but the loss gives the momentum features and "
                      "queues no gradient (as ALBEF, which computes them under torch.no_grad()); detach them to "
                      "silence this. CLIP's loss, whose keys get gradients too, is not this loss (README)",
                      UserWarning, stacklevel=3)


# The usual call checked, keyed and launched in C++ (csrc/itc_entry.cpp), set by albef_fast.kernels
# with ALBEF_FAST_LAUNCH=cpp: itc_loss's arguments -> its result (ITCOutput's fields as a tuple), or
# None: the Python path below (any other call, and each new one's first time through the C++ step).
CPP_ENTRY: Optional[Callable[..., object]] = None


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp,
    alpha: float = 0.4,
    *,
    idx: Optional[torch.Tensor] = None,
    idx_queue: Optional[torch.Tensor] = None,
    return_details: bool = False,
    backend: Optional[str] = None,
    precision: Optional[str] = None,
):
    """ALBEF's ``loss_ita`` without the B x (B+Q) logits.

    image_feat, text_feat: [B, D] L2-normalized features (get gradients);
    image_feat_m, text_feat_m: [B, D] momentum features (in-batch keys; constants);
    image_queue, text_queue: [D, Q] queues as ALBEF stores them (read in place; Q may be 0);
        keys and queues get no gradient (a UserWarning names those that require grad);
    temp: float, or 0-dim or [1] tensor (a tensor that requires grad gets d loss / d T);
    alpha: distillation weight in [0, 1] (0 skips the teacher products);
    idx [B] with idx_queue [Q] or [1, Q]: retrieval targets, [id_j == id_r] / #positives;
    backend: "torch", "triton" or None (automatic; env ALBEF_FAST_BACKEND overrides);
    precision: fp32 product precision, "highest" | "high" (TF32) | "medium" (bf16), None = torch's.
    Returns the 0-dim loss, or an ITCOutput when return_details.
    """
    if CPP_ENTRY is not None and not torch.compiler.is_compiling():
        out = CPP_ENTRY(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha, idx,
                        idx_queue, return_details, backend, precision)
        if out is not None:
            return ITCOutput._make(out) if return_details else out
    _validate.itc_inputs(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
                         alpha, idx, idx_queue, backend, precision)
    _warn_if_keys_require_grad(image_feat_m, text_feat_m, image_queue, text_queue)
    backend, precision = resolve_backend(backend, precision, image_feat, image_queue)
    temp_t = temp if isinstance(temp, torch.Tensor) else None
    if temp_t is not None and temp_t.dim() == 1:  # [1] (FSDP2's shape for a scalar): its gradient comes as [1]
        temp_t = temp_t.view(())
    temp_v = 0.0 if temp_t is not None else float(temp)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (image_feat, text_feat, temp_t))
    loss, losses, _, _, _, _, sims, terms = itc_apply(image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
                                                      text_queue, temp_t, temp_v, float(alpha), idx, idx_queue,
                                                      return_details, grad, backend, precision)
    if not return_details:
        return loss
    sims, terms = sims.detach(), terms.detach()
    return ITCOutput(loss, losses[0], losses[1], sims[0], sims[1], terms[0], terms[1], terms[2], terms[3])
