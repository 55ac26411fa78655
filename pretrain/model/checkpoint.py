"""Weights on disk: the one module that opens them, in every form the project reads.

`open_checkpoint(path)` reads a checkpoint's model config, tokenizer and metadata and lists its
tensors without reading them (`LazyCheckpoint.read(name)` reads one; averaging streams this way);
`load_model_checkpoint(path)` reads them all. Both accept:

- a model file, written by `save_model_checkpoint` (`import-hf`, `average`, `expand`): a
  `torch.save` dict read with `weights_only=True`:
    {"format": "pretrain-model/1", "model_config": {...LlamaConfig fields...},
     "state_dict": {name: tensor}, "tokenizer": "<tokenizer.json text>" | None, "meta": {...}};
- a training checkpoint written by `pretrain fit`: a Lightning `.ckpt` file, or under FSDP2 a
  directory of shards (torch.distributed.checkpoint) with `meta.pt`, read on the CPU without a
  process group. Model keys carry the LightningModule's `model.` prefix; the model config,
  tokenizer and special-token ids are under the checkpoint's "pretrain" entry. With `ema=True`
  the EMA weights are read instead: the entry `EMA_STATE_KEY` of the checkpoint's callbacks (in
  a sharded checkpoint, the `state_dict` entries named by `weight_copy_key`);
- a local Hugging Face Llama/Mixtral directory (config.json + safetensors, optional tokenizer.json);
- a plain state dict (`torch.save(model.state_dict())`) when the caller names its preset.

Downloaded checkpoints cannot run code: files are read with `weights_only=True`; the index of a
sharded folder (`.metadata`, a pickle) is unpickled with an allow-list of DCP's own classes, and
only tensors are read from it (`check_sharded_checkpoint` also proves its other entries plain before
a run resumes from it); safetensors hold tensors only.

`meta` holds `checkpoint_id` (written at save time by `pretrain fit`; `checkpoint_identity`),
`bos_id` (the BOS training put before every document, None without; see
`pretrain.model.hf`), `eos_id` and, where known, `global_step`, `tokens_seen`, `expansion` (the
new blocks of `pretrain expand`) and `source` (where the weights came from).
`save_model_checkpoint` writes aside and renames into place, so a crash never leaves a truncated
file under the final name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import UserError, writing
from pretrain.files import write_atomic_with
from pretrain.model.config import LlamaConfig, get_preset
from pretrain.progress import progress

FORMAT = "pretrain-model/1"
EMA_STATE_KEY = "pretrain.ema"  # the EMA callback's entry in a training checkpoint
LAWA_STATE_KEY = "pretrain.lawa"  # the online LaWA callback's entry
EMA_COPY = "ema"  # the one copy the EMA callback keeps

Tensors = dict[str, torch.Tensor]


def weight_copy_key(state_key: str, copy: str, name: str) -> str:
    """Name of a weight copy's tensor among the `state_dict` entries of a sharded checkpoint."""
    return f"{state_key}/{copy}/{name}"


@dataclass
class ModelCheckpoint:
    """A model's config and weights, with its tokenizer and metadata (module docstring)."""

    config: LlamaConfig
    state_dict: Tensors
    tokenizer_json: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LazyCheckpoint:
    """A checkpoint's config, tokenizer and metadata, with its tensors read on demand."""

    path: Path
    config: LlamaConfig
    tokenizer_json: str | None
    meta: dict[str, Any]
    names: list[str]
    read_many: Callable[[Iterable[str]], Tensors]

    def read(self, name: str) -> torch.Tensor:
        return self.read_many([name])[name]

    def load(self) -> ModelCheckpoint:
        """All tensors, read now."""
        return ModelCheckpoint(self.config, self.read_many(self.names), self.tokenizer_json, self.meta)


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def load_model_checkpoint(
    path: str | os.PathLike, preset: str | None = None, ema: bool = False
) -> ModelCheckpoint:
    """Every tensor of any form in the module docstring."""
    return open_checkpoint(path, preset=preset, ema=ema).load()


