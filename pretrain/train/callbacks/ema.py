"""`EMA`: a step-based exponential moving average of the weights, kept beside training.

    ema <- decay * ema + (1 - decay) * weights      after every `every_n_steps`-th optimizer step

The average starts as a copy of the weights at the first optimizer step >= `start_step` (step 0:
the initial weights), so a late start skips the early, fast-moving weights. With decay d, the
weights of the last ~1 / (1 - d) updates dominate. Lightning's `StochasticWeightAveraging` works
per epoch and runs a uniform average; this one is per optimizer step, like the EMA DeepSeek-V3 keeps
in CPU memory (`on_cpu`, the default; under FSDP2 each rank keeps the EMA of its own shards).

Add it to a recipe (validation then also logs `val_ema/<source>/loss`):

    trainer:
      callbacks:
        - class_path: pretrain.train.callbacks.ema.EMA
          init_args: {decay: 0.999}

The EMA is saved in every checkpoint (`pretrain.train.callbacks.weight_copies`) and resumes exactly; export it with
`pretrain average --ema CHECKPOINT -o ema.pt`, then `pretrain export-hf ema.pt OUT_DIR`.
"""

from __future__ import annotations

from typing import Any

from pretrain.errors import UserError
from pretrain.model.checkpoint import EMA_COPY, EMA_STATE_KEY
from pretrain.train.callbacks.weight_copies import Copy, WeightCopies

COPY = EMA_COPY  # the name of the one copy this callback keeps


class EMA(WeightCopies):
    """Exponential moving average of the weights (module docstring).

    Args:
        decay: weight of the old average at each update, in [0, 1).
        every_n_steps: update after every n-th optimizer step (the decay applies per update).
        start_step: first optimizer step whose weights enter the average.
        on_cpu: keep the average in CPU memory (else on the parameters' device).
        validate: also validate the EMA weights at each validation (`val_ema/<source>/loss`).
    """

    state_key = EMA_STATE_KEY  # stable: `pretrain average --ema` finds the copies by it
    log_prefix = "val_ema"

    def __init__(
        self,
        decay: float = 0.999,
        every_n_steps: int = 1,
        start_step: int = 0,
        on_cpu: bool = True,
        validate: bool = True,
    ) -> None:
        if not 0 <= decay < 1:
            raise UserError(f"EMA decay must be in [0, 1), got {decay}")
        if every_n_steps < 1 or start_step < 0:
            raise UserError("EMA every_n_steps must be >= 1 and start_step >= 0")
        super().__init__(on_cpu=on_cpu, validate=validate)
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.updates = 0

    def update(self, step: int) -> None:
        if COPY not in self.copies:
            if step >= self.start_step:
                self.copies[COPY] = self.snapshot()
            return
        if step % self.every_n_steps:
            return
        for name, average in self.copies[COPY].items():
            average.mul_(self.decay).add_(self.current(name), alpha=1 - self.decay)
        self.updates += 1

    def evaluated_weights(self) -> Copy | None:
        return self.copies.get(COPY)

    def extra_state(self) -> dict[str, Any]:
        return {"decay": self.decay, "every_n_steps": self.every_n_steps, "updates": self.updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
