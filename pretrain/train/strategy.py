"""`fsdp2`: Lightning's `ModelParallelStrategy` with every rank in one data-parallel (FSDP2) mesh.

Lightning's "auto" mesh for `ModelParallelStrategy` is nodes x devices = data-parallel x
tensor-parallel. We use no tensor parallelism, so under that default the ranks of a node would
each train alone on their shard of the batch with no gradient reduction between them. This
subclass makes the whole world the data-parallel dimension; `PretrainModule.configure_model`
applies `fully_shard` over it (or a replicate x shard mesh for hybrid sharding).
Use it as `trainer.strategy: fsdp2` in a recipe.
"""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry


class FSDP2Strategy(ModelParallelStrategy):
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        super().setup_environment()


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 over all ranks (fully_shard per block)"
    )
