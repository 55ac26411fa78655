"""Per-step training metrics: tokens seen, LR, epochs, tokens/s, MFU and peak GPU memory.

Logged at optimizer-step boundaries every `trainer.log_every_n_steps` steps. Throughput is
measured over the interval since the previous log (host clock; the loss logged every step
already synchronizes with the device), over all ranks: tokens/s is the global rate and MFU is

    MFU = tokens/s * flops_per_token / (world_size * peak FLOP/s of one device)

with `pretrain.model.flops.flops_per_token` and the dense bf16 datasheet peak (no sparsity) of
the GPU, as TinyLlama, OLMo and Megatron quote it. Devices missing from the table (and CPUs) log
tokens/s only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

import lightning as L
import torch

from pretrain.model.flops import flops_per_token
from pretrain.run_dir import START_STEP
from pretrain.train.callbacks.step_callback import StepCallback
from pretrain.train.datamodule import trainer_datamodule

if TYPE_CHECKING:
    from pretrain.train.module import PretrainModule

# Dense bf16 tensor-core peak FLOP/s by device-name fragment; the first match wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("B200", 2250e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Datasheet dense bf16 peak of `device`, or None when unknown (e.g. a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in PEAK_BF16_FLOPS if fragment in name), None)


class TrainingMonitor(StepCallback):
    """Logs train/tokens_seen, train/lr, train/epoch[/source], train/tokens_per_sec, train/mfu,
    train/peak_memory_gib at step boundaries."""

    def __init__(self) -> None:
        super().__init__()
        self._last_time = 0.0
        self._last_logged_step = 0
        self.tokens_per_sec: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_logged_step = trainer.global_step
        if trainer.global_step and trainer.is_global_zero:  # where this launch resumed, for `pretrain plot`
            for logger in trainer.loggers:
                logger.log_metrics({START_STEP: float(trainer.global_step)}, step=trainer.global_step)
        self._last_time = time.perf_counter()
        config = cast("PretrainModule", pl_module).config
        seq_len = trainer_datamodule(trainer).seq_len
        self._flops_per_token = flops_per_token(config, seq_len)
        peak = peak_flops(pl_module.device)
        self._peak_total = peak * trainer.world_size if peak else None

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        # Lightning sets trainer.log_every_n_steps without declaring it on Trainer.
        if step % trainer.log_every_n_steps != 0:  # type: ignore[attr-defined]
            return
        data = trainer_datamodule(trainer)
        module = cast("PretrainModule", pl_module)
        now = time.perf_counter()
        steps = step - self._last_logged_step
        self.tokens_per_sec = steps * data.global_batch_tokens / max(now - self._last_time, 1e-9)
        self._last_time, self._last_logged_step = now, step
        metrics = {
            "train/tokens_seen": float(step * data.global_batch_tokens),
            "train/lr": module.lr_schedule(step - 1, trainer.max_steps) * module.lr_factor(step - 1),
            "train/tokens_per_sec": self.tokens_per_sec,
        }
        for source, epoch in data.epochs_at(step).items():
            metrics[f"train/epoch/{source}" if len(data.source_names) > 1 else "train/epoch"] = epoch
        if self._peak_total:
            metrics["train/mfu"] = self.tokens_per_sec * self._flops_per_token / self._peak_total
        if pl_module.device.type == "cuda":
            metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True)  # identical on every rank: no sync needed
