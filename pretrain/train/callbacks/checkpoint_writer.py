"""Asynchronous checkpoint writes: stage a copy at the step boundary, write it in the background.

`start_write` takes the checkpoint dict Lightning would save (`Trainer.save_checkpoint` minus
the write), copies every tensor into fresh CPU memory (pinned when it comes from a GPU) before it
returns, so that the optimizer may change the weights right away, and writes that copy into the
checkpoint's partial name in a thread:

- one file (one process, DDP, FSDP2 with full checkpoints): `torch.save` on rank 0, then fsync;
- a folder of shards (FSDP2): `torch.distributed.checkpoint.async_save` on every rank, which stages
  its shards to CPU the same way and runs its collectives in the thread over `group`, a gloo group
  of its own (`checkpoint_group`), so they never interleave with training's collectives on the
  default group; rank 0 writes the rest of the state (`meta.pt`, small) at once, as Lightning does.

Publishing (the rename to the final name) is `PeriodicCheckpoint`'s job once every rank's write
has completed. Lightning's `AsyncCheckpointIO` is not used: it clones tensors on their own device
(a second model + optimizer on the GPU), queues any number of writes, and gives no handle to
learn when a write has finished, which publishing needs.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_utilities.core.apply_func import apply_to_collection

from pretrain.files import fsync
from pretrain.train import private_apis


def writes_shards(trainer: L.Trainer) -> bool:
    """Whether this trainer saves a folder of shards (FSDP2's distributed checkpoint)."""
    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) and private_apis.saves_sharded_checkpoints(strategy)


def checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo process group for the writes' own collectives (every rank calls this together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


def start_write(
    trainer: L.Trainer, partial: Path, executor: ThreadPoolExecutor, group: dist.ProcessGroup | None
) -> Future[Any] | None:
    """Stage the checkpoint of the current step and start writing it to `partial` in the background
    (every rank calls this). Returns this rank's write, or None when this rank writes nothing."""
    checkpoint = private_apis.dump_checkpoint(trainer)
    if writes_shards(trainer):
        return _start_sharded(trainer, checkpoint, partial, group)
    if not trainer.is_global_zero:
        return None
    staged = apply_to_collection(checkpoint, torch.Tensor, _to_cpu)
    return executor.submit(_save_file, staged, partial)


def _start_sharded(
    trainer: L.Trainer, checkpoint: dict[str, Any], partial: Path, group: dist.ProcessGroup | None
) -> Future[Any]:
    """The layout of `ModelParallelStrategy.save_checkpoint`, written with DCP's `async_save`."""
    from torch.distributed.checkpoint import async_save

    partial.mkdir(parents=True, exist_ok=True)
    shards = {"state_dict": checkpoint.pop("state_dict")}
    shards |= {f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))}
    future = async_save(shards, checkpoint_id=partial, process_group=group)
    if trainer.is_global_zero:
        torch.save(checkpoint, partial / private_apis.SHARDED_METADATA_FILENAME)
    assert isinstance(future, Future)
    return future


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in CPU memory of its own (pinned for a GPU tensor, for a fast copy)."""
    tensor = tensor.detach()
    copy = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
    return copy.copy_(tensor)


def _save_file(checkpoint: dict[str, Any], path: Path) -> None:
    """`torch.save` into `path` (created beside its destination) and flush it to the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    fsync(path)


def write_failed(future: Future[Any] | None) -> BaseException | None:
    """The error of a finished write, if it failed."""
    return future.exception() if future is not None else None


def wait(future: Future[Any] | None) -> None:
    """Block until this rank's write has ended (successfully or not)."""
    if future is not None:
        future.exception()  # waits; the error itself is read by `write_failed`


def running(future: Future[Any] | None) -> bool:
    return future is not None and not future.done()
