"""Weight averaging of checkpoints: LaWA along one run, model soups across runs, EMA extraction.

`average_checkpoints(paths, weights)` returns sum_i w_i * theta_i over checkpoints of one
architecture and one tokenizer (weights non-negative, normalized to sum to 1; uniform by default),
as a normal model checkpoint for `export-hf`, `generate` or `init_from`. LaWA (arXiv 2306.03241)
averages the latest k checkpoints of a run spaced S steps apart (`RunDir.lawa_checkpoints`).

Checkpoints are read lazily, so memory holds one running sum plus the tensor being added, not a
copy per checkpoint: checkpoint files (`.ckpt` from `pretrain fit`, model files) are
memory-mapped and only their model tensors are touched (never the optimizer state); FSDP2
directories of shards are read one tensor at a time (`pretrain.model.checkpoint.open_checkpoint`).
With `ema=True` the EMA weights a checkpoint holds (`pretrain.train.callbacks.ema.EMA`) are read instead of
the raw ones; one checkpoint then just extracts them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from pretrain.errors import UserError
from pretrain.model.checkpoint import LazyCheckpoint, ModelCheckpoint, open_checkpoint
from pretrain.progress import progress


def tokenizer_fingerprint(tokenizer_json: str | None) -> str | None:
    """The tokenizer's fingerprint (`pretrain.data.tokenizer.fingerprint`), None if there is none."""
    if tokenizer_json is None:
        return None
    from tokenizers import Tokenizer

    from pretrain.data.tokenizer import fingerprint

    return fingerprint(Tokenizer.from_str(tokenizer_json))


def check_compatible(checkpoints: Sequence[LazyCheckpoint]) -> None:
    """Refuse to average checkpoints of different architectures, tokenizers or parameter sets."""
    first = checkpoints[0]
    reference = first.config.to_dict()
    for other in checkpoints[1:]:
        config = other.config.to_dict()
        differences = [f"{k} {reference[k]} vs {config[k]}" for k in reference if reference[k] != config[k]]
        if differences:
            raise UserError(
                f"cannot average checkpoints of different architectures: {first.path} vs {other.path} differ in "
                + ", ".join(differences)
            )
        if tokenizer_fingerprint(other.tokenizer_json) != tokenizer_fingerprint(first.tokenizer_json):
            raise UserError(
                f"cannot average checkpoints with different tokenizers: {first.path} "
                f"({_describe_tokenizer(first)}) vs {other.path} ({_describe_tokenizer(other)})"
            )
        if sorted(other.names) != sorted(first.names):
            missing = sorted(set(first.names) ^ set(other.names))[:5]
            raise UserError(
                f"{first.path} and {other.path} hold different parameters (e.g. {', '.join(missing)})"
            )


def _describe_tokenizer(checkpoint: LazyCheckpoint) -> str:
    fingerprint = tokenizer_fingerprint(checkpoint.tokenizer_json)
    return "no tokenizer" if fingerprint is None else f"tokenizer {fingerprint[:12]}"


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Uniform weights, or the given ones (one per checkpoint, non-negative) scaled to sum to 1."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise UserError(f"--weights has {len(weights)} values for {count} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights must be non-negative with a positive sum, got {list(weights)}")
    return [w / sum(weights) for w in weights]


def average_checkpoints(
    paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, ema: bool = False
) -> ModelCheckpoint:
    """The weighted average of the checkpoints' weights (module docstring), streamed."""
    if not paths:
        raise UserError("name at least one checkpoint to average")
    weights = normalized_weights(weights, len(paths))
    checkpoints = [open_checkpoint(p, ema=ema) for p in paths]
    check_compatible(checkpoints)
    first = checkpoints[0]
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    steps = ((c, w, name) for c, w in zip(checkpoints, weights) for name in first.names)
    for checkpoint, weight, name in progress(
        steps, "averaging", "tensor", len(checkpoints) * len(first.names)
    ):
        tensor = checkpoint.read(name)
        if name not in total:
            dtypes[name] = tensor.dtype
            total[name] = tensor.to(torch.promote_types(tensor.dtype, torch.float32), copy=True).mul_(weight)
        else:
            total[name].add_(tensor, alpha=weight)
    state = {name: t.to(dtypes[name]) for name, t in total.items()}
    meta = {
        "bos_id": first.meta.get("bos_id"),
        "eos_id": first.meta.get("eos_id"),
        "source": {
            "kind": "average",
            "ema": ema,
            "checkpoints": [
                {"path": str(c.path.resolve()), "weight": w, "global_step": c.meta.get("global_step")}
                for c, w in zip(checkpoints, weights)
            ],
        },
    }
    return ModelCheckpoint(first.config, state, first.tokenizer_json, meta)
