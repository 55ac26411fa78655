"""A prepared dataset altered after the fact is never trained on silently; a damaged manifest is
named in one line by every command that reads it."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import bare_trainer, recipe, write_dataset
from tokenizers import Tokenizer

from pretrain.cli import main
from pretrain.data.shards import content_fingerprint, load_manifest, sha256_file
from pretrain.data.tokenizer import fingerprint
from pretrain.data.verify import all_shards
from pretrain.files import write_json_atomic
from pretrain.run_dir import RunDir
from pretrain.train.datamodule import PretrainDataModule, Source


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


def swap_two_tokens(tokenizer_json: str) -> str:
    """The same tokenizer with two vocabulary ids swapped: still loadable, a different fingerprint."""
    tok = json.loads(tokenizer_json)
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return json.dumps(tok)


def test_a_tokenizer_swapped_beside_a_dataset_fails_verify_and_stops_training(dataset, tmp_path, capsys):
    path = dataset / "tokenizer.json"
    recorded = load_manifest(dataset).tokenizer_fingerprint
    path.write_text(swap_two_tokens(path.read_text()))
    actual = fingerprint(Tokenizer.from_file(str(path)))
    expected = (
        f"{path}: not the tokenizer the shards were tokenized with (fingerprint {actual[:16]}, "
        f"{dataset / 'manifest.json'} records {recorded[:16]}): put back the tokenizer.json"
    )
    assert main(["data", "verify", str(dataset), "--sample", "1"]) == 2
    assert expected in capsys.readouterr().err
    config = recipe(tmp_path, dataset, tmp_path / "run", trainer__max_steps=2)
    assert main(["fit", "--config", str(config), "--data.verify_shards", "0"]) == 2
    err = capsys.readouterr().err
    assert f"pretrain fit: error: {expected}" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.parametrize("content", [b"", b"\xff\xfe garbage", b"42", b'{"model": []}'])
def test_a_damaged_tokenizer_beside_a_dataset_is_named_in_one_line(dataset, capsys, content):
    path = dataset / "tokenizer.json"
    path.write_bytes(content)
    assert main(["data", "verify", str(dataset)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"pretrain data: error: {path}: not a tokenizer.json the `tokenizers` library can load"
    )
    assert line.endswith(f"put back the tokenizer.json {dataset} was prepared with, or prepare it again")


def dataset_with_checksums(root: Path, shards: int) -> Path:
    """A synthetic dataset (helpers.write_dataset) whose manifest records the shards' real sha256."""
    write_dataset(root, [100] * (shards - 1), val_sizes=(100,))
    manifest = json.loads((root / "manifest.json").read_text())
    splits = {split: manifest["splits"][split]["shards"] for split in ("train", "val")}
    for entry in [e for entries in splits.values() for e in entries]:
        entry["sha256"] = sha256_file(root / entry["file"])
    manifest["content_fingerprint"] = content_fingerprint(splits, "synthetic", "uint32")
    write_json_atomic(root / "manifest.json", manifest)
    return root


def launch(dataset: Path, run: RunDir, sample: int) -> None:
    """What each `pretrain fit` launch does to the data: take the lease, seed everything, set up the data."""
    run.acquire()
    random.seed(42)  # Lightning's seed_everything, the same run seed at every launch
    data = PretrainDataModule(
        {"a": Source(str(dataset))}, seq_len=8, global_batch_tokens=64, verify_shards=sample, num_workers=0
    )
    data.trainer = bare_trainer(default_root_dir=str(run.path))
    data.setup("fit")
    run.release()


def test_each_launch_checks_the_shards_the_run_has_checked_least(tmp_path, capsys):
    dataset = dataset_with_checksums(tmp_path / "data", shards=7)
    run = RunDir(tmp_path / "run")
    keys = {shard.sha256 for shard in all_shards(load_manifest(dataset))}
    for n in range(1, 8):
        launch(dataset, run, sample=2)
        checked = json.loads(run.verified_shards.read_text())["checked"]
        assert set(checked) <= keys and len(checked) == min(2 * n, 7)  # new shards first, until all are
        assert sum(checked.values()) == 2 * n
        assert max(checked.values()) - min(checked.values()) <= 1  # once each before any twice
        assert f"checked {len(checked)} of 7 shard(s) at least once ({run.verified_shards})" in (
            capsys.readouterr().err
        )


@pytest.mark.parametrize(
    "content", [b"", b"\xff garbage", b"42", b'{"checked": []}', b'{"checked": {"x": "1"}}']
)
def test_a_damaged_record_of_checked_shards_is_started_again_in_one_line(tmp_path, capsys, content):
    dataset = dataset_with_checksums(tmp_path / "data", shards=3)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.verified_shards.write_bytes(content)
    launch(dataset, run, sample=2)
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: {run.verified_shards}: ")
    assert warning.endswith("starting the record of checked shards again")
    assert len(json.loads(run.verified_shards.read_text())["checked"]) == 2


def test_a_plain_trainer_checks_random_shards_and_writes_nothing(tmp_path, capsys):
    """Only a `pretrain fit` launch (holding its run's lease) keeps the record, in its run directory."""
    dataset = dataset_with_checksums(tmp_path / "data", shards=3)
    folder = tmp_path / "cwd"
    folder.mkdir()
    data = PretrainDataModule({"a": Source(str(dataset))}, seq_len=8, global_batch_tokens=64, num_workers=0)
    data.trainer = bare_trainer(default_root_dir=str(folder))
    data.setup("fit")
    assert "verified 2 shard(s)" in capsys.readouterr().err
    assert not list(folder.iterdir())


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
