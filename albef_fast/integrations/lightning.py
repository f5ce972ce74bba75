"""A PyTorch Lightning callback running ALBEF's per-step state updates around a training step.

    trainer = pl.Trainer(callbacks=[ALBEFCallback(momentum=0.995, alpha=0.4)])

At setup for fit it copies the online weights into the momentum models and freezes them, once,
before the strategy wraps the module (DDP) and before a checkpoint (``ckpt_path=``) is restored,
whose momentum models a resumed fit then keeps.
Before every training batch (where ALBEF calls ``_momentum_update()`` and computes alpha) it
  - sets the distillation weight alpha = alpha0 * min(1, global_step / warmup_steps) on every
    albef_fast.ITCLoss inside the LightningModule (warmup_steps defaults to one epoch, as ALBEF);
  - runs the momentum (EMA) update of the module's ``model_pairs`` ([(model, model_m), ...],
    ALBEF's attribute name).
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Sequence, Tuple

from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from .. import _validate
from ..modules import ITCLoss
from ..schedules import AlphaRamp
from ..state import MomentumUpdater

__all__ = ["ALBEFCallback"]

PairsFn = Callable[[nn.Module], Sequence[Tuple[nn.Module, nn.Module]]]


def _model_pairs_attribute(module: nn.Module) -> Sequence[Tuple[nn.Module, nn.Module]]:
    """The default pairs: the LightningModule's ``model_pairs``, as ALBEF names them."""
    if not hasattr(module, "model_pairs"):
        raise ValueError(f"model_pairs: {type(module).__name__} has no model_pairs attribute ([(model, model_m), "
                         "...], as ALBEF's); set one, or pass ALBEFCallback(model_pairs=lambda module: [...])")
    return module.model_pairs


class ALBEFCallback(pl.Callback):
    """Momentum update + alpha ramp for ALBEF/BLIP-style LightningModules.

    momentum: EMA momentum; alpha: the distillation weight after warm-up;
    warmup_steps: alpha's ramp length in optimizer steps (None: the first epoch's batches);
    model_pairs: function of the LightningModule giving its (model, model_m) pairs
        (default: its ``model_pairs`` attribute); copy_params: copy and freeze at setup for fit.
    """

    def __init__(self, momentum: float = 0.995, alpha: float = 0.4, warmup_steps: Optional[int] = None,
                 model_pairs: Optional[PairsFn] = None, copy_params: bool = True):
        # checked here, not at setup: by then copy_params() would have written the momentum models
        self.momentum = _validate.unit_interval("momentum", momentum)
        self.alpha0 = AlphaRamp(alpha, 1 if warmup_steps is None else warmup_steps).alpha
        self.warmup_steps = warmup_steps
        self.model_pairs = model_pairs or _model_pairs_attribute
        self.copy_params = copy_params
        self.ramp: Optional[AlphaRamp] = None
        self.updater: Optional[MomentumUpdater] = None
        self.alpha = 0.0
        self._copied_into: Optional[weakref.ref] = None  # the module copied: a second fit of it keeps its EMA

    def __getstate__(self) -> dict:
        # a weak reference does not pickle (ddp_spawn sends the callback to its processes)
        return {**self.__dict__, "_copied_into": None}

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before the strategy wraps the module (DDP registers the parameters that require grad: the
        # momentum models' frozen later never get one) and before a checkpoint is restored (its
        # weights then overwrite the copy: a resumed fit keeps its EMA)
        if stage != "fit":
            return
        self.updater = MomentumUpdater(self.model_pairs(pl_module), momentum=self.momentum)
        copied = self._copied_into is not None and self._copied_into() is pl_module
        if self.copy_params and not copied:
            self.updater.copy_params()
            self._copied_into = weakref.ref(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        # The epoch length is known from here on; ramp in optimizer steps (global_step).
        steps = self.warmup_steps
        if steps is None:
            batches = trainer.num_training_batches  # inf for a dataset without len()
            if not math.isfinite(batches):
                raise ValueError("warmup_steps: required where the epoch length is unknown (a dataset without "
                                 f"len(): num_training_batches = {batches}); pass the ramp's length in steps")
            steps = math.ceil(batches / trainer.accumulate_grad_batches)
        self.ramp = AlphaRamp(self.alpha0, max(1, int(steps)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.alpha = self.ramp(trainer.global_step)
        for module in pl_module.modules():
            if isinstance(module, ITCLoss):
                module.alpha = self.alpha
        self.updater.update()
