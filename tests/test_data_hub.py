"""Preparing straight from Hub names (`hf://...`), without a network: a local folder laid out as a
Hub dataset repository (parquet and jsonl.zst files, two configs, README metadata) goes through
the same resolution (`datasets.load_dataset_builder`) and the same bounded cache as a Hub name;
a Hugging Face cache snapshot stands in for an offline node."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import PRETRAIN, require, units_done

from pretrain.cli import main
from pretrain.data import hub
from pretrain.data.prepare import prepare
from pretrain.data.settings import Settings
from pretrain.data.shards import load_manifest
from pretrain.errors import UserError

pa = require("pyarrow")
zstandard = require("zstandard")
ROOT = Path(__file__).resolve().parent.parent
README = """---
configs:
- config_name: prose
  data_files:
  - split: train
    path: data/prose/*.parquet
- config_name: code
  data_files:
  - split: train
    path: data/code/*.jsonl.zst
  - split: validation
    path: holdout/*.jsonl.zst
---
# a test dataset laid out as a Hub repository
"""


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "value", "x", "y"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(n)]


def make_repo(root: Path, files: int = 4, docs: int = 60) -> Path:
    """prose: `files` parquet files of 3 row groups; code: `files` jsonl.zst files (one bad line)."""
    import pyarrow.parquet as pq

    (root / "data" / "prose").mkdir(parents=True)
    (root / "data" / "code").mkdir(parents=True)
    (root / "holdout").mkdir()
    (root / "README.md").write_text(README)
    for i in range(files):
        texts = _docs(docs, seed=i)
        pq.write_table(
            pa.table({"text": texts}),
            root / "data" / "prose" / f"part-{i:02d}.parquet",
            row_group_size=docs // 3,
        )
        lines = [json.dumps({"text": t}) for t in _docs(docs, seed=100 + i)]
        if i == 1:
            lines[4] = "{broken"
        data = ("\n".join(lines) + "\n").encode()
        (root / "data" / "code" / f"part-{i:02d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(data)
        )
    holdout = (json.dumps({"text": "held out"}) + "\n").encode()
    (root / "holdout" / "h.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(holdout))
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("hub") / "repo")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, repo) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    assert (
        main(
            [
                "data",
                "train-tokenizer",
                "--input",
                str(repo / "data"),
                "--vocab-size",
                "400",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    return out


def shards(root: Path) -> dict[str, bytes]:
    """Every shard and sidecar (the manifest names its inputs, which differ by where they came from)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("shard_*"))}


SETTINGS = Settings(shard_tokens=3000, val_fraction=0.1)


def test_hub_input_equals_local_files_for_any_num_proc(repo, tokenizer, tmp_path, capsys):
    outs = {}
    for config, local in (("prose", "data/prose/*.parquet"), ("code", "data/code/*.jsonl.zst")):
        for name, pattern, num_proc in (
            ("hub1", f"hf://{repo}?config={config}", 1),
            ("hub2", f"hf://{repo}?config={config}", 2),
            ("local", str(repo / local), 2),
        ):
            out = tmp_path / f"{config}-{name}"
            prepare([pattern], tokenizer, out, SETTINGS, num_proc=num_proc, show_progress=False)
            outs[name] = out
        assert len(shards(outs["local"])) > 4
        assert shards(outs["hub1"]) == shards(outs["hub2"]) == shards(outs["local"])
        assert (outs["hub1"] / "manifest.json").read_bytes() == (outs["hub2"] / "manifest.json").read_bytes()
        hub_manifest, local_manifest = load_manifest(outs["hub1"]).data, load_manifest(outs["local"]).data
        assert hub_manifest["content_fingerprint"] == local_manifest["content_fingerprint"]
        assert hub_manifest["skipped"]["total"] == local_manifest["skipped"]["total"] == (config == "code")
        record = hub_manifest["inputs"][0]
        assert record["repo"] == str(repo) and record["revision"] == "local"
        assert (
            record["path"]
            == f"hf://{repo}@local/data/{config}/part-00.{'parquet' if config == 'prose' else 'jsonl.zst'}"
        )
        assert not (outs["hub1"] / ".prepare").exists()  # the cache went with the progress folder
    assert main(["data", "info", str(outs["hub1"])]) == 0
    assert f"hf://{repo}?config=code: {repo} at revision local, 4 file(s)" in capsys.readouterr().out
    # a bad record is named by its Hub file and line
    examples = load_manifest(outs["hub1"]).data["skipped"]["examples"]
    assert examples == [
        f"hf://{repo}@local/data/code/part-01.jsonl.zst:5: Expecting property name enclosed in double quotes at column 2"
    ]


def test_split_and_files_filter(repo, tokenizer, tmp_path):
    prepare(
        [f"hf://{repo}?config=code&split=validation"],
        tokenizer,
        tmp_path / "v",
        SETTINGS,
        show_progress=False,
    )
    assert [i["path"].rsplit("/", 1)[1] for i in load_manifest(tmp_path / "v").data["inputs"]] == [
        "h.jsonl.zst"
    ]
    prepare(
        [f"hf://{repo}?config=prose&files=*/part-0[13]*"],
        tokenizer,
        tmp_path / "f",
        SETTINGS,
        show_progress=False,
    )
    names = [i["path"].rsplit("/", 1)[1] for i in load_manifest(tmp_path / "f").data["inputs"]]
    assert names == ["part-01.parquet", "part-03.parquet"]


