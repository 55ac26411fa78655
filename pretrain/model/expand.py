"""Block expansion (LLaMA Pro, Wu et al. 2024, arXiv 2401.02415): deepen a trained model for free.

A copy of a transformer block is inserted right after it, with the two projections that write
into the residual stream (the attention output projection and the MLP down projection, every
expert's for a MoE) set to zero. The copy then adds exactly zero to the residual stream, so the
expanded model computes the same logits as the original; trained alone on new data (the
originals frozen: `PretrainModule(trainable_blocks="new")`), the new blocks add knowledge while
the old ones keep what they knew.

    pretrain expand CKPT_OR_HF_DIR -o OUT --every K          a copy after every K-th block
    pretrain expand CKPT_OR_HF_DIR -o OUT --positions 3,7    a copy after blocks 3 and 7 (0-based)

The output is a normal model checkpoint (`n_layers` grown, exportable to HF) whose meta records
the expansion: `meta["expansion"]["new_layers"]` are the indices of the new blocks in the
expanded model, `copied_from` the original block each one copies. The MoE load-balancing loss is
averaged over all layers, so its value (not the logits) changes with the number of layers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pretrain.errors import UserError
from pretrain.model.checkpoint import ModelCheckpoint, load_model_checkpoint
from pretrain.model.config import LlamaConfig

# Weights of a block that write into the residual stream: zeroed in a new block.
RESIDUAL_WRITES = re.compile(r"attn\.out_proj\.weight|mlp\.down\.weight|mlp\.experts\.\d+\.down\.weight")
LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def blocks_to_copy(
    n_layers: int, every: int | None = None, positions: Sequence[int] | None = None
) -> list[int]:
    """The original blocks that get a copy right after them: every `every`-th block (the last of
    each group of `every`, as LLaMA Pro does), or the given 0-based `positions`."""
    if (every is None) == (positions is None):
        raise UserError("give either --every K or --positions I,J,... (not both)")
    if every is not None:
        if not 1 <= every <= n_layers:
            raise UserError(f"--every must be between 1 and the number of layers ({n_layers}), got {every}")
        return list(range(every - 1, n_layers, every))
    assert positions is not None  # exactly one of the two is given (checked above)
    chosen = sorted(positions)
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_layers or len(set(chosen)) != len(chosen):
        raise UserError(
            f"--positions must be distinct block indices in [0, {n_layers - 1}] (a copy is inserted after "
            f"each), got {list(positions)}"
        )
    return chosen


def expand(
    config: LlamaConfig, state: dict[str, torch.Tensor], copy_after: Sequence[int]
) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, list[int]]]:
    """Insert a zero-output copy of each block in `copy_after` right after it.

    Returns the expanded config, state dict and the expansion record (`new_layers`,
    `copied_from`) for the checkpoint's meta. Tensors of the original blocks are shared, not copied.
    """
    by_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(config.n_layers)}
    expanded: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = LAYER_KEY.fullmatch(key)
        if match:
            by_layer[int(match[1])][match[2]] = tensor
        else:
            expanded[key] = tensor
    copies = set(copy_after)
    new_layers, copied_from, index = [], [], 0
    for original in range(config.n_layers):
        expanded |= {f"layers.{index}.{name}": t for name, t in by_layer[original].items()}
        index += 1
        if original in copies:
            expanded |= {
                f"layers.{index}.{name}": torch.zeros_like(t)
                if RESIDUAL_WRITES.fullmatch(name)
                else t.clone()
                for name, t in by_layer[original].items()
            }
            new_layers.append(index)
            copied_from.append(original)
            index += 1
    record = {"new_layers": new_layers, "copied_from": copied_from}
    return config.replace(n_layers=index), expanded, record


def expand_checkpoint(
    source: str | os.PathLike, every: int | None = None, positions: Sequence[int] | None = None
) -> ModelCheckpoint:
    """The expanded model of `source` (module docstring), with the expansion recorded in its meta."""
    original = load_model_checkpoint(source)
    copy_after = blocks_to_copy(original.config.n_layers, every, positions)
    config, state, record = expand(original.config, original.state_dict, copy_after)
    meta = {
        "bos_id": original.meta.get("bos_id"),
        "eos_id": original.meta.get("eos_id"),
        "source": {
            "kind": "expand",
            "path": str(Path(source).resolve()),
            "n_layers": original.config.n_layers,
        },
        "expansion": record,
    }
    return ModelCheckpoint(config, state, original.tokenizer_json, meta)
