"""ALBEF's distillation-weight warm-up: alpha = alpha0 * min(1, step / steps), as a small schedule."""
from __future__ import annotations

import numbers

from . import _validate

__all__ = ["AlphaRamp"]


class AlphaRamp:
    """alpha(step) = alpha * min(1, step / warmup_steps); ALBEF ramps over the first epoch.

    ALBEF's pretraining loop: ``alpha = config['alpha'] * min(1, i / len(data_loader))`` in
    epoch 0, then ``config['alpha']``; i.e. AlphaRamp(alpha, steps_per_epoch)(global_step).
    """

    def __init__(self, alpha: float = 0.4, warmup_steps: int = 1):
        self.alpha = _validate.unit_interval("alpha", alpha)
        self.warmup_steps = _validate.count("warmup_steps", warmup_steps)

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, numbers.Real):
            raise TypeError(f"step: expected a number >= 0, got {type(step).__name__}")
        if step < 0:
            raise ValueError(f"step: expected >= 0, got {step}")
        return self.alpha * min(1.0, step / self.warmup_steps)

    def __repr__(self) -> str:
        return f"AlphaRamp(alpha={self.alpha}, warmup_steps={self.warmup_steps})"
