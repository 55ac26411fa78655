"""The one weights reader (`pretrain.model.checkpoint`): a checkpoint folder from a stranger cannot run code."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
from helpers import MODEL, recipe

from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig
from pretrain.model.checkpoint import check_sharded_checkpoint, load_model_checkpoint, open_checkpoint

MARKER = "pwned"


class Payload:
    """Unpickling this creates the file MARKER: proof that code ran."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def __reduce__(self):
        return (open, (str(self.where / MARKER), "w"))


def sharded_checkpoint(path: Path, extra: dict | None = None) -> Path:
    """A folder like an FSDP2 checkpoint of `pretrain fit`: DCP shards + meta.pt."""
    import torch.distributed.checkpoint as dcp

    config = LlamaConfig(**MODEL)
    state = {f"model.{k}": v for k, v in Llama(config).state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": state, **(extra or {})}, checkpoint_id=path, no_dist=True)
    torch.save({"pretrain": {"model_config": config.to_dict(), "global_step": 4}}, path / "meta.pt")
    return path


def test_a_plain_sharded_checkpoint_reads_and_passes_the_check(tmp_path):
    ckpt = sharded_checkpoint(
        tmp_path / "step-00000004.ckpt", {"optimizer_0": {"lr": 1e-3, "betas": (0.9, 0.95)}}
    )
    check_sharded_checkpoint(ckpt)
    loaded = load_model_checkpoint(ckpt)
    assert loaded.meta["global_step"] == 4 and "tok_embeddings.weight" in loaded.state_dict


def test_a_poisoned_index_is_refused_by_every_command_without_running(tmp_path, capsys):
    ckpt = sharded_checkpoint(tmp_path / "evil.ckpt")
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path)))
    for args in (
        ["export-hf", str(ckpt), str(tmp_path / "hf")],
        ["average", str(ckpt), str(ckpt), "-o", str(tmp_path / "avg.pt")],
        ["expand", str(ckpt), "-o", str(tmp_path / "pro.pt"), "--every", "1"],
        ["generate", str(ckpt), "--prompt", "x"],
    ):
        assert main(args) == 2, args
        assert "refused to read its index" in capsys.readouterr().err
    with pytest.raises(UserError, match="refused to read its index"):
        check_sharded_checkpoint(ckpt)
    assert not (tmp_path / MARKER).exists()


def test_a_poisoned_entry_is_never_unpickled(tmp_path):
    ckpt = sharded_checkpoint(tmp_path / "evil.ckpt", {"evil": Payload(tmp_path)})
    assert not (tmp_path / MARKER).exists()  # saving does not run it
    assert open_checkpoint(ckpt).names  # weights are read, the entry is not
    with pytest.raises(UserError, match="entry evil holds more than plain values"):
        check_sharded_checkpoint(ckpt)  # what `--resume` and `branch_from` run before Lightning loads
    assert not (tmp_path / MARKER).exists()


def test_resuming_from_a_poisoned_folder_is_refused_before_lightning_loads_it(tiny_dataset, tmp_path, capsys):
    ckpt = sharded_checkpoint(tmp_path / "evil.ckpt", {"evil": Payload(tmp_path)})
    config = recipe(tmp_path, tiny_dataset, tmp_path / "run", trainer__strategy="fsdp2")
    assert main(["fit", "--config", str(config), "--resume", str(ckpt)]) == 2
    assert "entry evil holds more than plain values" in capsys.readouterr().err
    assert not (tmp_path / MARKER).exists()
