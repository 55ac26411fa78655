"""Activation checkpointing of one transformer block: full or selective.

Full: backward recomputes the whole block from its input, so a block keeps only its input
alive between forward and backward (about a third more compute per step).

Selective (an op-level policy in the spirit of Korthikanti et al. 2022 and torchtitan's, simpler
than either: it keeps every matmul output and the attention kernel's output) recomputes in
backward only the cheap element-wise ops between them (RMSNorm, RoPE, SiLU and the gate product,
residual adds). Those hold a large share of a block's activations, several in float32, at a
recompute cost of a few percent. Attention kernels that are not PyTorch ops the policy can see
(xformers, flash-attn builds without registered torch ops) are recomputed like element-wise ops.
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
    """`block` wrapped so that backward recomputes its activations (module docstring)."""
    if not selective:
        return checkpoint_wrapper(block, preserve_rng_state=False)
    saved = SAVED_OPS | _registered_ops("flash_attn", FLASH_ATTN_OPS)
    return checkpoint_wrapper(
        block,
        checkpoint_fn=checkpoint,
        use_reentrant=False,
        preserve_rng_state=False,
        context_fn=partial(create_selective_checkpoint_contexts, partial(_keep, saved)),
    )
