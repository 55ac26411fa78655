"""Weight copies kept beside training: the base of `EMA` and `OnlineLaWA`.

A `WeightCopies` callback holds named copies of the parameters, each copy a dict
{parameter name: tensor}, on the CPU or on the parameters' device. Under FSDP2 the parameters
are DTensors and each rank keeps copies of its own local shards only, so the copies shard
exactly like the model (and like its optimizer state) and no step gathers anything.

After every optimizer step the subclass's `update(step)` may refresh its copies. Validation
runs on the raw weights as usual; when `validate` is set, the callback then swaps its
`evaluated_weights()` into the model, runs the same validation again, logs
`<log_prefix>/<source>/loss` and `.../ppl` beside `val/<source>/...`, and swaps the raw
weights back.

Checkpoints: the copies are saved with the run's checkpoints, so that a resumed run continues
them exactly. In a checkpoint file they sit in the callback's entry, under a stable key
(`checkpoint["callbacks"][state_key]["copies"][copy][name]`, `state_key` from
`pretrain.model.checkpoint`, e.g. `EMA_STATE_KEY`). In an FSDP2 directory of shards they are
written sharded beside the model, as `state_dict` entries named `<state_key>/<copy>/<name>`
(`weight_copy_key`), and read back (resharded if the number of ranks changed) by
torch.distributed.checkpoint; the callback's entry then lists the copies only.
`pretrain average --ema` reads them back offline (`pretrain.model.checkpoint`).

Validation of the copies runs the validation batches again through `pretrain.train.evaluation`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from pretrain.errors import UserError
from pretrain.model.checkpoint import weight_copy_key
from pretrain.train import private_apis
from pretrain.train.callbacks.step_callback import StepCallback
from pretrain.train.datamodule import trainer_datamodule
from pretrain.train.evaluation import evaluate

Copy = dict[str, torch.Tensor]  # parameter name -> (local shard of) a weight


def model_parameters(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
    """The model's parameters under their checkpoint names."""
    return dict(cast(torch.nn.Module, pl_module.model).named_parameters())


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: its local shard under FSDP2, else itself (no copy)."""
    return param.to_local() if hasattr(param, "to_local") else param


class WeightCopies(StepCallback, ABC):
    """Base class (module docstring). Subclasses implement `update` and `evaluated_weights`.

    Args:
        on_cpu: keep the copies in CPU memory (else on the parameters' device).
        validate: also validate `evaluated_weights()` and log them under `log_prefix`.
    """

    log_prefix = "val_copies"

    def __init__(self, on_cpu: bool = True, validate: bool = True) -> None:
        super().__init__()
        self.on_cpu = on_cpu
        self.validate = validate
        self.copies: dict[str, Copy] = {}
        self.last_step = -1  # the optimizer step `update` last saw
        self._params: dict[str, torch.nn.Parameter] = {}
        self._sharded = False

    # ---- subclass interface ------------------------------------------------------------------

    @abstractmethod
    def update(self, step: int) -> None:
        """Called once after each optimizer step (and at the start of training with the step then)."""

    @abstractmethod
    def evaluated_weights(self) -> Copy | None:
        """The weights to validate beside the raw ones (None: nothing to validate yet)."""

    def extra_state(self) -> dict[str, Any]:
        """The subclass's own counters, saved in checkpoints."""
        return {}

    def extra_metrics(self) -> dict[str, float]:
        """Logged as `<log_prefix>/<name>` with each validation of the copies."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    # ---- helpers for subclasses --------------------------------------------------------------

    def snapshot(self) -> Copy:
        """A copy of the current weights (local shards), where the copies are kept."""
        return {name: self.current(name).clone() for name in self._params}

    def current(self, name: str) -> torch.Tensor:
        """Parameter `name` (its local shard), on the copies' device; a view when already there."""
        return local_tensor(self._params[name]).detach().to(self._device(name))

    def _device(self, name: str) -> torch.device:
        return torch.device("cpu") if self.on_cpu else local_tensor(self._params[name]).device

    # ---- training hooks ----------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        self._sharded = isinstance(strategy, ModelParallelStrategy)
        if isinstance(strategy, ModelParallelStrategy) and not private_apis.saves_sharded_checkpoints(
            strategy
        ):
            raise UserError(
                f"{self.state_key} under FSDP2 needs sharded checkpoints (save_distributed_checkpoint: true)"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._params = model_parameters(pl_module)
        self.copies = {
            copy: {name: t.to(self._device(name)) for name, t in weights.items()}
            for copy, weights in self.copies.items()
        }
        self._catch_up(trainer)

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self._catch_up(trainer)

    def _catch_up(self, trainer: L.Trainer) -> None:
        """Run `update` once per optimizer step, whichever hook (step end, save, validation) sees it
        first (another callback may save or validate before this one hears of the step)."""
        if self._params and trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            with torch.no_grad():
                self.update(trainer.global_step)

    # ---- validation --------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.validate or trainer.sanity_checking or not self._params:
            return
        self._catch_up(trainer)
        weights = self.evaluated_weights()
        if weights is None:
            return
        with swapped_in(cast(torch.nn.Module, pl_module.model), self._params, weights):
            losses = _validation_losses(trainer, pl_module)
        metrics: dict[str, Any] = dict(self.extra_metrics())
        for source, loss in sorted(losses.items()):
            metrics |= {f"{source}/loss": loss, f"{source}/ppl": torch.exp(loss)}
        for name, value in metrics.items():
            pl_module.log(f"{self.log_prefix}/{name}", value, add_dataloader_idx=False, rank_zero_only=True)

    # ---- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._catch_up(trainer)
        if not self._sharded:
            return
        from torch.distributed.tensor import DTensor

        for copy, weights in self.copies.items():
            for name, tensor in weights.items():
                param = cast(DTensor, self._params[name])  # FSDP2 parameters are DTensors
                checkpoint["state_dict"][weight_copy_key(self.state_key, copy, name)] = DTensor.from_local(
                    tensor, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
                )

    def state_dict(self) -> dict[str, Any]:
        copies = list(self.copies) if self._sharded else self.copies
        return {"last_step": self.last_step, "sharded": self._sharded, "copies": copies, **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
        if not state["sharded"]:
            self.copies = state["copies"]
        self.load_extra_state(state)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None or not state["sharded"]:
            return  # `load_state_dict` takes the copies from the callback's entry
        if not self._sharded:
            raise UserError(
                f"this checkpoint's {self.state_key} weights are sharded (FSDP2): resume it with trainer.strategy: fsdp2"
            )
        self.copies = _load_sharded(
            trainer.ckpt_path, self.state_key, state["copies"], model_parameters(pl_module)
        )


def _load_sharded(
    path: Any, state_key: str, copies: list[str], params: dict[str, torch.nn.Parameter]
) -> dict[str, Copy]:
    """Each rank's local shards of the weight copies in a sharded checkpoint (resharded as needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    placeholders = {
        weight_copy_key(state_key, copy, name): DTensor.from_local(
            torch.empty_like(local_tensor(param)),
            cast(DTensor, param).device_mesh,  # FSDP2 parameters are DTensors
            cast(DTensor, param).placements,
            shape=param.shape,
            stride=param.stride(),
        )
        for copy in copies
        for name, param in params.items()
    }
    dcp.load({"state_dict": placeholders}, checkpoint_id=path)
    return {
        copy: {name: placeholders[weight_copy_key(state_key, copy, name)].to_local() for name in params}
        for copy in copies
    }


@contextmanager
def swapped_in(
    model: torch.nn.Module, params: dict[str, torch.nn.Parameter], weights: Copy
) -> Iterator[None]:
    """Temporarily replace the parameters' values (local shards) with `weights`."""
    backup = {}
    with torch.no_grad():
        drop_gathered(model)
        for name, param in params.items():
            shard = local_tensor(param)
            backup[name] = shard.detach().clone()
            shard.copy_(weights[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in params.items():
                local_tensor(param).copy_(backup[name])
            drop_gathered(model)


def drop_gathered(model: torch.nn.Module) -> None:
    """Free FSDP2's gathered copies of the parameters, so that the next forward gathers the shards anew.

    After a forward without backward (validation), FSDP2 keeps the root module's parameters
    gathered and would reuse them: the embedding, final norm and LM head would not change with a swap.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _validation_losses(trainer: L.Trainer, pl_module: Any) -> dict[str, torch.Tensor]:
    """The validation loss per source of the weights in the model now, on the trainer's validation batches."""
    loaders = trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, list) else [loaders]
    sources = trainer_datamodule(trainer).val_source_names
    # Our validation datasets have a length, so Lightning counts their batches with an int.
    batches = {
        sources[i]: islice(loader, cast(int, trainer.num_val_batches[i])) for i, loader in enumerate(loaders)
    }
    with trainer.precision_plugin.val_step_context():
        return evaluate(pl_module.summed_loss, batches, pl_module.device, pl_module.sum_over_ranks)
