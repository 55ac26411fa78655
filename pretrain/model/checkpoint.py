"""Model checkpoints: the model config, its weights and (optionally) its tokenizer.

`load_model_checkpoint` reads any of:
- our model file (`torch.save` of a dict, read with `weights_only=True`):
    {"format": "pretrain-model/1", "model_config": {...LlamaConfig fields...},
     "state_dict": {name: tensor}, "tokenizer": "<tokenizer.json text>" | None, "meta": {...}}
- a training checkpoint written by `pretrain fit`: a Lightning `.ckpt` file, or under FSDP2 a
  directory of shards (torch.distributed.checkpoint) with `meta.pt`, read on the CPU without any
  process group; model keys carry the LightningModule's `model.` prefix and the model config,
  tokenizer and special-token ids are under the checkpoint's "pretrain" entry;
- a plain state dict (`torch.save(model.state_dict())`) when the caller names its preset.
`save_model_checkpoint` writes aside and renames into place, so a crash never leaves a
truncated file under the final name.
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
    """Load any checkpoint format of the module docstring (model weights only)."""
    path = Path(path)
    if path.is_dir():
        return _from_training_checkpoint(path, _read_torch_file(path / "meta.pt"), _read_sharded_model(path))
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    payload = _read_torch_file(path)
    if "pretrain" in payload and "state_dict" in payload:
        return _from_training_checkpoint(path, payload, payload["state_dict"])
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


def _read_torch_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (incomplete sharded checkpoint?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint {path} could not be read as a torch file: {err}") from None
    if not isinstance(payload, dict):
        raise UserError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    return payload


def _read_sharded_model(path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of an FSDP2 checkpoint directory, gathered on the CPU."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
            no_dist=True,
        )
    except Exception as err:
        raise UserError(f"sharded checkpoint {path} could not be read: {err}") from None
    return state["state_dict"]


def _from_training_checkpoint(
    path: Path, payload: dict[str, Any], state_dict: dict[str, Any]
) -> ModelCheckpoint:
    info = payload.get("pretrain")
    if not isinstance(info, dict) or "model_config" not in info:
        raise UserError(f"{path} is a Lightning checkpoint without pretrain's model config")
    model_state = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    meta = {k: info.get(k) for k in ("bos_id", "eos_id", "global_step", "tokens_seen")}
    meta["source"] = {"kind": "training-checkpoint", "path": str(path.resolve())}
    if info.get("expansion"):  # a LLaMA Pro stage: which blocks `pretrain expand` added
        meta["expansion"] = info["expansion"]
    return ModelCheckpoint(
        LlamaConfig.from_dict(info["model_config"]), model_state, info.get("tokenizer"), meta
    )
