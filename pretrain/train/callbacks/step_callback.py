"""`StepCallback`: the one place that tells callbacks "an optimizer step just finished".

Lightning calls `on_train_batch_end` after every micro-batch; with gradient accumulation most of
those are inside an optimizer step. A `StepCallback` gets `on_optimizer_step(trainer, module,
step)` once per optimizer step instead, with `step` = `trainer.global_step` (steps done so far).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class StepCallback(Callback):
    """Base class: override `on_optimizer_step`; call `super().on_train_start` when overriding it."""

    def __init__(self) -> None:
        super().__init__()
        self._step_seen = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self._step_seen:
            self._step_seen = trainer.global_step
            self.on_optimizer_step(trainer, pl_module, trainer.global_step)

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Called once after each optimizer step."""
