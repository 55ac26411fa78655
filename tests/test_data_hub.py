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
from pretrain.data.prepare import hub
from pretrain.data.prepare.pipeline import prepare
from pretrain.data.prepare.settings import PrepareOptions, Settings
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
            prepare(
                [pattern],
                tokenizer,
                out,
                SETTINGS,
                options=PrepareOptions(num_proc=num_proc, show_progress=False),
            )
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
        options=PrepareOptions(show_progress=False),
    )
    assert [i["path"].rsplit("/", 1)[1] for i in load_manifest(tmp_path / "v").data["inputs"]] == [
        "h.jsonl.zst"
    ]
    prepare(
        [f"hf://{repo}?config=prose&files=*/part-0[13]*"],
        tokenizer,
        tmp_path / "f",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
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
        prepare([f"hf://{big}?config=code"], tokenizer, tmp_path / "out", SETTINGS, options=PrepareOptions(num_proc=2, show_progress=False,
                cache_dir=tmp_path / "cache", cache_max=cap))  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert sizes[0] <= peak <= cap, (peak, cap)
    assert list((tmp_path / "cache").iterdir()) == []  # our folder removed, the cache dir itself kept
    with pytest.raises(UserError, match="more than the cache cap .* raise --cache-max"):
        prepare(
            [f"hf://{big}?config=code"],
            tokenizer,
            tmp_path / "out2",
            SETTINGS,
            options=PrepareOptions(cache_max=sizes[-1] - 1),
        )


def test_fetch_retries_then_stops_with_the_committed_work_kept(repo, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "BACKOFF_SECONDS", 0.0)
    pattern = [f"hf://{repo}?config=prose"]
    prepare(
        pattern,
        tokenizer,
        tmp_path / "clean",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    real_copy, failures = hub._copy, {"n": 0}

    def flaky(source: Path, destination: Path) -> None:  # part-02 fails twice, then arrives
        if source.name == "part-02.parquet" and failures["n"] < 2:
            failures["n"] += 1
            raise OSError("connection reset by peer")
        real_copy(source, destination)

    monkeypatch.setattr(hub, "_copy", flaky)
    prepare(
        pattern,
        tokenizer,
        tmp_path / "flaky",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False, commit_seconds=0),
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
            pattern,
            tokenizer,
            tmp_path / "down",
            SETTINGS,
            options=PrepareOptions(num_proc=1, show_progress=False, commit_seconds=0),
        )
    state = json.loads((tmp_path / "down" / ".prepare" / "state.json").read_text())
    assert state["units_done"] == 6 and state["file_units"] == {"0": 3, "1": 3}  # two files' row groups kept
    monkeypatch.setattr(hub, "_copy", real_copy)
    prepare(
        pattern,
        tokenizer,
        tmp_path / "down",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert shards(tmp_path / "down") == shards(tmp_path / "clean")


@pytest.mark.slow
def test_killed_at_random_points_then_rerun_equals_an_uninterrupted_run(tmp_path, tokenizer):
    big = make_repo(tmp_path / "big", files=12, docs=300)
    code = (
        "from pretrain.data.prepare.pipeline import prepare; from pretrain.data.prepare.settings import PrepareOptions, Settings; "
        f"prepare(['hf://{big}?config=prose'], {str(tokenizer)!r}, {{out!r}}, "
        "Settings(shard_tokens=3000, val_fraction=0.1), PrepareOptions(num_proc=2, commit_seconds=0, cache_max=150000, show_progress=False))"
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
    prepare(
        ["hf://someone/corpus?config=prose"],
        tokenizer,
        tmp_path / "out",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
    )
    prepare(
        [str(repo / "data" / "prose")],
        tokenizer,
        tmp_path / "local",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
    )
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
    prepare(
        [str(repo / "data" / "prose")],
        str(folder),
        tmp_path / "out",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
    )
    assert load_manifest(tmp_path / "out").data["tokenizer"]["fingerprint"]
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = tmp_path / "hf-cache" / "models--someone--tok" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    shutil.copy(tokenizer, snapshot / "tokenizer.json")
    (tmp_path / "hf-cache" / "models--someone--tok" / "refs").mkdir()
    (tmp_path / "hf-cache" / "models--someone--tok" / "refs" / "main").write_text(sha)
    _offline_with(monkeypatch, tmp_path / "hf-cache")
    assert hub.tokenizer_file("someone/tok") == (snapshot / "tokenizer.json", f"someone/tok@{sha}")
    prepare(
        [str(repo / "data" / "prose")],
        "someone/tok",
        tmp_path / "named",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
    )
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


# ---------------------------------------------------------------- the hf:// grammar


def test_paths_with_grammar_characters_are_read_through_escapes(repo, tokenizer, tmp_path):
    """`@ # ? %` in a local path are written %40 %23 %3F %25; a space as it is or %20; `+` is literal."""
    odd = tmp_path / "we@ird #1?x%41 y+z"
    shutil.copytree(repo, odd)
    prepare(
        [str(repo / "data" / "prose")],
        tokenizer,
        tmp_path / "local",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
    )
    for n, path in enumerate((hub.escape(str(odd)), hub.escape(str(odd)).replace(" ", "%20"))):
        out = tmp_path / f"odd{n}"
        prepare(
            [f"hf://{path}?config=prose"],
            tokenizer,
            out,
            SETTINGS,
            options=PrepareOptions(show_progress=False),
        )
        assert shards(out) == shards(tmp_path / "local")
        record = load_manifest(out).data["inputs"][0]
        assert record["repo"] == str(odd)
        assert record["path"] == f"hf://{hub.escape(str(odd))}@local/data/prose/part-00.parquet"


def test_a_revision_on_a_plain_folder_is_refused_not_read_from_a_sibling(repo, tokenizer, tmp_path):
    shutil.copytree(repo, tmp_path / "corpus")
    shutil.copytree(repo, tmp_path / "corpus@v2")
    with pytest.raises(UserError) as caught:
        prepare([f"hf://{tmp_path}/corpus@v2?config=prose"], tokenizer, tmp_path / "o", SETTINGS)
    assert str(caught.value) == (
        f"hf://{tmp_path}/corpus@v2?config=prose: a revision (@v2) needs {tmp_path}/corpus to be a git "
        "checkout, and it is a plain folder: leave out @v2 (a literal @ in a path is written %40)"
    )
    assert not (tmp_path / "o").exists()
    prepare(
        [f"hf://{tmp_path}/corpus%40v2?config=prose"],
        tokenizer,
        tmp_path / "o",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
    )
    assert load_manifest(tmp_path / "o").data["inputs"][0]["repo"] == f"{tmp_path}/corpus@v2"
    with pytest.raises(
        UserError, match=f"{tmp_path}/corpusAv2 is not a folder .a literal % in a path is written %25.$"
    ):
        hub.resolve(hub.parse(f"hf://{tmp_path}/corpus%41v2"))


def _git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_a_revision_on_a_git_checkout_must_be_what_is_checked_out(repo, tokenizer, tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(repo, checkout)
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-qm", "one")
    _git(checkout, "tag", "v1")
    sha = _git(checkout, "rev-parse", "HEAD")
    prepare(
        [f"hf://{checkout}@v1?config=prose"],
        tokenizer,
        tmp_path / "v1",
        SETTINGS,
        options=PrepareOptions(show_progress=False),
    )
    record = load_manifest(tmp_path / "v1").data["inputs"][0]
    assert (record["revision"], record["path"]) == (sha, f"hf://{checkout}@{sha}/data/prose/part-00.parquet")
    (checkout / "README.md").write_text(README + "more\n")
    with pytest.raises(UserError, match=r"has uncommitted changes, so its files are not those of v1"):
        hub.resolve(hub.parse(f"hf://{checkout}@v1?config=prose"))
    _git(checkout, "commit", "-qam", "two")
    with pytest.raises(
        UserError, match=rf"is at \w{{12}}, not at v1 \({sha[:12]}\): run git -C {checkout} checkout v1"
    ):
        hub.resolve(hub.parse(f"hf://{checkout}@v1?config=prose"))
    with pytest.raises(UserError, match=f"the git checkout {checkout} has no revision 'v9'"):
        hub.resolve(hub.parse(f"hf://{checkout}?config=prose&revision=v9"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("hf:///data/d#e?config=prose", "# has no meaning in an hf:// input; a literal # is written %23"),
        ("hf:///data/a%zz", "a % must start an escape such as %40; a literal % is written %25"),
        ("hf:///data/a%ff", "the %-escapes in '/data/a%ff' are not UTF-8"),
        ("hf://owner/name@", "nothing after @"),
        ("hf://owner/name@v1?revision=v2", "a revision is given twice (@ and revision=)"),
        ("hf://owner/name?config=a&config=b", "config= is given twice"),
        ("hf://owner/name?config=", "config= needs a value"),
        ("hf://owner/name?split", "split= needs a value"),
        ("hf://owner/name?confg=a", "unknown option 'confg'"),
        ("hf://~/corpus", "expected hf://OWNER/NAME, or a local folder as hf:///abs/path"),
        ("hf://owner/name/sub", "expected hf://OWNER/NAME"),
    ],
)
def test_what_the_grammar_cannot_honour_is_refused(text, message):
    with pytest.raises(UserError) as caught:
        hub.parse(text)
    assert str(caught.value) == f"{text}: {message}" or message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_escapes_decode_in_every_part_and_plus_stays_a_plus():
    spec = hub.parse("hf://owner/name@refs%2Fpr%2F1?files=c++/%2A%3F.jsonl&split=a%26b&config=x=y")
    assert (spec.repo, spec.revision, spec.files, spec.split, spec.config) == (
        "owner/name",
        "refs/pr/1",
        "c++/*?.jsonl",
        "a&b",
        "x=y",
    )
    assert hub.parse("hf://./rel/a%20b").repo == "./rel/a b"


def test_a_mirror_of_csv_files_is_refused_not_read_as_json_lines(tokenizer, tmp_path):
    (tmp_path / "csv" / "data").mkdir(parents=True)
    (tmp_path / "csv" / "data" / "train.csv").write_text("text\nhello there\n")
    with pytest.raises(UserError) as caught:
        prepare([f"hf://{tmp_path}/csv"], tokenizer, tmp_path / "o", SETTINGS)
    assert str(caught.value) == (
        f"hf://{tmp_path}/csv: data/train.csv is not in a format read here (.jsonl, .ndjson, .json or .txt, "
        "optionally .gz or .zst, and .parquet); leave such files out with files=GLOB, or convert them"
    )


# ---------------------------------------------------------------- fetch faults and resume


def test_a_file_vanished_from_a_mirror_stops_at_once_and_a_restored_copy_resumes(
    repo, tokenizer, tmp_path, monkeypatch, capsys
):
    mirror = tmp_path / "mirror"
    shutil.copytree(repo, mirror)
    pattern = [f"hf://{mirror}?config=prose"]
    prepare(
        pattern,
        tokenizer,
        tmp_path / "clean",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    monkeypatch.setattr(hub, "BACKOFF_SECONDS", 0.0)  # a retry shows in `calls`
    real_copy, calls = hub._copy, []
    part = mirror / "data" / "prose" / "part-02.parquet"

    def vanishing(source: Path, destination: Path) -> None:  # part-02 is deleted as it is reached
        calls.append(source.name)
        if source == part:
            part.rename(tmp_path / "backup.parquet")
        real_copy(source, destination)

    monkeypatch.setattr(hub, "_copy", vanishing)
    with pytest.raises(UserError) as caught:
        prepare(
            pattern,
            tokenizer,
            tmp_path / "out",
            SETTINGS,
            options=PrepareOptions(num_proc=1, show_progress=False, commit_seconds=0),
        )
    assert str(caught.value) == (
        f"hf://{mirror}@local/data/prose/part-02.parquet: {part} is gone from the folder since the run listed "
        "it: restore it; what was committed is kept: run the same command again to resume"
    )
    assert calls.count("part-02.parquet") == 1  # not retried
    monkeypatch.setattr(hub, "_copy", real_copy)
    shutil.copy(tmp_path / "backup.parquet", part)  # restored: same bytes, a new mtime
    read = mirror / "data" / "prose" / "part-00.parquet"
    os.utime(read, ns=(time.time_ns(), time.time_ns()))  # read by the first run, touched since
    capsys.readouterr()
    prepare(
        pattern,
        tokenizer,
        tmp_path / "out",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert shards(tmp_path / "out") == shards(tmp_path / "clean")
    assert (
        f"hf://{mirror}@local/data/prose/part-00.parquet: modified time changed, same bytes as the interrupted "
        "run read: resuming"
    ) in capsys.readouterr().err


def _flip_a_byte(path: Path) -> bytes:
    """Rewrite `path` with one byte changed (same size, a new mtime); its old bytes."""
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    return data


def prepare_until(monkeypatch, pattern, tokenizer, out, stop) -> None:
    """Run `prepare` into `out`, interrupted (KeyboardInterrupt) at the first unit `stop` accepts,
    every unit before it committed."""
    from pretrain.data.prepare import worker

    real_tokenize = worker.tokenize_unit

    def interrupted(unit):
        if stop(unit):
            raise KeyboardInterrupt
        return real_tokenize(unit)

    monkeypatch.setattr(worker, "tokenize_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            pattern,
            tokenizer,
            out,
            SETTINGS,
            options=PrepareOptions(num_proc=1, show_progress=False, commit_seconds=0),
        )
    monkeypatch.setattr(worker, "tokenize_unit", real_tokenize)


def test_resume_refuses_a_mirror_file_whose_bytes_changed_after_it_was_read(
    repo, tokenizer, tmp_path, monkeypatch
):

    mirror = tmp_path / "mirror"
    shutil.copytree(repo, mirror)
    pattern = [f"hf://{mirror}?config=prose"]
    prepare(
        pattern,
        tokenizer,
        tmp_path / "clean",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    # stops inside part-01, after its first row group
    prepare_until(monkeypatch, pattern, tokenizer, tmp_path / "out", lambda u: (u.file, u.start) == (1, 1))
    assert units_done(tmp_path / "out") == 4
    for name in ("part-00.parquet", "part-01.parquet"):  # read whole; read in part (fetched again)
        path = mirror / "data" / "prose" / name
        original = _flip_a_byte(path)
        with pytest.raises(UserError) as caught:
            prepare(
                pattern,
                tokenizer,
                tmp_path / "out",
                SETTINGS,
                options=PrepareOptions(num_proc=1, show_progress=False),
            )
        assert str(caught.value) == (
            f"hf://{mirror}@local/data/prose/{name}: {path} holds other bytes than when the interrupted run "
            "read it: restore that version to resume, or pass --overwrite to start over"
        )
        path.write_bytes(original)
    prepare(
        pattern,
        tokenizer,
        tmp_path / "out",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert shards(tmp_path / "out") == shards(tmp_path / "clean")


def test_a_full_cache_disk_is_not_retried_and_the_rerun_resumes(repo, tokenizer, tmp_path, monkeypatch):
    import errno

    pattern = [f"hf://{repo}?config=prose"]
    prepare(
        pattern,
        tokenizer,
        tmp_path / "clean",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    monkeypatch.setattr(hub, "BACKOFF_SECONDS", 0.0)
    real_copy, calls = hub._copy, []

    def full(source: Path, destination: Path) -> None:
        calls.append(source.name)
        if source.name == "part-02.parquet":
            raise OSError(errno.ENOSPC, "No space left on device", str(destination))
        real_copy(source, destination)

    monkeypatch.setattr(hub, "_copy", full)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as caught:
        prepare(pattern, tokenizer, tmp_path / "out", SETTINGS, options=PrepareOptions(num_proc=1, show_progress=False, commit_seconds=0,
                cache_dir=cache))  # fmt: skip
    assert str(caught.value).startswith(f"--cache-dir {cache}/prepare-")
    assert str(caught.value).endswith(
        f"no space left on the device (No space left on device) while fetching hf://{repo}@local/data/prose/"
        "part-02.parquet: free space, lower --cache-max or choose another --cache-dir; what was committed is "
        "kept: run the same command again to resume"
    )
    assert calls.count("part-02.parquet") == 1
    monkeypatch.setattr(hub, "_copy", real_copy)
    prepare(
        pattern,
        tokenizer,
        tmp_path / "out",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False, cache_dir=cache),
    )
    assert shards(tmp_path / "out") == shards(tmp_path / "clean")


@pytest.mark.parametrize(
    "error, message",
    [
        (
            ("RemoteEntryNotFoundError", "404"),
            "someone/corpus no longer holds this file at revision 0123abcd (its history was rewritten?)",
        ),
        (("RepositoryNotFoundError", "404"), "no dataset repository someone/corpus on the Hub"),
    ],
)
def test_a_file_gone_from_a_hub_repository_is_not_a_network_error(tmp_path, monkeypatch, error, message):
    import huggingface_hub

    calls = []

    def gone(*args, **kwargs):
        calls.append(args)
        raise _hub_error(*error)

    monkeypatch.setattr(hub, "BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gone)
    file = hub.RemoteFile("someone/corpus", "0123abcd", "data/a.parquet", 10, "hub")
    cache = hub.Cache({0: file}, tmp_path / "cache", 100)
    cache.start(0)
    try:
        with pytest.raises(UserError) as caught:
            cache.wait(0, lambda: None)
    finally:
        cache.close()
    assert message in str(caught.value) and "\n" not in str(caught.value) and len(calls) == 1


# ---------------------------------------------------------------- tokenizer sources


def test_tokenizer_advice_fits_where_it_is_read(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    _offline_with(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(UserError) as caught:
        hub.tokenizer_file("someone/other")
    offline = str(caught.value)
    assert offline.startswith(
        "--tokenizer someone/other: HF_HUB_OFFLINE is set and the Hugging Face cache has no"
    )
    assert offline.endswith(
        "fetch it where there is internet (hf download someone/other tokenizer.json), or give a tokenizer.json "
        "or a folder holding one"
    )
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(UserError) as caught:
        hub.tokenizer_file("hf://someone/other@v1")
    assert str(caught.value) == (
        "--tokenizer hf://someone/other@v1: could not read someone/other (ConnectionError: Name or service not "
        "known); check the network, or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache, or give a "
        "tokenizer.json or a folder holding one"
    )


def test_tokenizer_in_hf_forms(tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "tok @#?% dir"
    folder.mkdir()
    shutil.copy(tokenizer, folder / "tokenizer.json")
    assert hub.tokenizer_file(f"hf://{hub.escape(str(folder))}") == (folder / "tokenizer.json", None)
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = tmp_path / "hf-cache" / "models--someone--tok" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    shutil.copy(tokenizer, snapshot / "tokenizer.json")
    _offline_with(monkeypatch, tmp_path / "hf-cache")
    found = (snapshot / "tokenizer.json", f"someone/tok@{sha}")
    assert hub.tokenizer_file(f"hf://someone/tok@{sha}") == hub.tokenizer_file(f"someone/tok@{sha}") == found
    with pytest.raises(UserError, match=r"options \(\?\.\.\.\) are for dataset inputs"):
        hub.tokenizer_file("hf://someone/tok?config=x")
    with pytest.raises(UserError, match="a local tokenizer has no revision: leave out @v1"):
        hub.tokenizer_file(f"hf://{hub.escape(str(folder))}@v1")


def test_train_tokenizer_into_an_existing_folder_is_refused_before_training(repo, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    args = ["data", "train-tokenizer", "--input", str(repo / "data"), "--vocab-size", "300"]
    assert main([*args, "--output", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"pretrain data: error: --output {folder} is a folder; give the file to write, e.g. "
        f"{folder / 'tokenizer.json'}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(folder.iterdir())


def test_a_rerun_resumes_at_the_commit_the_interrupted_run_read_though_main_moved(
    repo, tokenizer, tmp_path, monkeypatch, capsys
):

    old, new = "1" * 40, "2" * 40
    cache = tmp_path / "hf-cache" / "datasets--someone--corpus"
    shutil.copytree(repo, cache / "snapshots" / old)
    shutil.copytree(repo, cache / "snapshots" / new)
    (cache / "snapshots" / new / "data" / "prose" / "part-03.parquet").unlink()  # main moves on
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(old)
    _offline_with(monkeypatch, tmp_path / "hf-cache")
    pattern = ["hf://someone/corpus?config=prose"]
    prepare(
        pattern,
        tokenizer,
        tmp_path / "clean",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    prepare_until(monkeypatch, pattern, tokenizer, tmp_path / "out", lambda unit: unit.file == 2)
    (cache / "refs" / "main").write_text(new)
    capsys.readouterr()
    prepare(
        pattern,
        tokenizer,
        tmp_path / "out",
        SETTINGS,
        options=PrepareOptions(num_proc=1, show_progress=False),
    )
    assert capsys.readouterr().err == (
        f"hf://someone/corpus?config=prose: resuming at commit {old}, which the interrupted run read "
        "(--overwrite starts over at the main branch as it is now)\n"
    )
    assert shards(tmp_path / "out") == shards(tmp_path / "clean")
    assert {i["revision"] for i in load_manifest(tmp_path / "out").data["inputs"]} == {old}


def test_a_file_gone_from_the_hugging_face_cache_is_named(tmp_path):
    file = hub.RemoteFile(
        "someone/corpus", "0123abcd", "data/a.parquet", 10, "in-place", str(tmp_path / "gone")
    )
    cache = hub.Cache({0: file}, tmp_path / "cache", 100)
    with pytest.raises(UserError) as caught:
        cache.wait(0, lambda: None)
    assert str(caught.value) == (
        f"hf://someone/corpus@0123abcd/data/a.parquet: {tmp_path / 'gone'} is gone from the Hugging Face cache: "
        "restore it (hf download someone/corpus data/a.parquet --repo-type dataset --revision 0123abcd); what was "
        "committed is kept: run the same command again to resume"
    )
