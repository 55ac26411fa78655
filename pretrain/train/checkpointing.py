"""Activation checkpointing of one transformer block: full or selective.

Full: backward recomputes the whole block from its input, so a block keeps only its input
alive between forward and backward (about a third more compute per step).

Selective (the op-level policy of Korthikanti et al. 2022, as in torchtitan): the outputs of the
matmuls and of the attention kernel are kept, and the cheap element-wise ops between them
(RMSNorm, RoPE, SiLU and the gate product, residual adds) are recomputed in backward. Those
element-wise ops hold a large share of a block's activations, several in float32, at a
recompute cost of a few percent.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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


def _keep_matmuls_and_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(block: torch.nn.Module, selective: bool) -> torch.nn.Module:
    """`block` wrapped so that backward recomputes its activations (module docstring)."""
    if not selective:
        return checkpoint_wrapper(block, preserve_rng_state=False)
    return checkpoint_wrapper(
        block,
        checkpoint_fn=checkpoint,
        use_reentrant=False,
        preserve_rng_state=False,
        context_fn=partial(create_selective_checkpoint_contexts, _keep_matmuls_and_attention),
    )
