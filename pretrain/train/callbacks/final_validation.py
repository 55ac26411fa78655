"""`FinalValidation`: validate after the last step when it is not already a validation step.

Validation runs every `validate_every_steps` optimizer steps; a run whose length is not a
multiple of that would end without a validation of its final weights. At the last step this
callback asks the trainer to stop, which makes Lightning validate right then, as it does before
any early stop.
"""

from __future__ import annotations

import lightning as L

from pretrain.train.callbacks.step_callback import StepCallback


class FinalValidation(StepCallback):
    def __init__(self, every_n_steps: int) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if step >= trainer.max_steps and step % self.every_n_steps:
            trainer.should_stop = True
