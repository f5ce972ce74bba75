"""Triton kernels of albef_fast (packaged as albef_fast.kernels); importing registers the
"triton" backend of torch.ops.albef_fast.itc."""
from albef_fast.itc_op import BACKEND_IMPLS

from .itc import itc_triton

BACKEND_IMPLS["triton"] = itc_triton

__all__ = ["itc_triton"]
