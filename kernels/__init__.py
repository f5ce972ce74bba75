"""Triton kernels of albef_fast (packaged as albef_fast.kernels); importing registers the
"triton" backend of torch.ops.albef_fast.itc and its one-launch backward."""
from albef_fast.itc_op import BACKEND_IMPLS, FUSED_BACKWARDS

from .itc import itc_triton
from .itc_backward import scale_saved_grads

BACKEND_IMPLS["triton"] = itc_triton
FUSED_BACKWARDS["triton"] = scale_saved_grads

__all__ = ["itc_triton", "scale_saved_grads"]
