"""A prepared dataset altered after the fact is never trained on silently; a damaged manifest is
named in one line by every command that reads it."""

from __future__ import annotations

import json
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


def damage(path, kind: str, drop: str) -> None:
    """Damage a JSON file the way disks, copies and people do; `drop` is the key a "missing key" loses."""
    data = path.read_bytes()
    obj = json.loads(data)
    obj.pop(drop)
    path.write_bytes(
        {
            "empty": b"",
            "truncated": data[: len(data) // 2],
            "garbage": b"\xff\xfe\x00\x81garbage\xc3",
            "42": b"42",
            "[]": b"[]",
            "missing key": json.dumps(obj).encode(),
        }[kind]
    )


DAMAGE = ["empty", "truncated", "garbage", "42", "[]", "missing key"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_manifest_is_named_in_one_line_by_every_reader(
    tiny_dataset, dataset, tmp_path, capsys, kind
):
    path = dataset / "manifest.json"
    damage(path, kind, drop="splits")
    corpus, tokenizer = tiny_dataset.parent / "corpus.jsonl", dataset / "tokenizer.json"
    config = recipe(tmp_path, dataset, tmp_path / "run", trainer__max_steps=2)
    commands = {
        "info": ["data", "info", str(dataset)],
        "verify": ["data", "verify", str(dataset)],
        "prepare": [
            "data",
            "prepare",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tokenizer),
            "--output",
            str(dataset),
            "--num-proc",
            "1",
        ],  # fmt: skip
        "fit": ["fit", "--config", str(config)],
    }
    for name, args in commands.items():
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert f"{path}: damaged manifest (" in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1 or name == "fit", (name, err)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_a_manifest_missing_what_info_shows_is_named_by_info(dataset, capsys):
    path = dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["skipped"]["by_reason"]
    path.write_text(json.dumps(manifest))
    load_manifest(dataset)  # training needs none of it
    assert main(["data", "info", str(dataset)]) == 2
    assert f"{path}: damaged manifest (field 'skipped.by_reason' is missing)" in capsys.readouterr().err
