"""albef_fast: a fused, memory-light drop-in for ALBEF / BLIP's ITC loss with momentum distillation.

Public API (SPEC section 2): itc_loss, ITCOutput, ITCLoss, ema_update_, MomentumUpdater, enqueue_;
plus AlphaRamp (ALBEF's alpha warm-up) and albef_fast.integrations.lightning.ALBEFCallback.
"""
from . import _extension  # loads the C++ ops (or warns once) before any op is traced
from .functional import ITCOutput, itc_loss
from .modules import ITCLoss
from .schedules import AlphaRamp
from .state import MomentumUpdater, ema_update_, enqueue_

__version__ = "0.1.0"
__all__ = ["itc_loss", "ITCOutput", "ITCLoss", "ema_update_", "MomentumUpdater", "enqueue_", "AlphaRamp",
           "__version__"]
