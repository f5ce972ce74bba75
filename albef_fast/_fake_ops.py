"""Fake (meta) kernels of the C++ state ops, so torch.compile can trace them. Both mutate only."""
import torch


@torch.library.register_fake("albef_fast::ema_update_")
def _ema_update_fake(params_m, params, momentum) -> None:
    return None


@torch.library.register_fake("albef_fast::enqueue_")
def _enqueue_fake(queues, items, ptr) -> None:
    return None
