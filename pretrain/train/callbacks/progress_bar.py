"""A progress bar counted in optimizer steps: step, loss, tokens/s, ETA; validation results as lines."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from pretrain.train.callbacks.monitor import TrainingMonitor
from pretrain.train.callbacks.step_callback import StepCallback


class StepProgressBar(StepCallback, ProgressBar):
    """Replaces Lightning's micro-batch bar: one tick per optimizer step, to `max_steps`, with the
    tokens/s that `monitor` measured."""

    def __init__(self, monitor: TrainingMonitor | None = None) -> None:
        super().__init__()
        self.monitor = monitor
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._enabled and trainer.is_global_zero:
            self._bar = tqdm(
                total=trainer.max_steps,
                initial=trainer.global_step,
                desc="training",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        postfix = {}
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if self.monitor is not None and self.monitor.tokens_per_sec:
            postfix["tok/s"] = f"{self.monitor.tokens_per_sec:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        results = [
            f"{name.split('/')[1]} loss {float(value):.4f} (ppl {float(trainer.callback_metrics[name[:-4] + 'ppl']):.1f})"
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("val/") and name.endswith("/loss")
        ]
        if results:
            message = f"step {trainer.global_step}: validation " + ", ".join(results)
            (self._bar.write if self._bar else print)(message, file=sys.stderr)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
