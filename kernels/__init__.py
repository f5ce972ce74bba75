"""Triton kernels of albef_fast (packaged as albef_fast.kernels); importing registers the
"triton" backend of torch.ops.albef_fast.itc, its one-launch backward and, unless
ALBEF_FAST_LAUNCH=direct (or jit), the step issued from C++ (cpp_launch) and itc_loss's usual call
in C++."""
from albef_fast import functional
from albef_fast.itc_op import BACKEND_IMPLS, CPP_STEPS, FUSED_BACKWARDS

from . import cpp_launch, itc
from .itc import itc_triton
from .itc_backward import scale_saved_grads

BACKEND_IMPLS["triton"] = itc_triton
FUSED_BACKWARDS["triton"] = scale_saved_grads
if cpp_launch.enabled():
    itc.CPP = cpp_launch
    CPP_STEPS["triton"] = cpp_launch.step
    functional.CPP_ENTRY = cpp_launch.entry()

__all__ = ["itc_triton", "scale_saved_grads"]