def open_checkpoint(path: str | os.PathLike, preset: str | None = None, ema: bool = False) -> LazyCheckpoint:
    """Any form in the module docstring, its tensors not read yet (files are memory-mapped)."""
    path = Path(path)
    if is_hf_dir(path):
        if ema:
            raise UserError(
                f"{path} is a Hugging Face directory (one set of weights); --ema needs a training checkpoint"
            )
        return _open_hf(path)
    if path.is_dir():
        return _open_sharded(path, ema)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    payload = _read_torch_file(path, mmap=True)
    if "pretrain" in payload and "state_dict" in payload:
        if ema:
            weights = _ema_entry(path, payload)["copies"][EMA_COPY]
        else:
            weights = _model_entries(payload["state_dict"])
        return _lazy(path, payload, weights)
    if payload.get("format") == FORMAT:
        if ema:
            raise UserError(f"{path} is a model file (one set of weights); --ema needs a training checkpoint")
        config = LlamaConfig.from_dict(payload["model_config"])
        weights = payload["state_dict"]
        return LazyCheckpoint(
            path, config, payload.get("tokenizer"), payload.get("meta", {}), list(weights), _getter(weights)
        )
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        if preset is None:
            raise UserError(
                f"{path} is a plain state dict with no model config; say which preset it was built from (--preset NAME)"
            )
        return LazyCheckpoint(path, get_preset(preset), None, {}, list(payload), _getter(payload))
    raise UserError(
        f"{path} is neither a checkpoint of `pretrain fit`, a pretrain model file, a Hugging Face directory "
        "nor a plain state dict"
    )


FOREIGN = "not a checkpoint written by `pretrain fit`"
DIVERGED = "written during a divergence (the state at a stop, kept for inspection)"


