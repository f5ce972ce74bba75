"""Loading the optional C++ extension (albef_fast._C) that registers the state ops.

If it is missing (not built, or ALBEF_FAST_DISABLE_EXTENSION=1), the pure-PyTorch fallbacks
serve every API, and a one-time warning says so.
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

__all__ = ["has_ops", "build_info"]


def _load():
    if os.environ.get("ALBEF_FAST_DISABLE_EXTENSION", "0") not in ("", "0"):
        return None
    try:
        from . import _C  # noqa: F401  (registers torch.ops.albef_fast.ema_update_ / enqueue_)
    except ImportError as err:
        warnings.warn(f"albef_fast: C++ extension not available ({err}); using the PyTorch fallbacks",
                      RuntimeWarning, stacklevel=3)
        return None
    from . import _default_ops, _fake_ops  # noqa: F401  (other devices' kernels; fake kernels for torch.compile)
    return _C


_EXT = _load()  # once, at import (so the warning is one-time and tracing sees a constant)


def has_ops() -> bool:
    return _EXT is not None


def build_info() -> dict:
    return {"extension": False} if _EXT is None else {"extension": True, **_EXT.build_info()}
