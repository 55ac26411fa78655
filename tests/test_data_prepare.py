"""`pretrain data prepare`: round trip, determinism across --num-proc, kill-and-rerun, bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import require, units_done

from pretrain.cli import main
from pretrain.data.loader import build_train_dataset
from pretrain.data.prepare import inputs
from pretrain.data.prepare.pipeline import prepare
from pretrain.data.prepare.settings import PrepareOptions, Settings
from pretrain.data.prepare.worker import is_val
from pretrain.data.shards import load_manifest
from pretrain.data.tokenizer import EOS, fingerprint, load_tokenizer, train_bpe
from pretrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from data model token shard epoch".split()
EXTRA = ["café", "naïve", "日本語", "emoji 🙂", "tab\there", "new\nline", '"quoted"']


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS + EXTRA) for _ in range(rng.randint(1, 60))) + f" #{seed}-{i}"
        for i in range(n)
    ]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "meta": {"i": i}}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(make_docs(300, seed=99), vocab_size=320).save(str(path))
    return path


def read_split(root: Path, split: str) -> list[np.ndarray]:
    """Documents of a split, from the shards and their sidecars' document offsets."""
    manifest = load_manifest(root)
    docs = []
    for shard in manifest.shards(split):
        sidecar = json.loads(shard.path.with_suffix(".json").read_text())
        tokens = np.fromfile(shard.path, dtype=manifest.dtype)
        assert sidecar["tokens"] == len(tokens) and sidecar["dtype"] == manifest.dtype.name
        assert sidecar["eos_id"] == manifest.eos_id and len(sidecar["doc_offsets"]) == sidecar["documents"]
        docs += np.split(tokens, sidecar["doc_offsets"][1:])
    return docs


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_split_by_hash_and_shards(tmp_path, tokenizer):
    docs = make_docs(120)
    files = [
        write_jsonl(tmp_path / "in" / "a.jsonl", docs[:70]),
        write_jsonl(tmp_path / "in" / "b.jsonl", docs[70:]),
    ]
    manifest = prepare(
        [str(tmp_path / "in" / "*.jsonl")],
        tokenizer,
        tmp_path / "out",
        Settings(val_fraction=0.25, shard_tokens=700),
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    tok = load_tokenizer(tokenizer)
    assert [i["path"] for i in manifest.data["inputs"]] == [str(f) for f in files]
    for split in ("train", "val"):
        expected = [d for d in docs if is_val(d, 0.25) == (split == "val")]
        got = read_split(tmp_path / "out", split)
        assert len(got) == len(expected) == manifest.data["splits"][split]["documents"] > 0
        for tokens, text in zip(got, expected, strict=True):
            assert tokens[-1] == tok.eos_id and (tokens[:-1] != tok.eos_id).all()
            assert tok.tokenizer.decode(tokens[:-1].tolist()) == text
    train = manifest.shards("train")
    assert len(train) > 3 and all(s.tokens <= 700 for s in train)  # cut at document boundaries
    assert manifest.dtype == np.dtype("<u2") and manifest.data["tokenizer"]["vocab_size"] == 320
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert not (tmp_path / "out" / ".prepare").exists()


def test_bos_starts_every_document(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", make_docs(20))
    prepare(
        [str(tmp_path / "a.jsonl")],
        tokenizer,
        tmp_path / "out",
        Settings(bos=True),
        options=PrepareOptions(show_progress=False),
    )
    tok = load_tokenizer(tokenizer)
    docs = read_split(tmp_path / "out", "train")
    assert len(docs) == 20 and all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)


def test_identical_bytes_whatever_num_proc(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(inputs, "UNIT_BYTES", 2048)  # many units per file
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"part{i}.jsonl", make_docs(150, seed=i))
    (tmp_path / "in" / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n{"text": "also fine"}\n')
    outputs = []
    for num_proc in (1, 2, 3):
        out = tmp_path / f"out{num_proc}"
        prepare([str(tmp_path / "in")], tokenizer, out, Settings(shard_tokens=1500, val_fraction=0.1),
                options=PrepareOptions(num_proc=num_proc, show_progress=False))  # fmt: skip
        outputs.append(tree(out))
    assert len([f for f in outputs[0] if f.endswith(".bin")]) > 4
    assert outputs[0] == outputs[1] == outputs[2]


def _run_prepare(out: Path, inputs_glob: str, tokenizer: Path) -> subprocess.Popen:
    """A real `prepare` process committing after every unit (so a kill can land anywhere)."""
    code = (
        "from pretrain.data.prepare.pipeline import prepare; from pretrain.data.prepare.settings import PrepareOptions, Settings; "
        f"prepare([{inputs_glob!r}], {str(tokenizer)!r}, {str(out)!r}, "
        "Settings(shard_tokens=3000, val_fraction=0.1), PrepareOptions(num_proc=2, commit_seconds=0))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _alive_in_group(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_killed_and_rerun_equals_a_clean_run(tmp_path, tokenizer):
    for i in range(240):
        write_jsonl(tmp_path / "in" / f"part{i:03d}.jsonl", make_docs(25, seed=i))
    pattern = str(tmp_path / "in" / "*.jsonl")
    clean = _run_prepare(tmp_path / "clean", pattern, tokenizer)
    killed = tmp_path / "killed"
    for threshold in (40, 130):  # kill twice, at different points, with SIGKILL
        proc = _run_prepare(killed, pattern, tokenizer)
        while units_done(killed) < threshold and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(random.Random(threshold).random() * 0.05)  # land somewhere inside a unit
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "finished before it could be killed"
        deadline = time.monotonic() + 10  # its workers die with it (PR_SET_PDEATHSIG)
        while _alive_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive_in_group(proc.pid), "prepare workers outlived the killed process"
        assert not (killed / "manifest.json").exists()
        with pytest.raises(UserError, match="preparation unfinished"):
            load_manifest(killed)  # a reader refuses the partial output
    assert _run_prepare(killed, pattern, tokenizer).wait() == 0
    assert clean.wait() == 0
    assert tree(killed) == tree(tmp_path / "clean")
    splits = load_manifest(killed).data["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 240 * 25


def inputs_and_clean_run(tmp_path: Path, tokenizer, files: int) -> tuple[list[str], Settings]:
    """`files` small input files, and their uninterrupted preparation in tmp_path/clean."""
    for i in range(files):
        write_jsonl(tmp_path / "in" / f"p{i}.jsonl", make_docs(40, seed=i))
    settings = Settings(shard_tokens=800)
    pattern = [str(tmp_path / "in" / "*.jsonl")]
    prepare(
        pattern,
        tokenizer,
        tmp_path / "clean",
        settings,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    return pattern, settings


def test_crash_between_commit_and_publish_recovers(tmp_path, tokenizer, monkeypatch):
    from pretrain.data.prepare import writer

    pattern, settings = inputs_and_clean_run(tmp_path, tokenizer, files=4)
    real_publish = writer.publish
    calls = []

    def crash_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the state commit, before the shard is published
        return real_publish(*args)

    monkeypatch.setattr(writer, "publish", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            pattern,
            tokenizer,
            tmp_path / "out",
            settings,
            options=PrepareOptions(num_proc=1, show_progress=False, commit_seconds=0),
        )
    monkeypatch.setattr(writer, "publish", real_publish)
    prepare(
        pattern,
        tokenizer,
        tmp_path / "out",
        settings,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")


def test_killed_before_its_first_commit_reruns_from_the_start(tmp_path, tokenizer, monkeypatch):
    from pretrain.data.prepare.writer import DatasetWriter

    pattern, settings = inputs_and_clean_run(tmp_path, tokenizer, files=3)

    def killed(self, final: bool = False) -> None:
        raise KeyboardInterrupt  # shard files are open, nothing is committed yet

    monkeypatch.setattr(DatasetWriter, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            pattern,
            tokenizer,
            tmp_path / "out",
            settings,
            options=PrepareOptions(num_proc=1, show_progress=False),
        )
    assert list((tmp_path / "out" / "train").glob("shard_*"))  # it had started writing
    monkeypatch.undo()
    prepare(
        pattern,
        tokenizer,
        tmp_path / "out",
        settings,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")


BAD_CASES = {
    "malformed JSON": ('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', "bad.jsonl:2: Expecting"),
    "missing field": ('{"text": "a"}\n{"body": "b"}\n{"text": "c"}\n', "bad.jsonl:2: missing field 'text'"),
    "undecodable bytes": (
        b'{"text": "a"}\n{"text": "\xff\xfe"}\n{"text": "c"}\n',
        "bad.jsonl:2: invalid UTF-8",
    ),
    "not a string": ('{"text": "a"}\n{"text": 5}\n{"text": "c"}\n', "bad.jsonl:2: field 'text' is int"),
    "empty file": ("", "bad.jsonl: empty file"),
}


@pytest.mark.parametrize("reason", BAD_CASES)
def test_bad_records_are_skipped_and_counted_or_fatal_with_strict(tmp_path, tokenizer, reason):
    content, message = BAD_CASES[reason]
    good = write_jsonl(tmp_path / "in" / "good.jsonl", make_docs(5))
    bad = tmp_path / "in" / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    manifest = prepare(
        [str(good), str(bad)], tokenizer, tmp_path / "out", options=PrepareOptions(show_progress=False)
    )
    skipped = manifest.data["skipped"]
    assert skipped["total"] == 1 and skipped["by_reason"] == {reason: 1}
    assert message in skipped["examples"][0]
    documents = sum(s["documents"] for s in manifest.data["splits"].values())
    assert documents == 5 + (2 if reason != "empty file" else 0)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        prepare(
            [str(good), str(bad)],
            tokenizer,
            tmp_path / "strict",
            options=PrepareOptions(strict=True, show_progress=False),
        )
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_strict_failure_leaves_a_resumable_run_and_never_touches_a_dataset(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(inputs, "UNIT_BYTES", 1024)
    write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(100))
    with open(tmp_path / "in" / "a.jsonl", "a") as f:
        f.write("{oops\n")
    pattern = [str(tmp_path / "in" / "a.jsonl")]
    with pytest.raises(UserError, match=r"a.jsonl:101: "):
        prepare(
            pattern,
            tokenizer,
            tmp_path / "out",
            options=PrepareOptions(strict=True, show_progress=False, commit_seconds=0),
        )
    assert json.loads((tmp_path / "out/.prepare/state.json").read_text())["units_done"] > 3  # work kept
    prepare(
        pattern, tokenizer, tmp_path / "out", options=PrepareOptions(show_progress=False)
    )  # resume without --strict
    prepare(pattern, tokenizer, tmp_path / "clean", options=PrepareOptions(show_progress=False))
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")
    before = tree(tmp_path / "out")
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare(
            pattern,
            tokenizer,
            tmp_path / "out",
            Settings(val_fraction=0.5),
            options=PrepareOptions(show_progress=False),
        )
    assert tree(tmp_path / "out") == before


def test_missing_input_and_vocab_that_does_not_fit(tmp_path, tokenizer):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        prepare(
            [str(tmp_path / "nope.jsonl")],
            tokenizer,
            tmp_path / "out",
            options=PrepareOptions(show_progress=False),
        )
    with pytest.raises(UserError, match="no file matches"):
        prepare(
            [str(tmp_path / "*.parquet")],
            tokenizer,
            tmp_path / "out",
            options=PrepareOptions(show_progress=False),
        )
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="notes.csv: no supported input"):
        prepare(
            [str(tmp_path / "notes.csv")],
            tokenizer,
            tmp_path / "out",
            options=PrepareOptions(show_progress=False),
        )
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        prepare([str(tmp_path / "notes.csv")], tokenizer, tmp_path / "out", Settings(exclude=("meta",)))
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"text": "w69999 w1 w65536"}) + "\n")
    with pytest.raises(UserError, match=r"big.json: vocab size 70,001 does not fit uint16"):
        prepare(
            [str(data)],
            tmp_path / "big.json",
            tmp_path / "out",
            options=PrepareOptions(dtype="uint16", show_progress=False),
        )
    manifest = prepare(
        [str(data)], tmp_path / "big.json", tmp_path / "out", options=PrepareOptions(show_progress=False)
    )
    assert manifest.dtype == np.dtype("<u4")
    assert read_split(tmp_path / "out", "train")[0].tolist() == [70_000, 2, 65_537, 0]


def test_input_formats(tmp_path):
    zstandard = require("zstandard")
    pq = require("pyarrow.parquet")
    pa = require("pyarrow")
    docs = make_docs(30)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[:5]).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs[5:10]] + [{"title": "x"}]))
    (tmp_path / "d.txt").write_text(docs[10])
    table = pa.table({"content": docs[11:20] + [None], "n": list(range(10))})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=4)
    paths = inputs.expand([str(tmp_path / "*")])
    units, early = inputs.plan(paths, "text")
    assert early == []
    read = {p.name: [] for p in paths}
    problems = []
    for unit in units:
        field = "content" if paths[unit.file].suffix == ".parquet" else "text"
        chunk = inputs.read(paths[unit.file], unit, inputs.Fields(field))
        read[paths[unit.file].name] += chunk.texts
        problems += [(paths[unit.file].name, p.where, p.reason) for p in chunk.problems]
    assert read == {
        "a.jsonl.gz": docs[:5],
        "b.jsonl.zst": docs[:5],
        "c.json": docs[5:10],
        "d.txt": [docs[10]],
        "e.parquet": docs[11:20],
    }
    assert problems == [("c.json", "record 6", "missing field"), ("e.parquet", "row 9", "missing field")]