def test_cache_stays_under_its_cap(tmp_path, tokenizer):
    big = make_repo(tmp_path / "big", files=8, docs=600)
    sizes = sorted(p.stat().st_size for p in (big / "data" / "code").iterdir())
    cap = sizes[-1] + sizes[-2] // 2  # room for one file and a half: never two at once
    peak, stop = 0, threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            total = 0
            for folder, _, names in os.walk(tmp_path / "cache"):  # files come and go while we look
                for name in names:
                    with contextlib.suppress(OSError):
                        total += os.stat(os.path.join(folder, name)).st_size
            peak = max(peak, total)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        prepare([f"hf://{big}?config=code"], tokenizer, tmp_path / "out", SETTINGS, num_proc=2, show_progress=False,
                cache_dir=tmp_path / "cache", cache_max=cap)  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert sizes[0] <= peak <= cap, (peak, cap)
    assert list((tmp_path / "cache").iterdir()) == []  # our folder removed, the cache dir itself kept
    with pytest.raises(UserError, match="more than the cache cap .* raise --cache-max"):
        prepare([f"hf://{big}?config=code"], tokenizer, tmp_path / "out2", SETTINGS, cache_max=sizes[-1] - 1)


def test_fetch_retries_then_stops_with_the_committed_work_kept(repo, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "BACKOFF_SECONDS", 0.0)
    pattern = [f"hf://{repo}?config=prose"]
    prepare(pattern, tokenizer, tmp_path / "clean", SETTINGS, num_proc=1, show_progress=False)
    real_copy, failures = hub._copy, {"n": 0}

    def flaky(source: Path, destination: Path) -> None:  # part-02 fails twice, then arrives
        if source.name == "part-02.parquet" and failures["n"] < 2:
            failures["n"] += 1
            raise OSError("connection reset by peer")
        real_copy(source, destination)

    monkeypatch.setattr(hub, "_copy", flaky)
    prepare(
        pattern, tokenizer, tmp_path / "flaky", SETTINGS, num_proc=1, show_progress=False, commit_seconds=0
    )
    assert failures["n"] == 2 and shards(tmp_path / "flaky") == shards(tmp_path / "clean")

    def down(source: Path, destination: Path) -> None:  # the network goes away at part-02
        if source.name >= "part-02":
            raise OSError("network is unreachable")
        real_copy(source, destination)

    monkeypatch.setattr(hub, "_copy", down)
    with pytest.raises(
        UserError, match=r"part-02.parquet: fetching failed 5 times .* run the same command again"
    ):
        prepare(
            pattern, tokenizer, tmp_path / "down", SETTINGS, num_proc=1, show_progress=False, commit_seconds=0
        )
    state = json.loads((tmp_path / "down" / ".prepare" / "state.json").read_text())
    assert state["units_done"] == 6 and state["file_units"] == {"0": 3, "1": 3}  # two files' row groups kept
    monkeypatch.setattr(hub, "_copy", real_copy)
    prepare(pattern, tokenizer, tmp_path / "down", SETTINGS, num_proc=1, show_progress=False)
    assert shards(tmp_path / "down") == shards(tmp_path / "clean")


