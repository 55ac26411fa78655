"""Parallelism and execution of the model for training, kept apart from the training step (as
torchtitan keeps `parallelize` apart from its model): activation checkpointing, `torch.compile`
and FSDP2 sharding of each transformer block, and the `fsdp2` strategy.

Activation checkpointing of a block, full or selective:
- full: backward recomputes the whole block from its input, so a block keeps only its input
  alive between forward and backward (about a third more compute per step);
- selective (an op-level policy in the spirit of Korthikanti et al. 2022 and torchtitan's,
  simpler than either: it keeps every matmul output and the attention kernel's output)
  recomputes in backward only the cheap element-wise ops between them (RMSNorm, RoPE, SiLU and
  the gate product, residual adds). Those hold a large share of a block's activations, several
  in float32, at a recompute cost of a few percent. Attention kernels that are not PyTorch ops
  the policy can see (xformers, flash-attn builds without registered torch ops) are recomputed
  like element-wise ops.
The block's own `forward` is wrapped, so parameter names (and checkpoints) do not change.

Compile cache (`use_compile_cache`): with `compile`, inductor's FX-graph cache and AOT-autograd
cache (on by default in torch) and, on a GPU, Triton's kernel cache are pointed at one directory
the run names (`model.compile_cache`, default `RUN_DIR/compile_cache/`), so a relaunch of the run
(a requeue, on any node that sees the path) loads the compiled graphs instead of compiling them
again. Inductor reads the directory from the environment when it first compiles (the first
forward), so setting it when the model is built is early enough. What makes this safe: inductor
keys every entry by a hash of the graph, the torch version, the device and its own settings,
so a foreign or stale entry is never used for a different graph; it writes every entry to a
temporary name and renames it (`torch._inductor.codecache.write_atomic`), so ranks and nodes
writing the same cache at once never leave a half-written entry; an entry it cannot read back is
treated as a miss and compiled again (tests/test_compile_cache.py). torch's portable cache
(`torch.compiler.save_cache_artifacts`) is not used: a directory on the shared filesystem already
reaches every node, without a second copy to keep in step. A folder that cannot hold the cache
(a path with spaces, which inductor's C++ build splits on; one that cannot be created or written)
is passed over in one line, and the launch compiles into torch's default cache. Settings a user
gives torch (TORCHINDUCTOR_FX_GRAPH_CACHE=0 to debug, say) are left as they are.

`fsdp2` (`trainer.strategy: fsdp2`) is Lightning's `ModelParallelStrategy` with every rank in
one data-parallel mesh. Lightning's "auto" mesh is nodes x devices = data-parallel x
tensor-parallel; we use no tensor parallelism, so under that default the ranks of a node would
each train alone on their shard of the batch with no gradient reduction between them.
Gradient accumulation: Lightning blocks gradient sync on the micro-batches before the last one
of a step only for DDP. Here FSDP2 is told too (`set_requires_gradient_sync(False)`), so it keeps
those micro-batches' gradients unsharded on each rank (float32 under bf16-mixed, 4 bytes per
parameter) and reduce-scatters once per optimizer step instead of once per micro-batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pretrain.errors import UserError
from pretrain.model.llama import Llama
from pretrain.train import private_apis

ACTIVATION_CHECKPOINTING = ("none", "selective", "full")

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._flash_attention_forward.default,
}
FLASH_ATTN_OPS = ("_flash_attn_forward", "_flash_attn_varlen_forward")  # flash-attn >= 2.6


def _registered_ops(namespace: str, names: tuple[str, ...]) -> set[Any]:
    """The `torch.ops.<namespace>.<name>.default` ops that exist (e.g. flash-attn's, once imported)."""
    found = set()
    for name in names:
        try:
            found.add(getattr(getattr(torch.ops, namespace), name).default)
        except (AttributeError, RuntimeError):
            pass
    return found


def _keep(saved: set[Any], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(block: torch.nn.Module, selective: bool) -> torch.nn.Module:
    """`block`, its forward now recomputing its activations in backward (module docstring)."""
    options: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": False}
    if selective:
        saved = SAVED_OPS | _registered_ops("flash_attn", FLASH_ATTN_OPS)
        options["context_fn"] = partial(create_selective_checkpoint_contexts, partial(_keep, saved))
    block.forward = partial(checkpoint, block.forward, **options)
    return block


def parallelize(
    model: Llama,
    activation_checkpointing: str = "none",
    compile: bool = False,
    strategy: Any = None,
    sharding: str = "full",
    bf16: bool = False,
    num_nodes: int = 1,
    compile_cache: Path | None = None,
) -> None:
    """Apply activation checkpointing, compile (its cache in `compile_cache`, when given) and, under
    `ModelParallelStrategy`, FSDP2 to `model` in place: per transformer block, then (FSDP2) on the root."""
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise UserError(f"model.activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}")
    if compile and compile_cache is not None:
        use_compile_cache(compile_cache, verbose=strategy is None or strategy.global_rank == 0)
    for block in model.layers:
        if activation_checkpointing != "none":
            checkpointed(block, selective=activation_checkpointing == "selective")
        if compile:
            block.compile(fullgraph=False)
    if isinstance(strategy, ModelParallelStrategy):
        _fully_shard(model, strategy.device_mesh, sharding, bf16, num_nodes, strategy.global_rank == 0)


def use_compile_cache(directory: Path, verbose: bool = True) -> None:
    """Keep inductor's and Triton's compiled artifacts in `directory` (module docstring); say so.
    A folder that cannot serve is passed over in one line: the launch compiles into torch's
    default cache instead (compiling is never stopped by its cache)."""
    problem = _compile_cache_problem(directory)
    if problem is not None:
        if verbose:
            print(
                f"compile cache: not kept in {directory}: {problem}; this launch uses torch's default cache "
                "(set model.compile_cache to a writable path without spaces)",
                file=sys.stderr,
            )
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory.resolve())
    os.environ["TRITON_CACHE_DIR"] = str(directory.resolve() / "triton")
    if verbose:
        print(f"compile cache: {directory} (reused by every launch of the run that sees it)", file=sys.stderr)


def _compile_cache_problem(directory: Path) -> str | None:
    """Why `directory` cannot hold the compile cache, or None."""
    if any(char.isspace() for char in str(directory.resolve())):
        return "torch's C++ build cannot take a path with spaces"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create it ({err.strerror})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


def _fully_shard(
    model: Llama, device_mesh: Any, sharding: str, bf16: bool, num_nodes: int, verbose: bool
) -> None:
    if device_mesh["tensor_parallel"].size() > 1:
        raise UserError(
            "pretrain shards with FSDP2 only (no tensor parallelism): use `trainer.strategy: fsdp2`, or give "
            "ModelParallelStrategy data_parallel_size = all ranks and tensor_parallel_size = 1"
        )
    mesh = device_mesh["data_parallel"]
    if sharding == "hybrid":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(
            mesh.device_type, (num_nodes, mesh.size() // num_nodes), mesh_dim_names=("replicate", "shard")
        )
    if verbose:
        layout = (
            f"hybrid sharding: replicate over {mesh.size(0)} node(s), shard over {mesh.size(1)} device(s)"
            if sharding == "hybrid"
            else f"full sharding over {mesh.size()} rank(s)"
        )
        print(f"FSDP2: {layout}", file=sys.stderr)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


class FSDP2Strategy(ModelParallelStrategy):
    """`trainer.strategy: fsdp2` (module docstring)."""

    def setup_environment(self) -> None:
        private_apis.set_all_ranks_data_parallel(self, self.num_nodes * self.num_processes)
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
