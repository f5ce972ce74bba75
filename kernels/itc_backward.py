"""The backward of the fused ITC op in one launch: the saved gradients scaled by grad_output.

The forward already computed d loss / d (image_feat, text_feat, T) (kernels/itc.py), so the usual
backward (only the mean loss backpropagates: `loss.backward()`) is three products with the 0-dim
grad_output g. As aten ops they are three kernel launches; on the H200's host, where the whole
fused step at B = 64 is host bound, an aten op with its backward cost ~20-25 us to issue (run 5's
host floors, benchmarks/NOTES.md). Here they are one direct launch.

_itc_scale_bwd_kernel   grid (cdiv(N, BLOCK),). out = saved * g for both [N] feature gradients
    (computed in fp32, rounded once to their dtype: what aten gives for a 0-dim CPU factor) and,
    in program 0, d T = grad_temp * g (fp32, stored in T's dtype).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch import DirectLauncher, PreparedLaunch, on_device

__all__ = ["scale_saved_grads"]

_BLOCK = 1024


@triton.jit
def _itc_scale_bwd_kernel(
    # pointers
    grad_image_ptr, grad_text_ptr, grad_temp_ptr, g_ptr, out_image_ptr, out_text_ptr, out_temp_ptr,
    # shapes
    N,
    # constexpr flags
    BLOCK: tl.constexpr, HAS_TEMP: tl.constexpr,
):
    """grad_image, grad_text, out_image, out_text: [N] (contiguous [B, D]); grad_temp, g: [] fp32;
    out_temp: [] (T's dtype; unused without HAS_TEMP)."""
    pid = tl.program_id(0)
    g = tl.load(g_ptr).to(tl.float32)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(grad_image_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_image_ptr + offs, (x * g).to(out_image_ptr.dtype.element_ty), mask=mask)
    y = tl.load(grad_text_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_text_ptr + offs, (y * g).to(out_text_ptr.dtype.element_ty), mask=mask)
    if HAS_TEMP:
        if pid == 0:
            d_temp = tl.load(grad_temp_ptr) * g
            tl.store(out_temp_ptr, d_temp.to(out_temp_ptr.dtype.element_ty))


_LAUNCH = DirectLauncher(_itc_scale_bwd_kernel)
_PREPARED: Dict[Tuple[int, bool], PreparedLaunch] = {}


def _prepared(n: int, has_temp: bool) -> PreparedLaunch:
    key = (n, has_temp)
    launch = _PREPARED.get(key)
    if launch is None:
        if len(_PREPARED) >= 256:  # shapes that keep changing: start over
            _PREPARED.clear()
            _LAUNCH.forget()
        launch = _PREPARED[key] = _LAUNCH.prepare((-(-n // _BLOCK),), (n,), {"BLOCK": _BLOCK, "HAS_TEMP": has_temp},
                                                  {"num_warps": 4})
    return launch


def scale_saved_grads(grad_image: torch.Tensor, grad_text: torch.Tensor, grad_temp: torch.Tensor,
                      g_loss: torch.Tensor, temp_dtype: Optional[torch.dtype]):
    """(grad_image * g, grad_text * g, grad_temp * g in temp_dtype, or None without temp_dtype),
    g = g_loss (0-dim fp32). grad_image and grad_text: contiguous, same shape (the op's outputs)."""
    out_image, out_text = torch.empty_like(grad_image), torch.empty_like(grad_text)
    out_temp = grad_temp.new_empty((), dtype=temp_dtype) if temp_dtype is not None else None
    with on_device(grad_image.device):  # the engine's device thread is current already; other callers may not be
        _prepared(grad_image.numel(), out_temp is not None)(
            (grad_image, grad_text, grad_temp, g_loss, out_image, out_text,
             grad_image if out_temp is None else out_temp), ())
    return out_image, out_text, out_temp
