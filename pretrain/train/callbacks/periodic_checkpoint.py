"""`PeriodicCheckpoint`: checkpoints that are never half-written, saved on a cadence, pruned to the last K.

Each checkpoint is written under its partial name in the run's checkpoints folder
(`pretrain.run_dir`) and renamed into place by rank 0 only after every rank has finished writing;
a rename is atomic, so any `step-*.ckpt` that exists is complete, and `--resume auto` can always
trust the newest one. A leftover partial from a crash is removed by the next save.

`DirectCheckpointIO` writes a checkpoint file straight into that partial name. Lightning's default
builds the whole file in memory first and has fsspec stage it in `$TMPDIR` before moving it: on a
cluster whose `/tmp` is small (often RAM-backed) the first checkpoint of a large model fails
there, although the run directory has room.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from pretrain.errors import UserError
from pretrain.files import fsync
from pretrain.model.checkpoint import DIVERGED, FOREIGN, checkpoint_identity, training_checkpoint_problem
from pretrain.run_dir import CheckpointCheck, RunDir, remove
from pretrain.train.callbacks.step_callback import StepCallback

# What a run directory needs to judge its checkpoints (`pretrain.run_dir` itself opens no weights).
TRAINING_CHECKPOINTS = CheckpointCheck(training_checkpoint_problem, foreign=FOREIGN, diverged=DIVERGED)
FULL_BELOW_BYTES = 64 * 2**20  # a write that failed with less free space than this ran out of it


class PeriodicCheckpoint(StepCallback):
    """Save every `every_n_steps` optimizer steps and/or `every_n_minutes`, and when training ends.

    Keeps the newest `keep_last` checkpoints plus pinned ones: steps listed in `pin_steps` and
    multiples of `pin_every_n_steps` (e.g. for LaWA / later evaluation), deleting the rest.
    `run_dir` is set by `pretrain fit` (the recipe's `run_dir`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        every_n_steps: int | None = 1000,
        every_n_minutes: float | None = None,
        keep_last: int = 3,
        pin_every_n_steps: int | None = None,
        pin_steps: Sequence[int] = (),
        save_on_train_end: bool = True,
    ) -> None:
        super().__init__()
        if keep_last < 1:
            raise UserError("checkpoint.keep_last must be at least 1")
        self.run = RunDir(run_dir, TRAINING_CHECKPOINTS) if run_dir is not None else None
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.keep_last = keep_last
        self.pin_every_n_steps = pin_every_n_steps
        self.pin_steps = set(pin_steps)
        self.save_on_train_end = save_on_train_end
        self._last_save_time = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.run is None:
            self.run = RunDir(trainer.default_root_dir, TRAINING_CHECKPOINTS)
        self._last_save_time = time.monotonic()

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if _suspect_since(trainer) is not None:  # inside a streak of bad steps: the weights may be damaged
            return
        due = bool(self.every_n_steps and step % self.every_n_steps == 0)
        if self.every_n_minutes:
            elapsed = time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes
            due = due or trainer.strategy.broadcast(elapsed)  # every rank must agree
        if due:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_end:
            self.save(trainer)

    def pinned(self, step: int) -> bool:
        return step in self.pin_steps or bool(self.pin_every_n_steps and step % self.pin_every_n_steps == 0)

    def _retention_pins(self, trainer: L.Trainer) -> Callable[[int], bool]:
        """Pinned steps, plus the newest checkpoint from before a streak of bad steps (the one to resume from)."""
        suspect = _suspect_since(trainer)
        assert self.run is not None
        before = [step for step, _ in self.run.list_checkpoints() if suspect is not None and step < suspect]
        return lambda step: self.pinned(step) or (bool(before) and step == before[-1])

    def save(self, trainer: L.Trainer) -> Path | None:
        """Write the checkpoint for the current step aside, then publish it under its final name.

        During a streak of bad steps the state is kept as `diverged-step-*.ckpt` (for inspection;
        `--resume auto` never picks it), and nothing is written when a rollback will replace it.
        A file under the final name that this run did not write (copied in, or written by another
        command's `-o`) is set aside as `foreign-step-*.ckpt`, never taken for this run's own."""
        if self.run is None:
            self.run = RunDir(trainer.default_root_dir, TRAINING_CHECKPOINTS)
        module = trainer.lightning_module
        divergence = getattr(module, "divergence", None)
        if divergence is not None and divergence.action == "rollback":
            return None
        step = trainer.global_step
        diverged = _suspect_since(trainer) is not None
        final = self.run.diverged_checkpoint(step) if diverged else self.run.checkpoint(step)
        if trainer.strategy.broadcast(self._already_written(final, module), src=0):
            return final
        # Not `pretrain.files.write_atomic_with`: every rank writes its part (a folder of shards under
        # FSDP2) between barriers, and rank 0 publishes; the hidden `.partial-` name is the one
        # `RunDir.prune_checkpoints` clears after a crash.
        partial = final.with_name(f".partial-{final.name}")
        if trainer.is_global_zero:
            self.run.checkpoints.mkdir(parents=True, exist_ok=True)
            remove(partial)
        trainer.strategy.barrier("checkpoint-prepare")
        try:
            trainer.save_checkpoint(partial, weights_only=False)  # full: optimizer, loops, callbacks
        except (OSError, RuntimeError) as err:
            full = _disk_is_full(err, self.run.checkpoints)
            remove(partial)
            if not full:
                raise
            previous = self.run.latest_checkpoint()
            kept = (
                f"the earlier checkpoints are intact (newest: {previous})"
                if previous
                else "no earlier checkpoint"
            )
            raise UserError(
                f"no space left on the device writing checkpoint {final}; the partial file is removed and {kept}. "
                "Free space (or lower checkpoint.keep_last), then launch the same command again to resume"
            ) from None
        trainer.strategy.barrier("checkpoint-written")
        if trainer.is_global_zero:
            if partial.is_file():  # a sharded checkpoint (a folder) is fsynced by its writer
                fsync(partial)
            os.replace(partial, final)
            fsync(self.run.checkpoints)
            self.run.prune_checkpoints(self.keep_last, self._retention_pins(trainer))
        trainer.strategy.barrier("checkpoint-published")
        self._last_save_time = time.monotonic()
        return final

    def _already_written(self, final: Path, module: L.LightningModule) -> bool:
        """Whether `final` holds a checkpoint this run wrote or resumed from (rank 0). Anything else
        under that name is set aside, with one line, so that the run's own is written there."""
        if not final.exists():
            return False
        if checkpoint_identity(final) in getattr(module, "own_checkpoint_ids", set()):
            return True
        aside = final.with_name(f"foreign-{final.name}")
        n = 1
        while aside.exists():
            aside, n = final.with_name(f"foreign-{n}-{final.name}"), n + 1
        os.replace(final, aside)
        print(f"{final}: not written by this run; set aside as {aside}", file=sys.stderr)
        return False


def _disk_is_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or torch's zip writer failing
    ("unexpected pos ...", a RuntimeError without an errno) on a filesystem that is (nearly) full."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW_BYTES
    except OSError:
        return False


def _suspect_since(trainer: L.Trainer) -> int | None:
    """The first step of the training module's current streak of bad steps (`pretrain.train.spike_guard`)."""
    guard = getattr(trainer.lightning_module, "guard", None)
    return guard.suspect_since if guard is not None else None


class DirectCheckpointIO(TorchCheckpointIO):
    """`torch.save` straight to the checkpoint's (partial) path: no copy in memory, nothing in $TMPDIR."""

    def save_checkpoint(
        self, checkpoint: dict, path: str | os.PathLike, storage_options: object = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("DirectCheckpointIO takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)
