"""Every private Lightning API pretrain uses, in one place, with the reason each one stays.

Lightning is bounded above to the minor version these are tested with (pyproject.toml);
`tests/test_structure.py::test_private_lightning_apis_still_exist` checks that each still exists and fails naming it after an upgrade.

- `_SignalConnector` and `Trainer._signal_connector`: Lightning installs its own SIGTERM/SIGUSR1
  handlers (checkpoint-and-requeue inside the handler, `SIGTERMException` mid-accumulation) and
  offers no public switch for them; we replace the connector with one whose handlers only set
  our flag (`pretrain.train.callbacks.requeue`).
- `ModelParallelStrategy._data_parallel_size` / `_tensor_parallel_size`: the sizes are resolved
  from "auto" only when the environment is known, which is when `fsdp2` makes every rank
  data-parallel (`pretrain.train.parallelize.FSDP2Strategy`).
- `ModelParallelStrategy._save_distributed_checkpoint`: the constructor argument has no public
  getter; EMA/LaWA copies under FSDP2 need sharded checkpoints (`pretrain.train.callbacks.weight_copies`).
- `torch.cuda.memory._record_memory_history` / `_dump_snapshot`: torch's only way to take the CUDA
  memory snapshot that https://pytorch.org/memory_viz reads (`pretrain.train.callbacks.profiler`).
- `Trainer._checkpoint_connector.dump_checkpoint` and `_METADATA_FILENAME`: an asynchronous save needs
  the checkpoint dict without the write `Trainer.save_checkpoint` does at once, and writes FSDP2's
  folder in Lightning's layout (`pretrain.train.callbacks.checkpoint_writer`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

SignalConnector = _SignalConnector


def replace_signal_connector(trainer: Any, connector: Any) -> None:
    trainer._signal_connector = connector


def set_all_ranks_data_parallel(strategy: ModelParallelStrategy, world_size: int) -> None:
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = world_size
    if strategy._tensor_parallel_size == "auto":
        strategy._tensor_parallel_size = 1


def saves_sharded_checkpoints(strategy: ModelParallelStrategy) -> bool:
    return bool(strategy._save_distributed_checkpoint)


def record_cuda_memory_history(enabled: bool) -> None:
    """Start (up to 100,000 allocation events) or stop recording CUDA allocations for a snapshot."""
    if enabled:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    else:
        torch.cuda.memory._record_memory_history(enabled=None)


def dump_cuda_memory_snapshot(path: str) -> None:
    torch.cuda.memory._dump_snapshot(path)


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The dict `Trainer.save_checkpoint` would write (hooks included), without writing it: an
    asynchronous save stages it and writes it in the background (`pretrain.train.callbacks.checkpoint_writer`)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


SHARDED_METADATA_FILENAME = _METADATA_FILENAME  # the non-tensor state beside an FSDP2 folder of shards
