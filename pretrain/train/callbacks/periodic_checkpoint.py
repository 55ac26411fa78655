"""`PeriodicCheckpoint`: checkpoints that are never half-written, saved on a cadence, pruned to the last K.

Each checkpoint is written under its partial name in the run's checkpoints folder
(`pretrain.run_dir`) and renamed into place by rank 0 only after every rank has finished writing;
a rename is atomic, so any `step-*.ckpt` that exists is complete, and `--resume auto` can always
trust the newest one. A leftover partial from a crash is removed by the next save.

With `async_save` (the default) the step loop is blocked only while a copy of the state is staged
in CPU memory; the copy is written in the background (`checkpoint_writer`) and published at a
later step boundary, once every rank's write has completed (they agree with one all-reduce per
step while a write is in flight). At most one write is in flight: the next save, a signal's save
and the end of training wait for it first; pruning happens only after a publish. A background
failure (a full disk) is raised at the next step boundary as the same one line as a synchronous
one. `stall_seconds` and `saves` tell how long checkpoints blocked the loop this launch.

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from pretrain.errors import UserError
from pretrain.files import fsync
from pretrain.model.checkpoint import DIVERGED, FOREIGN, checkpoint_identity, training_checkpoint_problem
from pretrain.run_dir import CheckpointCheck, RunDir, remove
from pretrain.train.callbacks import checkpoint_writer
from pretrain.train.callbacks.step_callback import StepCallback

# What a run directory needs to judge its checkpoints (`pretrain.run_dir` itself opens no weights).
TRAINING_CHECKPOINTS = CheckpointCheck(training_checkpoint_problem, foreign=FOREIGN, diverged=DIVERGED)
FULL_BELOW_BYTES = 64 * 2**20  # a write that failed with less free space than this ran out of it


@dataclass(frozen=True)
class PendingWrite:
    """A checkpoint being written in the background: where it goes, and this rank's write."""

    final: Path
    partial: Path
    write: Future[Any] | None  # None on a rank that writes nothing (DDP's other ranks)


