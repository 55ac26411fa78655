"""The corpus recipes in data/: each runs on files of its corpus's real layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import require

from pretrain.data.loader import build_train_dataset
from pretrain.data.shards import load_manifest
from pretrain.data.tokenizer import load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each recipe runs as a script in a subprocess


def run_recipe(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "data" / name / "prepare.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def decoded(out: Path) -> list[str]:
    manifest = load_manifest(out)
    tok = load_tokenizer(manifest.tokenizer_path)
    docs = []
    for split in ("train", "val"):
        for shard in manifest.shards(split):
            tokens = np.fromfile(shard.path, dtype=manifest.dtype)
            offsets = json.loads(shard.path.with_suffix(".json").read_text())["doc_offsets"]
            docs += [tok.tokenizer.decode(d[:-1].tolist()) for d in np.split(tokens, offsets[1:])]
    return docs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([f"document {i} about code and prose" for i in range(50)], vocab_size=300).save(str(path))
    return path


def test_pystdlib(tmp_path):
    out = tmp_path / "pystdlib"
    run_recipe("pystdlib", "--out", out)
    manifest = load_manifest(out)
    corpus = (tmp_path / "pystdlib-raw" / "corpus.jsonl").read_text().splitlines()
    splits = manifest.data["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(corpus) > 1000
    assert splits["val"]["documents"] > 10 and len(splits["train"]["shards"]) >= 2
    assert manifest.vocab_size == 8192 and manifest.dtype.name == "uint16" and manifest.eos_id == 0
    assert any(json.loads(line)["path"] == "json/decoder.py" for line in corpus)
    tok = load_tokenizer(manifest.tokenizer_path)
    dataset = build_train_dataset(
        {"py": (out, 1.0)}, seq_len=256, global_batch_size=4, micro_batch_size=4, seed=0
    )
    x, _ = next(iter(dataset))
    assert int(x.max()) < 8192
    assert any(word in tok.tokenizer.decode(x[0].tolist()) for word in ("def ", "import ", "self", "return"))
    assert "already prepared" in run_recipe("pystdlib", "--out", out)  # a second run keeps the dataset


def test_slimpajama_layout_drops_github(tmp_path, tokenizer):
    zstandard = require("zstandard")
    root = tmp_path / "SlimPajama-627B"
    records = [
        {"text": f"slim doc {i} " + ("code" if i % 3 == 0 else "prose"),
         "meta": {"redpajama_set_name": "RedPajamaGithub" if i % 3 == 0 else "RedPajamaC4"}}
        for i in range(30)
    ]  # fmt: skip
    for chunk, part in ((1, records[:12]), (2, records[12:])):
        path = root / "train" / f"chunk{chunk}" / f"example_train_{chunk}.jsonl.zst"
        path.parent.mkdir(parents=True)
        lines = "".join(json.dumps(r) + "\n" for r in part).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    holdout = root / "validation" / "chunk1" / "example_holdout_0.jsonl.zst"
    holdout.parent.mkdir(parents=True)
    holdout.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "holdout"}\n'))
    out = tmp_path / "out"
    run_recipe("slimpajama", "--root", root, "--tokenizer", tokenizer, "--out", out, "--num-proc", "2")
    manifest = load_manifest(out)
    assert manifest.data["excluded"] == 10
    assert sorted(decoded(out)) == sorted(
        r["text"] for r in records if r["meta"]["redpajama_set_name"] != "RedPajamaGithub"
    )
    # the default path, reading the repository by its Hub name, here a local mirror of the same layout
    run_recipe("slimpajama", "--hub", f"hf://{root}", "--tokenizer", tokenizer, "--out", tmp_path / "hub")
    assert sorted(decoded(tmp_path / "hub")) == sorted(decoded(out))
    assert all(
        i["path"].startswith(f"hf://{root}@local/train/")
        for i in load_manifest(tmp_path / "hub").data["inputs"]
    )


def test_starcoder_layout(tmp_path, tokenizer):
    pa, pq = require("pyarrow"), require("pyarrow.parquet")
    root = tmp_path / "starcoderdata"
    expected = {}
    for language in ("python", "java"):
        (root / language).mkdir(parents=True)
        contents = [f"{language} source {i}" for i in range(7)]
        expected[language] = contents
        table = pa.table({"max_stars_repo_path": ["a"] * 7, "max_stars_repo_name": ["r"] * 7,
                          "max_stars_count": list(range(7)), "id": [str(i) for i in range(7)], "content": contents})  # fmt: skip
        pq.write_table(table, root / language / "train-00000-of-00001.parquet", row_group_size=3)
    run_recipe("starcoder", "--root", root, "--tokenizer", tokenizer, "--out", tmp_path / "all")
    assert sorted(decoded(tmp_path / "all")) == sorted(expected["python"] + expected["java"])
    run_recipe(
        "starcoder",
        "--root",
        root,
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "py",
        "--languages",
        "python",
    )
    assert sorted(decoded(tmp_path / "py")) == sorted(expected["python"])
    hub = ["--hub", f"hf://{root}", "--tokenizer", tokenizer, "--languages", "java"]
    run_recipe("starcoder", *hub, "--out", tmp_path / "hub")
    assert sorted(decoded(tmp_path / "hub")) == sorted(expected["java"])


def test_fineweb_layout(tmp_path, tokenizer):
    pa, pq = require("pyarrow"), require("pyarrow.parquet")
    root = tmp_path / "fineweb"
    texts = {}
    for folder in ("sample/10BT", "data/CC-MAIN-2024-10"):
        (root / folder).mkdir(parents=True)
        texts[folder] = [f"web page {folder} {i}" for i in range(5)]
        table = pa.table({"text": texts[folder], "id": ["x"] * 5, "dump": ["CC-MAIN-2024-10"] * 5,
                          "url": ["http://e.x"] * 5, "language": ["en"] * 5, "token_count": [3] * 5})  # fmt: skip
        pq.write_table(table, root / folder / "000_00000.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*/*\n"
        "- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n---\n"
    )  # the configs of the Hub release's README
    run_recipe("fineweb", "--hub", f"hf://{root}", "--tokenizer", tokenizer, "--out", tmp_path / "hub")
    assert sorted(decoded(tmp_path / "hub")) == sorted(texts["sample/10BT"])
    run_recipe("fineweb", "--root", root, "--tokenizer", tokenizer, "--out", tmp_path / "sample")
    assert sorted(decoded(tmp_path / "sample")) == sorted(texts["sample/10BT"])
    run_recipe(
        "fineweb", "--root", root, "--tokenizer", tokenizer, "--out", tmp_path / "dumps", "--subset", "data"
    )
    assert sorted(decoded(tmp_path / "dumps")) == sorted(texts["data/CC-MAIN-2024-10"])
