"""`fsdp2`: Lightning's `ModelParallelStrategy` with every rank in one data-parallel (FSDP2) mesh.

Lightning's "auto" mesh for `ModelParallelStrategy` is nodes x devices = data-parallel x
tensor-parallel. We use no tensor parallelism, so under that default the ranks of a node would
each train alone on their shard of the batch with no gradient reduction between them. This
subclass makes the whole world the data-parallel dimension; `PretrainModule.configure_model`
applies `fully_shard` over it (or a replicate x shard mesh for hybrid sharding).
Use it as `trainer.strategy: fsdp2` in a recipe.

Gradient accumulation: Lightning blocks gradient sync on the micro-batches before the last one
of a step only for DDP. Here FSDP2 is told too (`set_requires_gradient_sync(False)`), so it keeps
those micro-batches' gradients unsharded on each rank (float32 under bf16-mixed, 4 bytes per
parameter) and reduce-scatters once per optimizer step instead of once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch.distributed.fsdp import FSDPModule


class FSDP2Strategy(ModelParallelStrategy):
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        super().setup_environment()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """No gradient reduction in the backward passes inside (all but a step's last micro-batch)."""
        sharded = [m for m in self.model.modules() if isinstance(m, FSDPModule)] if self.model else []
        for module in sharded:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in sharded:
                module.set_requires_gradient_sync(True, recurse=False)


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 over all ranks (fully_shard per block)"
    )
