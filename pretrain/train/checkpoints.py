"""Periodic checkpoints that are never half-written, keep-last-K pruning, and `--resume` resolution.

Checkpoints live in `RUN_DIR/checkpoints/step-00001000.ckpt` (a file, or a directory of shards
under FSDP2). Each is written under a temporary name `.partial-step-...` and renamed into place
by rank 0 only after every rank has finished writing; a rename is atomic, so any `step-*.ckpt`
that exists is complete, and `--resume auto` can always trust the newest one. A leftover
partial from a crash is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from pretrain.data.shards import fsync_dir
from pretrain.errors import UserError

_NAME = re.compile(r"step-(\d+)\.ckpt")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `directory`, oldest first, as (step, path)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def resolve_resume(resume: str, directory: str | os.PathLike) -> Path | None:
    """`auto`: the newest complete checkpoint (None if there is none); `none`: None, refused if
    `directory` already holds checkpoints (a fresh run there would mix with them); else a path."""
    if resume == "none":
        found = list_checkpoints(directory)
        if found:
            raise UserError(
                f"--resume none: {directory} already holds checkpoints of an earlier run (newest: step "
                f"{found[-1][0]}); a new run there would mix its checkpoints with them. Use another "
                "run_dir, move those checkpoints away, or continue the run with --resume auto"
            )
        return None
    if resume == "auto":
        found = list_checkpoints(directory)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume}: no such checkpoint (use 'auto', 'none' or an existing path)")
    return path


class PeriodicCheckpoint(Callback):
    """Save every `every_n_steps` optimizer steps and/or `every_n_minutes`, and when training ends.

    Keeps the newest `keep_last` checkpoints plus pinned ones: steps listed in `pin_steps` and
    multiples of `pin_every_n_steps` (e.g. for LaWA / later evaluation), deleting the rest.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_steps: int | None = 1000,
        every_n_minutes: float | None = None,
        keep_last: int = 3,
        pin_every_n_steps: int | None = None,
        pin_steps: Sequence[int] = (),
        save_on_train_end: bool = True,
    ) -> None:
        if keep_last < 1:
            raise UserError("checkpoint.keep_last must be at least 1")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.keep_last = keep_last
        self.pin_every_n_steps = pin_every_n_steps
        self.pin_steps = set(pin_steps)
        self.save_on_train_end = save_on_train_end
        self._last_save_time = time.monotonic()
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        self._last_save_time = time.monotonic()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside gradient accumulation: not a step boundary
            return
        self._last_step = step
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if self.every_n_minutes:
            elapsed = time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes
            due = due or trainer.strategy.broadcast(elapsed)  # every rank must agree
        if due:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_end:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        """Write the checkpoint for the current step aside, then publish it under its final name."""
        assert self.dirpath is not None
        step = trainer.global_step
        final = self.dirpath / checkpoint_name(step)
        if trainer.strategy.broadcast(final.exists(), src=0):  # rank 0 decides (NFS caches lookups)
            return final
        partial = self.dirpath / f".partial-{checkpoint_name(step)}"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(partial)
        trainer.strategy.barrier("checkpoint-prepare")
        trainer.save_checkpoint(partial, weights_only=False)  # full: optimizer, loops, callbacks
        trainer.strategy.barrier("checkpoint-written")
        if trainer.is_global_zero:
            if partial.is_file():  # a sharded checkpoint (a folder) is fsynced by its writer
                with open(partial, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(partial, final)
            fsync_dir(self.dirpath)
            self._prune()
        trainer.strategy.barrier("checkpoint-published")
        self._last_save_time = time.monotonic()
        return final

    def _prune(self) -> None:
        assert self.dirpath is not None
        for leftover in self.dirpath.glob(".partial-*"):
            _remove(leftover)
        found = list_checkpoints(self.dirpath)
        for step, path in found[: -self.keep_last]:
            pinned = step in self.pin_steps or (self.pin_every_n_steps and step % self.pin_every_n_steps == 0)
            if not pinned:
                _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