def training_checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete training checkpoint of `pretrain fit`, or None if it is one
    (cheap: the file is memory-mapped, a folder's meta.pt read; no tensor is loaded)."""
    import zipfile

    try:
        if path.is_dir():
            if not (path / ".metadata").is_file() or not (path / "meta.pt").is_file():
                return "an incomplete sharded checkpoint (no .metadata or meta.pt)"
            payload = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        else:
            if path.stat().st_size == 0:
                return "an empty file"
            if not zipfile.is_zipfile(path):
                return "not a complete torch file (truncated?)"
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"unreadable ({detail})"
    if not isinstance(payload, dict) or not isinstance(payload.get("pretrain"), dict):
        return FOREIGN
    if payload["pretrain"].get("diverged"):
        return DIVERGED
    return None


def checkpoint_identity(path: Path) -> str:
    """What tells these weights from others saved under the same name (cheap, no tensor read): the
    `checkpoint_id` that `pretrain fit` writes into every training checkpoint at save time, else
    (older checkpoints, model files, HF folders) the file's size, inode and modification time, so
    a file rewritten in place gets a new identity."""
    target = path / "meta.pt" if path.is_dir() else path
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
        found = payload.get("pretrain", {}).get("checkpoint_id") if isinstance(payload, dict) else None
    except Exception:
        found = None
    if isinstance(found, str) and found:
        return found
    try:
        info = target.stat()
    except OSError:
        info = path.stat()
    return f"stat:{info.st_size}:{info.st_ino}:{info.st_mtime_ns}"


_RUN_CHECKPOINT = re.compile(r"(?:(?:diverged|damaged|abandoned|foreign(?:-\d+)?)-)?step-\d+\.ckpt")


def check_model_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse a model-file destination that would write over what a command must not: one of its
    own inputs, a training checkpoint, or a name in a run's checkpoints folder (the training loop
    would meet a file it did not write under its own checkpoint name)."""
    path = Path(output)
    for source in inputs:
        source = Path(source)
        if (
            path.exists()
            and source.exists()
            and os.path.samefile(path, source)
            or path.resolve() == source.resolve()
        ):
            raise UserError(f"-o {output} is one of the inputs ({source}): write the result to another file")
    if _RUN_CHECKPOINT.fullmatch(path.name) and path.resolve().parent.name == "checkpoints":
        raise UserError(
            f"-o {output}: a run's checkpoint name in a checkpoints folder; `pretrain fit` names its own "
            "checkpoints so: write the model file elsewhere (e.g. beside the run directory)"
        )
    if path.is_dir() or (path.is_file() and training_checkpoint_problem(path) in (None, DIVERGED)):
        raise UserError(f"-o {output} is a training checkpoint or a folder: write the model file elsewhere")
    return path


def save_model_checkpoint(path: str | os.PathLike, checkpoint: ModelCheckpoint) -> Path:
    """Write a model file (module docstring) aside, then rename it into place (`check_model_output`
    first)."""
    path = check_model_output(path)
    payload = {
        "format": FORMAT,
        "model_config": checkpoint.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()},
        "tokenizer": checkpoint.tokenizer_json,
        "meta": checkpoint.meta,
    }
    with writing(path, "output"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_with(path, lambda tmp: torch.save(payload, tmp))
    return path


# ---- the forms ----------------------------------------------------------------------------------


def _getter(weights: Tensors) -> Callable[[Iterable[str]], Tensors]:
    return lambda names: {name: weights[name] for name in names}


def _model_entries(state_dict: dict[str, Any]) -> Tensors:
    return {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}


def _read_torch_file(path: Path, mmap: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (incomplete sharded checkpoint?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise UserError(f"checkpoint {path} could not be read as a torch file: {err}") from None
    if not isinstance(payload, dict):
        raise UserError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    return payload


def _lazy(path: Path, payload: dict[str, Any], weights: Tensors) -> LazyCheckpoint:
    """A training checkpoint (file, or meta.pt of a directory) whose tensors `weights` gives."""
    info = payload.get("pretrain")
    if not isinstance(info, dict) or "model_config" not in info:
        raise UserError(f"{path} is a Lightning checkpoint without pretrain's model config")
    meta = {k: info.get(k) for k in ("bos_id", "eos_id", "global_step", "tokens_seen", "checkpoint_id")}
    meta["source"] = {"kind": "training-checkpoint", "path": str(path.resolve())}
    if info.get("expansion"):  # a LLaMA Pro stage: which blocks `pretrain expand` added
        meta["expansion"] = info["expansion"]
    config = LlamaConfig.from_dict(info["model_config"])
    return LazyCheckpoint(path, config, info.get("tokenizer"), meta, list(weights), _getter(weights))


def _ema_entry(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    entry = payload.get("callbacks", {}).get(EMA_STATE_KEY)
    if entry is None or EMA_COPY not in entry["copies"]:
        raise UserError(
            f"{path} holds no EMA weights: train with the pretrain.train.callbacks.ema.EMA callback to have them"
        )
    return entry


def _open_sharded(path: Path, ema: bool) -> LazyCheckpoint:
    """An FSDP2 checkpoint directory: metadata from meta.pt and the DCP index, tensors on demand."""
    import torch.distributed.checkpoint as dcp

    if not (path / "meta.pt").is_file():
        raise UserError(f"{path} is a directory but not a sharded checkpoint of `pretrain fit` (no meta.pt)")
    payload = _read_torch_file(path / "meta.pt")
    try:
        index = _safe_reader(path).read_metadata().state_dict_metadata
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"sharded checkpoint {path} could not be read: {err}") from None
    if ema:
        _ema_entry(path, payload)
        prefix = weight_copy_key(EMA_STATE_KEY, EMA_COPY, "")
    else:
        prefix = "model."
    names = [k.removeprefix("state_dict." + prefix) for k in index if k.startswith("state_dict." + prefix)]

    def read_many(wanted: Iterable[str]) -> Tensors:
        tensors = {}
        for name in wanted:
            entry = index[f"state_dict.{prefix}{name}"]
            tensors[name] = torch.empty(entry.size, dtype=entry.properties.dtype)
        with warnings.catch_warnings():  # no process group: loading in this one process is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            state = {"state_dict": {prefix + name: t for name, t in tensors.items()}}
            try:
                dcp.load(state, storage_reader=_safe_reader(path), no_dist=True)
            except Exception as err:
                raise UserError(f"sharded checkpoint {path} could not be read: {err}") from None
        return tensors

    checkpoint = _lazy(path, payload, {})
    checkpoint.names, checkpoint.read_many = names, read_many
    return checkpoint


def _open_hf(path: Path) -> LazyCheckpoint:
    """A local Hugging Face directory, converted to our names (read whole: its tensors are fused here)."""
    from safetensors.torch import load_file

    from pretrain.model.hf import bos_from_hf, config_from_hf, from_hf_state_dict

    config_path = path / "config.json"
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}: invalid JSON ({err})") from None
    try:
        config = config_from_hf(hf, str(config_path))
    except KeyError as err:
        raise UserError(f"{config_path}: missing field {err}") from None
    weights: Tensors = {}
    for file in progress(_hf_weight_files(path), "reading weights", "file"):
        try:
            weights |= (
                load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True)
            )
        except Exception as err:  # safetensors' SafetensorError, a truncated pickle, ...
            raise UserError(f"{file}: not a readable weights file ({err}); download it again") from None
    state = from_hf_state_dict(weights, config)
    _check_shapes(config, state, config_path)
    tokenizer_path = path / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_text() if tokenizer_path.is_file() else None
    meta = {
        "bos_id": bos_from_hf(hf),
        "eos_id": hf.get("eos_token_id"),
        "source": {"kind": "huggingface", "path": str(path.resolve())},
    }
    return LazyCheckpoint(path, config, tokenizer_json, meta, list(state), _getter(state))


def _check_shapes(config: LlamaConfig, state: Tensors, source: Path) -> None:
    """Refuse weights whose shapes disagree with the config (caught now, not when they are used)."""
    from pretrain.model.llama import Llama

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise UserError(
                f"{source}: the config gives {name} the shape {expected[name]}, but the weights hold "
                f"{tuple(tensor.shape)}: config.json and the weights files do not belong together"
            )


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [hf_dir / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return [hf_dir / name]
    shards = sorted(p for p in hf_dir.iterdir() if re.fullmatch(r"model-\d+-of-\d+\.safetensors", p.name))
    if shards:
        return shards
    raise UserError(f"{hf_dir} has no model.safetensors, sharded safetensors or pytorch_model.bin weights")


# ---- sharded checkpoints from strangers ------------------------------------------------------------

# What the index (`.metadata`) of a sharded checkpoint may name when unpickled: DCP's own metadata
# classes and the plain values in them. Anything else (a function, a class that runs code) is refused.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or module == "torch.distributed.checkpoint.metadata"
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return super().find_class(module, name)


def _safe_reader(path: Path) -> Any:
    """A DCP reader of `path` whose index is unpickled with an allow-list (module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = Path(self.path) / ".metadata"
            try:
                with open(index, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as err:
                raise UserError(
                    f"sharded checkpoint {path}: refused to read its index {index}: {err}"
                ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def check_sharded_checkpoint(path: str | os.PathLike) -> None:
    """Refuse a sharded checkpoint that could run code when Lightning resumes from it: its index
    must unpickle with the allow-list and every non-tensor entry (optimizer settings, ...) must load
    with `weights_only=True`. Called before `--resume`/`branch_from` hand a folder to Lightning."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)

    class PlainValuesPlanner(DefaultLoadPlanner):
        refused: list[str] = []

        def load_bytes(self, read_item: Any, value: Any) -> None:
            try:
                torch.load(value, weights_only=True)
            except Exception:
                self.refused.append(read_item.dest_index.fqn)

    index = _safe_reader(path).read_metadata().state_dict_metadata
    entries = {key: 0 for key, item in index.items() if isinstance(item, BytesStorageMetadata)}
    planner = PlainValuesPlanner(flatten_state_dict=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(entries, storage_reader=_safe_reader(path), planner=planner, no_dist=True)
    if planner.refused:
        raise UserError(
            f"sharded checkpoint {path}: entry {', '.join(planner.refused[:3])} holds more than plain values "
            "and could run code when loaded; refused (only use checkpoints you trust, or their weights through "
            "model.init_from, which reads tensors only)"
        )
