"""The state ops on devices the C++ extension has no kernel for (Apple's MPS, Intel's XPU, a
PrivateUse1 backend): the PyTorch fallbacks, registered as each op's default kernel
(CompositeExplicitAutograd). The CPU and CUDA kernels (csrc/) and the fake ones (_fake_ops) keep
their keys; without this an ITCLoss step on MPS raised the dispatcher's NotImplementedError.
The fallbacks read no device value on the host and give ALBEF's bits; the checks the C++ ops make
before their first write are made here in Python.
"""
import torch

from . import _validate, fallbacks


@torch.library.impl("albef_fast::ema_update_", "CompositeExplicitAutograd")
def _ema_update_default(params_m, params, momentum) -> None:
    _validate.ema_inputs(params_m, params, momentum)  # the C++ op checks every pair (model.half() since)
    _validate.writable("params_m", params_m)
    _validate.ema_disjoint(params_m, params)
    fallbacks.ema_update_(params_m, params, momentum)


@torch.library.impl("albef_fast::enqueue_", "CompositeExplicitAutograd")
def _enqueue_default(queues, items, ptr) -> None:
    _validate.enqueue_inputs(queues, items, ptr)  # the C++ op checks the dtypes again (csrc/checks.h)
    _validate.writable("queues", queues)
    _validate.enqueue_disjoint(queues, items, ptr)
    fallbacks.enqueue_(queues, items, ptr)
