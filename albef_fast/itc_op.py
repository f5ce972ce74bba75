"""The fused ITC loss as a registered torch op: ``torch.ops.albef_fast.itc``.

One forward computes, for both directions, the loss, d loss / d features and d loss / d T
(SPEC section 3); the registered backward only scales the saved gradients by grad_output, so
backward costs nothing and syncs nothing. Being a custom op with a fake implementation, it is
opaque to torch.compile, which traces a training step around it with fullgraph=True. Eager
calls go through itc_apply: the same forward and backward as a plain autograd.Function, without
the custom-op dispatch (about 100 us a call, as much as the whole fused kernel at B = 64).

Outputs (all fresh tensors; B rows, D features, W = the work dtype, fp32 or fp64):
    losses [2] W        (loss_i2t, loss_t2i)
    grad_image [B, D]   d loss_i2t / d image_feat (feature dtype)
    grad_text [B, D]    d loss_t2i / d text_feat
    grad_temp [2] W     (d loss_i2t / d T, d loss_t2i / d T)
    sims [2, B, B]      student logits against the in-batch keys (i2t, t2i), feature dtype
    terms [4] W         (ce_i2t, ce_t2i, kl_i2t, kl_t2i); kl is 0 when the teacher was skipped
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from . import streaming

__all__ = ["itc", "itc_apply", "BACKEND_IMPLS", "work_dtype"]

Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _torch_backend(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
                   alpha, idx, idx_queue, details, grad, precision) -> Outputs:
    ids_b = None if idx is None else idx.reshape(-1)
    ids_q = None if idx_queue is None else idx_queue.reshape(-1)
    run = lambda q, q_m, k, queue: streaming.stream_direction(  # noqa: E731
        q, q_m, k, queue, temp, alpha, ids_b, ids_q, details=details, grad=grad
    )
    i2t = run(image_feat, image_feat_m, text_feat_m, text_queue)
    t2i = run(text_feat, text_feat_m, image_feat_m, image_queue)
    return _pack(i2t, t2i)


def _pack(i2t: streaming.DirectionResult, t2i: streaming.DirectionResult) -> Outputs:
    return (
        torch.stack([i2t.loss, t2i.loss]),
        i2t.dq,
        t2i.dq,
        torch.stack([i2t.dtemp, t2i.dtemp]),
        torch.stack([i2t.sim_batch, t2i.sim_batch]),
        torch.stack([i2t.ce, t2i.ce, i2t.kl, t2i.kl]),
    )


# name -> implementation; kernels register "triton" on import (albef_fast.kernels).
BACKEND_IMPLS: Dict[str, Callable[..., Outputs]] = {"torch": _torch_backend}


@torch.library.custom_op("albef_fast::itc", mutates_args=())
def itc(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: Optional[torch.Tensor],
    temp_value: float,
    alpha: float,
    idx: Optional[torch.Tensor],
    idx_queue: Optional[torch.Tensor],
    details: bool,
    grad: bool,
    backend: str,
    precision: str,
) -> Outputs:
    """temp (0-dim tensor) wins over temp_value (float) when given; inputs are pre-validated.
    grad=False (nothing needs a gradient) skips the student's key sums; the grads are zeros."""
    return _impl(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, temp_value,
                 alpha, idx, idx_queue, details, grad, backend, precision)


def _impl(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, temp_value, alpha,
          idx, idx_queue, details, grad, backend, precision) -> Outputs:
    t = temp if temp is not None else temp_value
    return BACKEND_IMPLS[backend](image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                                  t, alpha, idx, idx_queue, details, grad, precision)


@itc.register_fake
def _itc_fake(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, temp_value,
              alpha, idx, idx_queue, details, grad, backend, precision) -> Outputs:
    b, d = image_feat.shape
    w = work_dtype(image_feat.dtype)
    return (
        image_feat.new_empty(2, dtype=w),
        image_feat.new_empty(b, d),
        text_feat.new_empty(b, d),
        image_feat.new_empty(2, dtype=w),
        image_feat.new_empty(2, b, b),
        image_feat.new_empty(4, dtype=w),
    )


class _EagerITC(torch.autograd.Function):
    """The op's forward and backward for eager calls (no custom-op dispatch)."""

    @staticmethod
    def forward(*inputs):  # with setup_context: no ctx here
        return _impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def itc_apply(*inputs) -> Outputs:
    """torch.ops.albef_fast.itc when compiling (traced as one opaque op), else the same
    computation through _EagerITC. Arguments as for itc."""
    if torch.compiler.is_compiling():
        return itc(*inputs)
    return _EagerITC.apply(*inputs)


def _setup_context(ctx, inputs, output) -> None:
    temp = inputs[6]
    ctx.temp_dtype = None if temp is None else temp.dtype
    ctx.save_for_backward(output[1], output[2], output[3])
    ctx.set_materialize_grads(False)  # no zero-filled grads for the outputs nothing backpropagates


def _backward(ctx, g_losses, *unused):
    """Scale the saved gradients by grad_output: four small ops (host time counts at B = 64)."""
    if g_losses is None:  # only sims / terms were used: nothing reaches the inputs
        return (None,) * 15
    grad_image, grad_text, grad_temp = ctx.saved_tensors
    g_i2t, g_t2i = g_losses.unbind()
    d_temp = None
    if ctx.temp_dtype is not None:
        d_temp = torch.dot(grad_temp, g_losses.to(grad_temp.dtype))
        d_temp = d_temp if d_temp.dtype == ctx.temp_dtype else d_temp.to(ctx.temp_dtype)
    # a 0-dim factor keeps the gradient's dtype (bf16 stays bf16)
    return grad_image * g_i2t, grad_text * g_t2i, None, None, None, None, d_temp, *(None,) * 8


itc.register_autograd(_backward, setup_context=_setup_context)