class PeriodicCheckpoint(StepCallback):
    """Save every `every_n_steps` optimizer steps and/or `every_n_minutes`, and when training ends.

    Keeps the newest `keep_last` checkpoints plus pinned ones: steps listed in `pin_steps` and
    multiples of `pin_every_n_steps` (e.g. for LaWA / later evaluation), deleting the rest.
    `run_dir` is set by `pretrain fit` (the recipe's `run_dir`). `async_save`: write in the
    background from a copy staged at the step boundary (one copy of the model and optimizer state
    per process in CPU memory while a write is in flight); false writes while the loop waits.
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
        async_save: bool = True,
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
        self.async_save = async_save
        self.stall_seconds = 0.0  # this launch's training loop blocked in checkpoint saving, in seconds
        self.saves = 0  # checkpoints saved (or started, with async_save) this launch
        self._pending: PendingWrite | None = None  # the asynchronous write in flight
        self._executor: ThreadPoolExecutor | None = None
        self._group: torch.distributed.ProcessGroup | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.run is None:
            self.run = RunDir(trainer.default_root_dir, TRAINING_CHECKPOINTS)
        self._last_save_time = time.monotonic()
        if self.async_save and self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
            if checkpoint_writer.writes_shards(trainer):
                self._group = checkpoint_writer.checkpoint_group()

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        with self._stalling():
            self._poll(trainer, wait=False)
        if _suspect_since(trainer) is not None:  # inside a streak of bad steps: the weights may be damaged
            return
        due = bool(self.every_n_steps and step % self.every_n_steps == 0)
        if self.every_n_minutes:
            elapsed = time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes
            due = due or trainer.strategy.broadcast(elapsed)  # every rank must agree
        if due:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Finish the write in flight (discard it after a divergence), then save the last step and
        wait for it: when `fit` returns, every checkpoint is published."""
        with self._stalling():
            if getattr(pl_module, "divergence", None) is not None:
                self._discard(trainer)
            else:
                self._poll(trainer, wait=True)
        if self.save_on_train_end:
            self.save(trainer)
            with self._stalling():
                self._poll(trainer, wait=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Let this rank's write end before the process does; its partial is left for the next save
        to clear (publishing needs every rank, and another may be gone)."""
        if self._pending is not None:
            checkpoint_writer.wait(self._pending.write)
            self._pending = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def pinned(self, step: int) -> bool:
        return step in self.pin_steps or bool(self.pin_every_n_steps and step % self.pin_every_n_steps == 0)

    def _retention_pins(self, trainer: L.Trainer) -> Callable[[int], bool]:
        """Pinned steps, plus the newest checkpoint from before a streak of bad steps (the one to resume from)."""
        suspect = _suspect_since(trainer)
        assert self.run is not None
        before = [step for step, _ in self.run.list_checkpoints() if suspect is not None and step < suspect]
        return lambda step: self.pinned(step) or (bool(before) and step == before[-1])

    def save(self, trainer: L.Trainer) -> Path | None:
        """Write the checkpoint for the current step aside, then publish it under its final name
        (with `async_save`, start writing it and return: it is published at a later step boundary).

        A write still in flight is finished (and published) first: at most one is ever in flight.
        During a streak of bad steps the state is kept as `diverged-step-*.ckpt` (for inspection;
        `--resume auto` never picks it), and nothing is written when a rollback will replace it.
        A file under the final name that this run did not write (copied in, or written by another
        command's `-o`) is set aside as `foreign-step-*.ckpt`, never taken for this run's own."""
        with self._stalling():
            return self._save(trainer)

    def _save(self, trainer: L.Trainer) -> Path | None:
        if self.run is None:
            self.run = RunDir(trainer.default_root_dir, TRAINING_CHECKPOINTS)
        module = trainer.lightning_module
        divergence = getattr(module, "divergence", None)
        if divergence is not None and divergence.action == "rollback":
            return None
        self._poll(trainer, wait=True)
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
        self.saves += 1
        self._last_save_time = time.monotonic()
        try:
            if self.async_save:
                assert self._executor is not None, "async_save starts with on_train_start"
                write = checkpoint_writer.start_write(trainer, partial, self._executor, self._group)
                self._pending = PendingWrite(final, partial, write)
                return final
            trainer.save_checkpoint(partial, weights_only=False)  # full: optimizer, loops, callbacks
        except (OSError, RuntimeError) as err:
            full = _disk_is_full(err, self.run.checkpoints)
            remove(partial)
            if not full:
                raise
            raise self._no_space(final) from None
        trainer.strategy.barrier("checkpoint-written")
        self._publish(trainer, final, partial)
        return final

    def _poll(self, trainer: L.Trainer, wait: bool) -> None:
        """Publish the write in flight once every rank's part has completed (with `wait`, block
        until it has). Every rank calls this at the same point: one all-reduce keeps them in
        lockstep. A write that failed removes its partial and raises here (one line when the disk
        is full), the earlier checkpoints intact."""
        pending = self._pending
        if pending is None:
            return
        if wait:
            checkpoint_writer.wait(pending.write)
        running = checkpoint_writer.running(pending.write)
        error = None if running else checkpoint_writer.write_failed(pending.write)
        assert self.run is not None
        full = error is not None and _disk_is_full(error, self.run.checkpoints)
        local = [running, error is not None, full]
        flags = trainer.strategy.reduce(
            torch.tensor(local, dtype=torch.int32, device=trainer.strategy.root_device), reduce_op="max"
        ).tolist()
        if flags[0]:
            return
        self._pending = None
        if not flags[1]:
            self._publish(trainer, pending.final, pending.partial)
            return
        if trainer.is_global_zero:
            remove(pending.partial)
        trainer.strategy.barrier("checkpoint-failed")
        if flags[2]:
            raise self._no_space(pending.final) from None
        if error is not None:
            raise error
        raise RuntimeError(
            f"writing checkpoint {pending.final} failed on another rank; its partial is removed"
        )

    def _discard(self, trainer: L.Trainer) -> None:
        """Let the write in flight end and remove it (after a divergence: it belongs to the abandoned path)."""
        pending = self._pending
        if pending is None:
            return
        checkpoint_writer.wait(pending.write)
        trainer.strategy.barrier("checkpoint-discard")
        self._pending = None
        if trainer.is_global_zero:
            remove(pending.partial)
            print(
                f"divergence: discarded {pending.final.name}, still being written: it is newer than "
                "the checkpoint the run goes back to",
                file=sys.stderr,
            )

    def _publish(self, trainer: L.Trainer, final: Path, partial: Path) -> None:
        """Rank 0 renames a complete checkpoint into place, then prunes (never before: the only
        complete checkpoint must not go while another is being written)."""
        assert self.run is not None
        if trainer.is_global_zero:
            if partial.is_file():  # a sharded checkpoint (a folder) is fsynced by its writer
                fsync(partial)
            os.replace(partial, final)
            fsync(self.run.checkpoints)
            self.run.prune_checkpoints(self.keep_last, self._retention_pins(trainer))
        trainer.strategy.barrier("checkpoint-published")

    def _no_space(self, final: Path) -> UserError:
        assert self.run is not None
        previous = self.run.latest_checkpoint()
        kept = (
            f"the earlier checkpoints are intact (newest: {previous})"
            if previous
            else "no earlier checkpoint"
        )
        return UserError(
            f"no space left on the device writing checkpoint {final}; the partial file is removed and {kept}. "
            "Free space (or lower checkpoint.keep_last), then launch the same command again to resume"
        )

    @contextmanager
    def _stalling(self) -> Iterator[None]:
        """Count the time inside as time the training loop was blocked by checkpoints."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.stall_seconds += time.monotonic() - start

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