def test_saved_dataset_folder(tmp_path, tokenizer):
    datasets = require("datasets")
    docs = make_docs(12)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs[:8]}),
            "test": datasets.Dataset.from_dict({"text": docs[8:]}),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    manifest = prepare(
        [str(tmp_path / "saved")],
        tokenizer,
        tmp_path / "out",
        Settings(val_fraction=0),
        options=PrepareOptions(show_progress=False),
    )
    tok = load_tokenizer(tokenizer)
    got = [tok.tokenizer.decode(d[:-1].tolist()) for d in read_split(tmp_path / "out", "train")]
    assert got == docs[8:] + docs[:8]  # splits of a DatasetDict in name order: test, train
    assert manifest.data["inputs"][0]["path"] == str(tmp_path / "saved")


def test_cli_train_tokenizer_prepare_info(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", make_docs(200))
    assert main(["data", "train-tokenizer", "--input", str(tmp_path / "a.jsonl"), "--vocab-size", "300",
                 "--output", str(tmp_path / "tok.json")]) == 0  # fmt: skip
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.vocab_size == 300 and tok.eos_id == 0 and tok.bos_id == 1 and tok.pad_id == 2
    args = ["data", "prepare", "--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path / "tok.json"),
            "--output", str(tmp_path / "out"), "--val-fraction", "0.1", "--num-proc", "2"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "200 documents" in out and "skipped 0 record(s)" in out
    assert main(args) == 2  # refuses to overwrite a finished dataset
    assert "already holds a prepared dataset" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    info = capsys.readouterr().out
    assert "vocab 300" in info and "dtype uint16" in info and "train" in info
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    dataset = build_train_dataset(
        {"a": (tmp_path / "out", 1.0)}, seq_len=16, global_batch_size=4, micro_batch_size=2
    )
    x, y = next(iter(dataset))
    assert x.shape == (2, 16) and int(x.max()) < 300


def test_llama_style_tokenizer_and_fingerprint(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁a": 3, "▁b": 4, "a": 5, "b": 6, "▁": 7}
    tok = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b")], unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    info = load_tokenizer(path)
    assert (info.eos_id, info.bos_id, info.vocab_size) == (2, 1, 8)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(tok.to_str()), indent=4))
    assert load_tokenizer(pretty).fingerprint == info.fingerprint == fingerprint(tok)
    vocab["c"] = 8
    other = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b")], unk_token="<unk>"))
    assert fingerprint(other) != info.fingerprint
    with pytest.raises(UserError, match="no end-of-document token"):
        load_tokenizer(path, eos_token="<|eot|>")


def test_overwrite_never_deletes_the_users_files(tmp_path, tokenizer, capsys):
    """Raw data laid out as DATA/train and DATA/val, prepared into DATA: refused up front, with or
    without --overwrite, and the inputs are untouched; --overwrite deletes only what prepare wrote."""
    data = tmp_path / "DATA"
    write_jsonl(data / "train" / "a.jsonl", make_docs(20, seed=1))
    write_jsonl(data / "val" / "b.jsonl", make_docs(5, seed=2))
    before = tree(data)
    base = ["data", "prepare", "--tokenizer", str(tokenizer), "--num-proc", "1"]
    for extra in ([], ["--overwrite"]):
        args = [*base, "--input", str(data / "train"), str(data / "val"), "--output", str(data), *extra]
        assert main(args) == 2
        assert "holds the input" in capsys.readouterr().err
        assert tree(data) == before
    # the output inside an input folder: its sidecars would be read as input next time
    args = [*base, "--input", str(data), "--output", str(data / "prepared")]
    assert main(args) == 2
    assert "inside the input folder" in capsys.readouterr().err
    # a dataset folder with a file of someone else's in a split folder: --overwrite keeps that file
    out = tmp_path / "out"
    assert main([*base, "--input", str(data / "train"), "--output", str(out)]) == 0
    (out / "train" / "NOTES.txt").write_text("mine")
    assert main([*base, "--input", str(data / "val"), "--output", str(out), "--overwrite"]) == 0
    assert (out / "train" / "NOTES.txt").read_text() == "mine"
    assert load_manifest(out).tokens("train") > 0
    (out / "manifest.json").write_text('{"mine": true}')
    assert main([*base, "--input", str(data / "val"), "--output", str(out), "--overwrite"]) == 2
    assert "was not written by `pretrain data prepare`" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == '{"mine": true}'


def test_the_same_input_reached_twice_is_read_once(tmp_path, tokenizer, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(30, seed=3))
    (tmp_path / "link.jsonl").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    once = prepare([str(data)], tokenizer, tmp_path / "once", options=PrepareOptions(show_progress=False))
    twice = prepare(
        ["in/a.jsonl", str(data), str(tmp_path / "link.jsonl"), "in"],
        tokenizer,
        tmp_path / "twice",
        options=PrepareOptions(show_progress=False),
    )
    assert "is the same input as in/a.jsonl: read once" in capsys.readouterr().err
    for split in ("train", "val"):
        assert twice.tokens(split) == once.tokens(split)
        docs_once, docs_twice = read_split(tmp_path / "once", split), read_split(tmp_path / "twice", split)
        assert len(docs_twice) == len(docs_once) and all(map(np.array_equal, docs_once, docs_twice))


def test_long_documents_are_tokenized_in_pieces_with_the_same_ids(tiny_dataset, tmp_path, monkeypatch):
    """Cutting a document where a line break meets a non-space character is a pre-tokenization
    boundary: tokenizing piece by piece (bounded memory) gives the ids of tokenizing it whole."""
    from pretrain.data.prepare import worker

    corpus, tokenizer = tiny_dataset.parent / "corpus.jsonl", tiny_dataset / "tokenizer.json"
    whole = prepare(
        [str(corpus)], tokenizer, tmp_path / "whole", options=PrepareOptions(show_progress=False, num_proc=1)
    )
    monkeypatch.setattr(worker, "PIECE_CHARS", 300)  # most stdlib files are longer
    pieces = prepare(
        [str(corpus)], tokenizer, tmp_path / "pieces", options=PrepareOptions(show_progress=False, num_proc=1)
    )
    assert pieces.fingerprint == whole.fingerprint  # every token of every shard identical
    text = "def f():\n    return 1\n\n\nclass A:\n  pass\n" * 40
    pieces = list(worker._pieces(worker._slices(text)))
    assert "".join(pieces) == text and all(len(p) <= 300 for p in pieces)
    blocks = (text[i : i + 7] for i in range(0, len(text), 7))  # however the text comes, the same cuts
    assert list(worker._pieces(blocks)) == pieces


def long_text(chars: int, seed: int = 0) -> str:
    """Text of about `chars` characters, with line breaks and non-ASCII words."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < chars:
        line = " ".join(rng.choice(WORDS + EXTRA) for _ in range(rng.randint(0, 14)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def test_long_documents_stream_to_the_shards_with_the_same_tokens(tmp_path, tokenizer, monkeypatch):
    """Documents whose ids exceed SPILL_TOKENS reach the shards through spill files; text files are read
    a block at a time (a block edge may fall inside a character): same bytes as with everything in memory,
    also where a spilled document starts a new shard, and no spill file is left."""
    from pretrain.data.prepare import worker, writer

    docs = make_docs(30)
    long_docs = [long_text(9_000, seed) for seed in range(3)]
    write_jsonl(
        tmp_path / "in" / "a.jsonl", docs[:10] + long_docs[:2] + docs[10:20] + long_docs[2:] + docs[20:]
    )
    (tmp_path / "in" / "b.txt").write_text(long_text(12_000, seed=7))
    (tmp_path / "in" / "c.txt.gz").write_bytes(gzip.compress(long_text(5_000, seed=8).encode()))
    (tmp_path / "in" / "d.txt").write_text("short")
    pattern, settings = [str(tmp_path / "in")], Settings(shard_tokens=2500, val_fraction=0.3, bos=True)
    memory = prepare(
        pattern,
        tokenizer,
        tmp_path / "memory",
        settings,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    monkeypatch.setattr(worker, "PIECE_CHARS", 500)
    monkeypatch.setattr(worker, "SPILL_TOKENS", 700)
    monkeypatch.setattr(worker, "READ_BYTES", 333)
    spilled = []
    real_add = writer.SplitWriter._add_spilled
    monkeypatch.setattr(
        writer.SplitWriter,
        "_add_spilled",
        lambda self, spill: spilled.append(spill) or real_add(self, spill),
    )
    streamed = prepare(
        pattern,
        tokenizer,
        tmp_path / "streamed",
        settings,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert len(spilled) >= 5  # the long JSON documents and the long text files
    assert streamed.fingerprint == memory.fingerprint and tree(tmp_path / "streamed") == tree(
        tmp_path / "memory"
    )
    assert not any(Path(s.path).exists() for s in spilled)


@pytest.mark.parametrize("where", ["first block", "later block", "split character", "last byte"])
def test_a_text_file_read_in_blocks_names_bad_bytes_as_reading_it_whole(
    tmp_path, tokenizer, monkeypatch, where
):
    from pretrain.data.prepare import worker

    monkeypatch.setattr(worker, "READ_BYTES", 64)
    good = long_text(1000).encode()  # holds 2-, 3- and 4-byte characters
    at = {"first block": 10, "later block": 700, "split character": good.index("日".encode()) + 1,
          "last byte": len(good)}[where]  # fmt: skip
    bad = good[:at] + (b"\xe6" if where == "last byte" else b"\xff") + good[at:]
    path = tmp_path / "in" / "bad.txt"
    path.parent.mkdir()
    path.write_bytes(bad)
    (units,), _ = inputs.plan([path], "text")
    (expected,) = inputs.read(path, units, inputs.Fields()).problems
    write_jsonl(tmp_path / "in" / "good.jsonl", make_docs(5))
    manifest = prepare(
        [str(tmp_path / "in")],
        tokenizer,
        tmp_path / "out",
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert manifest.data["skipped"]["examples"] == [inputs.describe_problem(path, expected, 0)]
    assert manifest.data["skipped"]["by_reason"] == {"undecodable bytes": 1}
    assert not list((tmp_path / "out").rglob("*.tokens"))


def test_a_long_document_costs_no_memory_for_its_length(tmp_path, monkeypatch):
    """Peak Python memory (tracemalloc: strings, bytes, numpy arrays) of preparing one 9 MB text file is
    that of a 1 MB one: it is read, hashed and tokenized a block at a time and its ids reach the shard
    through a spill file (reading it whole held its bytes, its text and 8 bytes per token: +38 MB)."""
    import tracemalloc

    from tokenizers import Tokenizer, models, pre_tokenizers

    from pretrain.data.prepare import worker

    monkeypatch.setattr(worker, "PIECE_CHARS", 1 << 16)
    monkeypatch.setattr(worker, "SPILL_TOKENS", 1 << 16)
    words = Tokenizer(models.WordLevel({EOS: 0, "?": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}, "?"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # fast: the test measures memory, not BPE
    words.save(str(tmp_path / "words.json"))
    line = " ".join(random.Random(0).choice(WORDS) for _ in range(20_000)) + "\n"
    peaks = {}
    for megabytes in (1, 9):
        path = tmp_path / f"in{megabytes}" / "doc.txt"
        path.parent.mkdir()
        path.write_text(line * int(megabytes * 1e6 / len(line)))
        tracemalloc.start()
        try:
            prepare([str(path)], tmp_path / "words.json", tmp_path / f"out{megabytes}", options=PrepareOptions(num_proc=1,
                    show_progress=False))  # fmt: skip
            peaks[megabytes] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert load_manifest(tmp_path / f"out{megabytes}").tokens("train") > megabytes * 1e6 / 6
    assert peaks[9] - peaks[1] < 2e6, f"peak memory {peaks[1] / 1e6:.1f} MB -> {peaks[9] / 1e6:.1f} MB"


TRICKY_LINES = [
    '{"text": "esc \\" \\\\ \\/ \\b\\f\\n\\r\\t \\u00e9 \\ud83d\\ude00 café 日本", "meta": {"a": [1, -2.5e3, null]}}',
    '{"meta": {"text": "nested"}, "id": 3, "text": "not first \\ud83d\\ude00\\ud83d\\ude00", "after": [{}]}',
    '{"te\\u0078t": "an escaped key", "tail": "\\"}\\""}',
    '{"text": "given twice", "text": "the second wins"}',
    '{"text": "given twice", "text": 5}',
    '{"text": null}',
    '{"text": ""}',
    '{"other": "x"}',
    "[1, 2]",
    '"a string"',
    '{"text": "lone \\ud800 high"}',
    '{"text": "lone low \\udc00"}',
    '{"text": "pair, bad \\ud800\\u12G4"}',
    '{"text": "bad \\x escape"}',
    '{"text": "control \x01 character"}',
    '{"text": "unterminated',
    '{"text": "ends in an escape \\u12',
    '{"text": "ends in a backslash \\',
    '{"text": "ok"} extra',
    '{"text": "ok",}',
    '{"a" 1, "text": "x"}',
    '\ufeff{"text": "bom"}',
    '{"text": "x", "a": tru}',
    "   ",
    "",
    '{"text": "excluded", "meta": {"set": "Git"}}',
    '{"text": "tx"}',
    ' {"text" : "ws" } \r',
]
TRICKY_BYTES = (
    b'{"text": "bad UTF-8 after a JSON error \\q" \xff}\n{"text": "ends inside a character \xe6\x97'
)


def read_all(path: Path, fields: inputs.Fields) -> list[tuple]:
    units, _ = inputs.plan([path], fields.text)
    return [astuple_chunk(inputs.read(path, unit, fields)) for unit in units]


def astuple_chunk(chunk: inputs.Chunk) -> tuple:
    return chunk.texts, chunk.problems, chunk.lines, chunk.excluded


def streamed_reads(path: Path, fields: inputs.Fields, monkeypatch) -> list[list[tuple]]:
    """`read_all` with every line long, at several block sizes (a block edge falls everywhere)."""
    reads = []
    for long_line, stream_bytes, copy_chars in ((1, 1, 1), (8, 3, 1 << 16), (5, 7, 3), (40, 5, 0)):
        monkeypatch.setattr(inputs, "LONG_LINE", long_line)
        monkeypatch.setattr(inputs, "STREAM_BYTES", stream_bytes)
        monkeypatch.setattr(inputs, "COPY_CHARS", copy_chars)
        reads.append(read_all(path, fields))
    return reads


@pytest.mark.parametrize("compressed", [False, True])
def test_a_long_json_line_is_read_as_a_short_one(tmp_path, monkeypatch, compressed):
    """A line over LONG_LINE, parsed as it is read (every escape, surrogate pairs across block edges, the
    text field anywhere, given twice, excluded, bad in every way), gives what json.loads gives."""
    data = "\n".join(TRICKY_LINES).encode() + b"\n" + TRICKY_BYTES
    path = tmp_path / ("in.jsonl.gz" if compressed else "in.jsonl")
    path.write_bytes(gzip.compress(data) if compressed else data)
    fields = inputs.Fields("text", ("meta.set=Git", "text=tx"))
    whole = read_all(path, fields)
    (texts, problems, lines, excluded), *_ = whole
    assert len(texts) == 5 and "the second wins" in texts and excluded == 2 and lines > len(TRICKY_LINES)
    assert {p.reason for p in problems} == {
        "not a string", "missing field", "empty text", "not an object", "undecodable bytes", "malformed JSON"
    }  # fmt: skip
    for streamed in streamed_reads(path, fields, monkeypatch):
        assert streamed == whole


def test_long_json_lines_damaged_at_random_are_named_as_json_loads_names_them(tmp_path, monkeypatch):
    rng = random.Random(0)
    alphabet = list('"\\ud80c{}[]:, x\x01nt1.e-é')
    lines = []
    for _ in range(150):
        line = list(rng.choice(TRICKY_LINES[:5]))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(line))
            if rng.random() < 0.4:
                del line[at]
            else:
                line.insert(at, rng.choice(alphabet))
        lines.append("".join(line))
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    fields = inputs.Fields("text", ("text=tx",))
    whole = read_all(path, fields)
    assert len(whole[0][1]) > 50  # most damaged lines are skipped
    for streamed in streamed_reads(path, fields, monkeypatch):
        assert streamed == whole


def test_long_json_lines_give_the_same_shards(tmp_path, tokenizer, monkeypatch):
    """Long lines, tokenized as they are read and spilled, give the same dataset byte for byte as
    json.loads does, for any --num-proc, plain or compressed, and leave no spill file."""
    from pretrain.data.prepare import worker

    docs = make_docs(20)
    long_docs = [long_text(6_000, seed) for seed in range(4)]
    lines = [json.dumps({"text": d, "i": i}) for i, d in enumerate(docs[:8] + long_docs[:2] + docs[8:])]
    lines[3:3] = [json.dumps({"meta": [1, {"x": "y"}], "text": long_docs[2]}), '{"text": "\\ud800 lone"}']
    lines += [json.dumps({"text": long_docs[3]})[:-5], json.dumps({"text": "dropped", "text2": long_docs[0]})]
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(data)
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(gzip.compress(data))
    pattern = [str(tmp_path / "in")]
    settings = Settings(shard_tokens=2500, val_fraction=0.3, bos=True, exclude=("text2=x",))
    whole = prepare(
        pattern,
        tokenizer,
        tmp_path / "whole",
        settings,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert whole.data["skipped"]["by_reason"] == {"malformed JSON": 2, "undecodable bytes": 2}
    monkeypatch.setattr(inputs, "LONG_LINE", 1000)
    monkeypatch.setattr(inputs, "STREAM_BYTES", 333)
    monkeypatch.setattr(worker, "PIECE_CHARS", 500)
    monkeypatch.setattr(worker, "SPILL_TOKENS", 700)
    streamed = []
    real = worker._encode_line
    monkeypatch.setattr(worker, "_encode_line", lambda line: streamed.append(line) or real(line))
    one = prepare(
        pattern,
        tokenizer,
        tmp_path / "one",
        settings,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert len(streamed) == 2 * 5  # the long lines of both files were parsed as they were read
    two = prepare(
        pattern,
        tokenizer,
        tmp_path / "two",
        settings,
        options=PrepareOptions(num_proc=2, show_progress=False),
    )
    assert one.fingerprint == two.fingerprint == whole.fingerprint
    assert tree(tmp_path / "one") == tree(tmp_path / "two") == tree(tmp_path / "whole")


def test_a_long_json_line_costs_no_memory_for_its_length(tmp_path, monkeypatch):
    """Peak Python memory of preparing one 9 MB JSON line is that of a 1 MB one: it is read, decoded,
    hashed and tokenized a block at a time (reading the line whole held its bytes, its decoded line and
    the parsed text: +34 MB)."""
    import tracemalloc

    from tokenizers import Tokenizer, models, pre_tokenizers

    from pretrain.data.prepare import worker

    for module, name in ((inputs, "LONG_LINE"), (inputs, "STREAM_BYTES"), (worker, "PIECE_CHARS"),
                         (worker, "SPILL_TOKENS")):  # fmt: skip
        monkeypatch.setattr(module, name, 1 << 16)
    words = Tokenizer(models.WordLevel({EOS: 0, "?": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}, "?"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # fast: the test measures memory, not BPE
    words.save(str(tmp_path / "words.json"))
    line = " ".join(random.Random(0).choice(WORDS) for _ in range(20_000)) + "\n"
    peaks = {}
    for megabytes in (1, 9):
        path = tmp_path / f"in{megabytes}" / "doc.jsonl"
        path.parent.mkdir()
        text = line * int(megabytes * 1e6 / len(line))
        path.write_text(json.dumps({"id": megabytes, "text": text, "meta": {"source": "test"}}) + "\n")
        del text
        tracemalloc.start()
        try:
            prepare([str(path)], tmp_path / "words.json", tmp_path / f"out{megabytes}", options=PrepareOptions(num_proc=1,
                    show_progress=False))  # fmt: skip
            peaks[megabytes] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert load_manifest(tmp_path / f"out{megabytes}").tokens("train") > megabytes * 1e6 / 6
    assert peaks[9] - peaks[1] < 2e6, f"peak memory {peaks[1] / 1e6:.1f} MB -> {peaks[9] / 1e6:.1f} MB"


def interrupted(tmp_path: Path, tokenizer, monkeypatch, commits: int) -> tuple[list[str], Settings, Path]:
    """An unfinished preparation in tmp_path/out, stopped after `commits` commits (some shards published),
    and the uninterrupted preparation of the same inputs in tmp_path/clean."""
    from pretrain.data.prepare.writer import DatasetWriter

    pattern, settings = inputs_and_clean_run(tmp_path, tokenizer, files=4)
    real_commit = DatasetWriter.commit
    done = []

    def stop_after(self, final: bool = False) -> None:
        if len(done) == commits:
            raise KeyboardInterrupt
        done.append(real_commit(self, final))

    with monkeypatch.context() as patch:
        patch.setattr(DatasetWriter, "commit", stop_after)
        with pytest.raises(KeyboardInterrupt):
            prepare(pattern, tokenizer, tmp_path / "out", settings, options=PrepareOptions(num_proc=1, show_progress=False,
                    commit_seconds=0))  # fmt: skip
    return pattern, settings, tmp_path / "out"


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "42", "[]", "missing key"])
@pytest.mark.parametrize("file", ["state", "sidecar"])
def test_damaged_preparation_state_or_sidecar_starts_the_preparation_over(tmp_path, tokenizer, monkeypatch,
                                                                           capsys, file, kind):  # fmt: skip
    from test_data_verify import damage

    pattern, settings, out = interrupted(tmp_path, tokenizer, monkeypatch, commits=3)
    path = out / ".prepare" / "state.json" if file == "state" else out / "train" / "shard_00000.json"
    assert path.exists()
    damage(path, kind, drop="splits" if file == "state" else "sha256")
    capsys.readouterr()
    prepare(pattern, tokenizer, out, settings, options=PrepareOptions(num_proc=1, show_progress=False))
    err = capsys.readouterr().err
    assert f"{path}: damaged" in err and "starting the preparation over" in err
    assert tree(out) == tree(tmp_path / "clean")


def test_a_shard_file_the_state_counts_on_gone_starts_the_preparation_over(tmp_path, tokenizer, monkeypatch,
                                                                           capsys):  # fmt: skip
    pattern, settings, out = interrupted(tmp_path, tokenizer, monkeypatch, commits=3)
    state = json.loads((out / ".prepare" / "state.json").read_text())
    assert state["splits"]["train"]["tokens"] > 0
    (out / "train" / f"shard_{state['splits']['train']['index']:05d}.bin.tmp").unlink()
    prepare(pattern, tokenizer, out, settings, options=PrepareOptions(num_proc=1, show_progress=False))
    assert "starting the preparation over" in capsys.readouterr().err
    assert tree(out) == tree(tmp_path / "clean")


def test_a_damaged_state_beside_a_finished_dataset_is_named_not_guessed(tmp_path, tokenizer, capsys):
    pattern, settings = inputs_and_clean_run(tmp_path, tokenizer, files=1)
    (tmp_path / "clean" / ".prepare").mkdir()
    (tmp_path / "clean" / ".prepare" / "state.json").write_text("[]")
    before = tree(tmp_path / "clean")
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare(
            pattern,
            tokenizer,
            tmp_path / "clean",
            settings,
            options=PrepareOptions(num_proc=1, show_progress=False),
        )
    assert tree(tmp_path / "clean") == before


def test_an_output_held_by_a_live_prepare_is_refused_and_a_dead_ones_taken_over(tmp_path, tokenizer, capsys):
    import socket

    from pretrain.lease import process_start

    pattern, settings = inputs_and_clean_run(tmp_path, tokenizer, files=2)
    lock = tmp_path / "out" / ".prepare-owner.json"
    lock.parent.mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        owner = {
            "host": socket.gethostname(),
            "pid": other.pid,
            "start": process_start(other.pid),
            "job_id": None,
            "since": "then",
        }
        lock.write_text(json.dumps(owner))
        with pytest.raises(
            UserError, match=rf"being written by another `pretrain data prepare` \(host .*, pid {other.pid}"
        ):
            prepare(
                pattern, tokenizer, tmp_path / "out", settings, options=PrepareOptions(show_progress=False)
            )
        assert json.loads(lock.read_text()) == owner and not (tmp_path / "out" / ".prepare").exists()
    finally:
        other.kill()
        other.wait()
    capsys.readouterr()
    prepare(
        pattern, tokenizer, tmp_path / "out", settings, options=PrepareOptions(show_progress=False)
    )  # its owner is gone now
    assert f"process {other.pid} on this host is no longer running" in capsys.readouterr().err
    assert not lock.exists() and tree(tmp_path / "out") == tree(tmp_path / "clean")


@pytest.mark.slow
def test_two_prepares_on_one_output(tmp_path, tokenizer):
    """A second `pretrain data prepare` into the folder a first one is writing is refused, naming the first;
    once the first is SIGKILLed, the same command takes over and finishes: the dataset of a clean run."""
    import socket

    for i in range(150):
        write_jsonl(tmp_path / "in" / f"part{i:03d}.jsonl", make_docs(25, seed=i))
    pattern = str(tmp_path / "in" / "*.jsonl")
    first = _run_prepare(tmp_path / "out", pattern, tokenizer)
    while units_done(tmp_path / "out") < 5:
        assert first.poll() is None, "the first prepare finished before a second could start"
        time.sleep(0.01)
    args = ["data", "prepare", "--input", pattern, "--tokenizer", str(tokenizer), "--output", str(tmp_path / "out"),
            "--shard-tokens", "3000", "--val-fraction", "0.1", "--num-proc", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    second = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, env=env
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert (
        f"being written by another `pretrain data prepare` (host {socket.gethostname()}, pid {first.pid},"
        in (second.stderr)
    )
    assert first.poll() is None  # untouched
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    third = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, env=env
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert (
        f"taking over from an earlier `pretrain data prepare` (process {first.pid} on this host"
        in third.stderr
    )
    assert _run_prepare(tmp_path / "clean", pattern, tokenizer).wait() == 0
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")
