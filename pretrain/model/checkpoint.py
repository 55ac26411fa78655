"""Model checkpoint files: the model config, its weights and (optionally) its tokenizer, in one file.

Format (`torch.save` of a dict, loaded with `weights_only=True`):
    {"format": "pretrain-model/1", "model_config": {...LlamaConfig fields...},
     "state_dict": {name: tensor}, "tokenizer": "<tokenizer.json text>" | None, "meta": {...}}

A plain state-dict file (`torch.save(model.state_dict())`) is accepted too when the caller names
the preset it was built from. Files are written aside and renamed into place, so a crash never
leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import UserError
from pretrain.model.config import LlamaConfig, get_preset

FORMAT = "pretrain-model/1"


@dataclass
class ModelCheckpoint:
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_model_checkpoint(path: str | os.PathLike, checkpoint: ModelCheckpoint) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model_config": checkpoint.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()},
        "tokenizer": checkpoint.tokenizer_json,
        "meta": checkpoint.meta,
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path


def load_model_checkpoint(path: str | os.PathLike, preset: str | None = None) -> ModelCheckpoint:
    """Load one of our model checkpoints, or a plain state dict built from `preset`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint {path} could not be read as a torch file: {err}") from None
    if not isinstance(payload, dict):
        raise UserError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    if payload.get("format") == FORMAT:
        return ModelCheckpoint(
            LlamaConfig.from_dict(payload["model_config"]),
            payload["state_dict"],
            payload.get("tokenizer"),
            payload.get("meta", {}),
        )
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        if preset is None:
            raise UserError(
                f"{path} is a plain state dict with no model config; say which preset it was built from (--preset NAME)"
            )
        return ModelCheckpoint(get_preset(preset), payload)
    raise UserError(f"{path} is neither a pretrain model checkpoint nor a plain state dict")