@pytest.mark.slow
def test_killed_at_random_points_then_rerun_equals_an_uninterrupted_run(tmp_path, tokenizer):
    big = make_repo(tmp_path / "big", files=12, docs=300)
    code = (
        "from pretrain.data.prepare import prepare; from pretrain.data.settings import Settings; "
        f"prepare(['hf://{big}?config=prose'], {str(tokenizer)!r}, {{out!r}}, "
        "Settings(shard_tokens=3000, val_fraction=0.1), num_proc=2, commit_seconds=0, cache_max=150000, show_progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", code.format(out=str(out))], env=env, start_new_session=True
        )

    assert start(tmp_path / "clean").wait() == 0
    killed, rng = tmp_path / "killed", random.Random(7)
    for threshold in sorted(rng.sample(range(3, 30), 2)):
        proc = start(killed)
        while units_done(killed) < threshold and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.random() * 0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "finished before it could be killed"
    assert start(killed).wait() == 0
    assert shards(killed) == shards(tmp_path / "clean")
    assert (killed / "manifest.json").read_bytes() == (tmp_path / "clean" / "manifest.json").read_bytes()


def _offline_with(monkeypatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache, as huggingface_hub reads them (at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_offline_node_reads_a_cached_snapshot_and_records_its_revision(
    repo, tokenizer, tmp_path, monkeypatch
):
    """HF_HUB_OFFLINE=1: `hf://OWNER/NAME` is read in place from the Hugging Face cache."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf-cache"
    snapshot = cache / "datasets--someone--corpus" / "snapshots" / sha
    shutil.copytree(repo, snapshot)
    (cache / "datasets--someone--corpus" / "refs").mkdir()
    (cache / "datasets--someone--corpus" / "refs" / "main").write_text(sha)
    _offline_with(monkeypatch, cache)
    prepare(["hf://someone/corpus?config=prose"], tokenizer, tmp_path / "out", SETTINGS, show_progress=False)
    prepare([str(repo / "data" / "prose")], tokenizer, tmp_path / "local", SETTINGS, show_progress=False)
    assert shards(tmp_path / "out") == shards(tmp_path / "local")
    record = load_manifest(tmp_path / "out").data["inputs"][0]
    assert (record["repo"], record["revision"]) == ("someone/corpus", sha)
    assert record["path"] == f"hf://someone/corpus@{sha}/data/prose/part-00.parquet"
    assert sorted(p.name for p in snapshot.rglob("*.parquet")) == [
        f"part-{i:02d}.parquet" for i in range(4)
    ]  # untouched


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "hf://{repo}?config=nope",
            "BuilderConfig 'nope' not found. Available: ['prose', 'code']; give config=NAME",
        ),
        ("hf://{repo}", "Config name is missing"),
        (
            "hf://{repo}?config=prose&split=test",
            "no split 'test' in config 'prose' (splits: train); give split=",
        ),
        ("hf://{repo}?config=prose&files=*.txt", "no data file matches (files='*.txt')"),
        ("hf://{repo}?confg=prose", "unknown option 'confg'"),
        ("hf://just-a-name", "expected hf://OWNER/NAME"),
        (
            "hf://someone/missing",
            "HF_HUB_OFFLINE is set and the Hugging Face cache holds no copy of someone/missing",
        ),
    ],
)
def test_bad_hub_inputs_are_one_line_errors(repo, tokenizer, tmp_path, spec, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")}
    args = [
        "data",
        "prepare",
        "--input",
        spec.format(repo=repo),
        "--tokenizer",
        str(tokenizer),
        "--output",
        str(tmp_path / "o"),
    ]
    result = subprocess.run([PRETRAIN, *args], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_tokenizer_by_folder_or_hub_name(repo, tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tokenizer, folder / "tokenizer.json")
    prepare([str(repo / "data" / "prose")], str(folder), tmp_path / "out", SETTINGS, show_progress=False)
    assert load_manifest(tmp_path / "out").data["tokenizer"]["fingerprint"]
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = tmp_path / "hf-cache" / "models--someone--tok" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    shutil.copy(tokenizer, snapshot / "tokenizer.json")
    (tmp_path / "hf-cache" / "models--someone--tok" / "refs").mkdir()
    (tmp_path / "hf-cache" / "models--someone--tok" / "refs" / "main").write_text(sha)
    _offline_with(monkeypatch, tmp_path / "hf-cache")
    assert hub.tokenizer_file("someone/tok") == (snapshot / "tokenizer.json", f"someone/tok@{sha}")
    prepare([str(repo / "data" / "prose")], "someone/tok", tmp_path / "named", SETTINGS, show_progress=False)
    entry = load_manifest(tmp_path / "named").data["tokenizer"]
    assert entry["source"] == f"someone/tok@{sha}"
    assert entry["fingerprint"] == load_manifest(tmp_path / "out").data["tokenizer"]["fingerprint"]
    with pytest.raises(UserError, match="--tokenizer someone/other"):
        hub.tokenizer_file("someone/other")


def _hub_error(kind: str, message: str) -> Exception:
    """A huggingface_hub error as the Hub API raises it (built without an HTTP response)."""
    from huggingface_hub import errors

    cls = getattr(errors, kind)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize(
    "error, message",
    [
        (
            ("GatedRepoError", "403 restricted"),
            "bigcode/starcoderdata is gated: accept its terms on https://huggingface.co/datasets/bigcode/starcoderdata and log in",
        ),
        (
            ("RepositoryNotFoundError", "404"),
            "no dataset repository bigcode/starcoderdata on the Hub (or it is private",
        ),
        (("RevisionNotFoundError", "404"), "bigcode/starcoderdata has no revision 'v9'"),
        (
            ConnectionError("Name or service not known"),
            "could not read bigcode/starcoderdata (ConnectionError: Name or service not known); check the network, or set HF_HUB_OFFLINE=1",
        ),
    ],
)
def test_hub_failures_are_explained(monkeypatch, error, message):
    from huggingface_hub import HfApi

    raised = _hub_error(*error) if isinstance(error, tuple) else error

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(HfApi, "dataset_info", fail)
    with pytest.raises(UserError) as caught:
        hub.resolve(hub.parse("hf://bigcode/starcoderdata@v9"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_train_tokenizer_from_a_hub_input_equals_local_files(repo, tmp_path):
    hub_out, local_out = tmp_path / "hub.json", tmp_path / "local.json"
    assert (
        main(
            [
                "data",
                "train-tokenizer",
                "--input",
                f"hf://{repo}?config=code",
                "--vocab-size",
                "300",
                "--output",
                str(hub_out),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "train-tokenizer",
                "--input",
                str(repo / "data" / "code"),
                "--vocab-size",
                "300",
                "--output",
                str(local_out),
            ]
        )
        == 0
    )
    assert hub_out.read_bytes() == local_out.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.json", "local.json"]  # no cache left behind
