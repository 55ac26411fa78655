"""`OnlineLaWA`: validate the average of the latest checkpoints while training runs.

LaWA (Kaddour 2022; Sanyal et al. 2023, arXiv 2306.03241) averages the latest k widely spaced
checkpoints of one run uniformly; gains are largest early in training and at high learning rates.
This callback keeps a copy of the weights every `every_n_steps` optimizer steps (the last
`last_k` of them; CPU memory by default, local shards under FSDP2) and, at each validation,
validates their uniform average too, logging `val_lawa/<source>/loss` beside `val/<source>/loss`
(and `val_lawa/copies`, how many copies the average holds).

    trainer:
      callbacks:
        - class_path: pretrain.train.callbacks.lawa.OnlineLaWA
          init_args: {every_n_steps: 1000, last_k: 5}

The copies are saved in every checkpoint (`last_k` x the model's size) so a resumed run
continues exactly. To produce the averaged weights themselves, pin checkpoints at the same
cadence (`checkpoint.pin_every_n_steps`) and run `pretrain average --last K --every S RUN_DIR`.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from pretrain.errors import UserError
from pretrain.model.checkpoint import LAWA_STATE_KEY
from pretrain.train.callbacks.weight_copies import Copy, WeightCopies


class OnlineLaWA(WeightCopies):
    """Uniform average of the last `last_k` copies taken every `every_n_steps` steps (module docstring).

    Args:
        every_n_steps: take a copy after every n-th optimizer step (step 0, the initial weights, never).
        last_k: how many of the latest copies to average.
        on_cpu: keep the copies in CPU memory (else on the parameters' device).
    """

    state_key = LAWA_STATE_KEY  # stable: `pretrain average --ema` finds the copies by it
    log_prefix = "val_lawa"

    def __init__(self, every_n_steps: int, last_k: int = 5, on_cpu: bool = True) -> None:
        if every_n_steps < 1 or last_k < 1:
            raise UserError("OnlineLaWA every_n_steps and last_k must be at least 1")
        super().__init__(on_cpu=on_cpu, validate=True)
        self.every_n_steps = every_n_steps
        self.last_k = last_k

    def update(self, step: int) -> None:
        if step == 0 or step % self.every_n_steps:
            return
        self.copies[str(step)] = self.snapshot()
        for old in sorted(self.copies, key=int)[: -self.last_k]:
            del self.copies[old]

    def evaluated_weights(self) -> Copy | None:
        if not self.copies:
            return None
        weights = list(self.copies.values())
        # sum() of tensors is a tensor (its start value 0 only types the empty case, excluded above).
        return {name: cast(torch.Tensor, sum(w[name] for w in weights)) / len(weights) for name in weights[0]}

    def extra_metrics(self) -> dict[str, float]:
        return {"copies": float(len(self.copies))}

    def extra_state(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "last_k": self.last_k}
