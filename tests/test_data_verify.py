"""A prepared dataset altered after the fact is never trained on silently."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from helpers import recipe

from pretrain.cli import main
from pretrain.data.shards import load_manifest


@pytest.fixture
def dataset(tiny_dataset, tmp_path):
    """A copy of the tiny dataset that a test may damage."""
    return shutil.copytree(tiny_dataset, tmp_path / "data")


def flip_a_byte(path, at: int = 1001) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01  # a token id changes by 1 or 256, within the vocabulary or not
    path.write_bytes(bytes(data))


def test_a_shard_changed_in_place_is_found_by_verify_and_stops_training(dataset, tmp_path, capsys):
    assert main(["data", "verify", str(dataset)]) == 0
    assert "checksums and token ids match" in capsys.readouterr().out
    shard = load_manifest(dataset).shards("train")[0].path
    flip_a_byte(shard, 1000)  # the low byte: the id stays below 512, only the checksum notices
    load_manifest(dataset)  # same size: the manifest check alone passes
    assert main(["data", "verify", str(dataset)]) == 2
    assert f"{shard}: its content changed since it was prepared" in capsys.readouterr().err
    config = recipe(tmp_path, dataset, tmp_path / "run", trainer__max_steps=2)
    assert main(["fit", "--config", str(config)]) == 2  # data.verify_shards (2) covers this 2-shard dataset
    err = capsys.readouterr().err
    assert f"pretrain fit: error: {shard}: its content changed" in err
    assert not list((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_token_outside_the_vocabulary_stops_training_naming_shard_and_position(
    dataset, tmp_path, capsys, workers
):
    manifest = load_manifest(dataset)
    shard = manifest.shards("train")[0].path
    tokens = np.fromfile(shard, dtype=manifest.dtype)
    tokens[123::40] = 60_000  # vocab 512; every window read holds one
    tokens.tofile(shard)
    assert main(["data", "verify", str(dataset)]) == 2
    assert f"{shard}: token id 60000 at position 123 is outside the tokenizer's vocabulary of 512" in (
        capsys.readouterr().err
    )
    config = recipe(tmp_path, dataset, tmp_path / "run", trainer__max_steps=2)
    args = ["fit", "--config", str(config), "--data.verify_shards", "0", "--data.num_workers", str(workers)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"pretrain fit: error: {re.escape(str(shard))}: token id 60000 at position \d+ is outside", err
    )
    assert "pretrain data verify" in err
