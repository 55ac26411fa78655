"""Inputs straight from the Hugging Face Hub: `hf://OWNER/NAME[@REVISION][?config=C&split=S&files=GLOB]`.

- Which files: one config's (subset's) split of the repository, as `datasets` resolves its data
  files from the README's `configs:` metadata or the file-name conventions
  (`load_dataset_builder`), narrowed by `files=GLOB` (repo-relative, fnmatch), in path order.
  The revision (branch, tag or sha; default the main branch) is resolved to its commit sha
  once and every file is read at that sha; the manifest records repository, config, split and
  sha (`pretrain data info`).
- `hf:///abs/path` or `hf://./rel/path`: a local folder laid out as a Hub dataset repository (a
  mirror, or `hf download --repo-type dataset --local-dir` output) is resolved the same way and
  fetched through the same cache. With `HF_HUB_OFFLINE=1`, a repository already in the Hugging
  Face cache is read in place from there.
- Fetching: a file becomes local only when the preparation reaches it (`Cache`: one folder per
  file under the cache directory, at most `max_bytes` at a time, fetched ahead in order while
  there is room), and is removed once all its work units are committed. A file already in the
  Hugging Face cache is read in place, never removed. Downloads retry with backoff; after the
  last retry the run stops with everything committed kept, and a rerun resumes.
"""

from __future__ import annotations

import fnmatch
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pretrain.errors import UserError, writing

SCHEME = "hf://"
DEFAULT_CACHE_BYTES = 20 * 10**9  # --cache-max 20GB
RETRIES = 5  # download attempts per file
BACKOFF_SECONDS = 2.0  # first wait; doubled after each failed attempt


@dataclass(frozen=True)
class HubSpec:
    """A parsed `hf://` input."""

    text: str
    repo: str  # OWNER/NAME, or a local folder
    revision: str | None
    config: str | None
    split: str
    files: str | None

    @property
    def local(self) -> bool:
        return self.repo.startswith(("/", "."))


@dataclass(frozen=True)
class RemoteFile:
    """One data file of a Hub dataset (or of a local folder laid out as one)."""

    repo: str
    revision: str  # commit sha ("local" for a local folder)
    path: str  # repo-relative
    size: int
    source: str  # "hub": download; "copy": a local folder's file, copied into the cache; "in-place": read where it is
    where: str = ""  # the local file for "copy" and "in-place"
    spec: str = field(
        default="", compare=False
    )  # the input it came from (config, split): not part of its identity

    @property
    def name(self) -> str:
        """How messages and the manifest name it."""
        return f"{SCHEME}{self.repo}@{self.revision}/{self.path}"

    def record(self) -> dict:
        """How the manifest lists it: the repository and the exact revision read."""
        return {
            "path": self.name,
            "bytes": self.size,
            "repo": self.repo,
            "revision": self.revision,
            "input": self.spec,
        }


def parse_size(text: str) -> int:
    """Bytes from `123`, `500MB`, `20GB`, `1.5TB` (decimal units; KiB/MiB/GiB/TiB binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    number = text.strip().upper()
    digits = number.rstrip("KMGTIB")
    try:
        value = float(digits)
        scale = units[number[len(digits) :]]
    except (ValueError, KeyError):
        value, scale = math.nan, 1
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"--cache-max {text!r}: expected a positive size such as 500MB, 20GB or 20GiB")
    return int(value * scale)


def is_hub(pattern: str) -> bool:
    return pattern.startswith(SCHEME)


def parse(text: str) -> HubSpec:
    """`hf://OWNER/NAME[@REVISION][?config=C&split=S&files=GLOB]` -> HubSpec (one-line errors)."""
    parts = urlsplit(text)
    body = text[len(SCHEME) :].split("?", 1)[0]
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"config", "split", "files", "revision"}
    if unknown:
        raise UserError(
            f"{text}: unknown option {sorted(unknown)[0]!r} (use config=, split=, files=, revision=)"
        )
    repo, _, revision = body.partition("@")
    if not repo or (not repo.startswith(("/", ".")) and repo.count("/") != 1):
        raise UserError(f"{text}: expected hf://OWNER/NAME (or hf:///path/to/a/local/copy)")
    one = {key: values[-1] for key, values in query.items()}
    return HubSpec(
        text,
        repo,
        revision or one.get("revision"),
        one.get("config"),
        one.get("split", "train"),
        one.get("files"),
    )


def resolve(spec: HubSpec) -> list[RemoteFile]:
    """The spec's data files, in path order, at one commit (module docstring)."""
    if spec.local:
        root = Path(spec.repo)
        if not root.is_dir():
            raise UserError(f"{spec.text}: {root} is not a folder")
        files = _data_files(spec, str(root), None)
        return [
            RemoteFile(spec.repo, "local", p, (root / p).stat().st_size, "copy", str(root / p), spec.text)
            for p in files
        ]
    if _offline():
        return _resolve_cached(spec)
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(spec.repo, revision=spec.revision, files_metadata=True)
    except Exception as err:
        raise UserError(_hub_problem(spec, err)) from None
    assert info.sha is not None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    files = _data_files(spec, spec.repo, info.sha)
    return [
        RemoteFile(
            spec.repo, info.sha, p, sizes.get(p, 0), *_cached_or_hub(spec.repo, info.sha, p), spec.text
        )
        for p in files
    ]


def _cached_or_hub(repo: str, sha: str, path: str) -> tuple[str, str]:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, path, revision=sha, repo_type="dataset")
    return ("in-place", cached) if isinstance(cached, str) else ("hub", "")


def _resolve_cached(spec: HubSpec) -> list[RemoteFile]:
    """HF_HUB_OFFLINE: the repository's snapshot in the Hugging Face cache, read in place."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(
            snapshot_download(spec.repo, repo_type="dataset", revision=spec.revision, local_files_only=True)
        )
    except Exception:
        raise UserError(
            f"{spec.text}: HF_HUB_OFFLINE is set and the Hugging Face cache holds no copy of {spec.repo}: "
            f"download it where there is internet (hf download {spec.repo} --repo-type dataset), or give "
            "a local copy as hf:///path/to/it"
        ) from None
    files = _data_files(spec, str(root), None)
    return [
        RemoteFile(spec.repo, root.name, p, (root / p).stat().st_size, "in-place", str(root / p), spec.text)
        for p in files
    ]


def _data_files(spec: HubSpec, where: str, sha: str | None) -> list[str]:
    """Repo-relative paths of the config's split (datasets' resolution), filtered and sorted."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(where, spec.config, revision=sha)
    except Exception as err:
        raise UserError(_hub_problem(spec, err)) from None
    data_files = builder.config.data_files or {}
    if spec.split not in data_files:
        raise UserError(
            f"{spec.text}: no split {spec.split!r} in config {builder.config.name!r} "
            f"(splits: {', '.join(sorted(data_files)) or 'none'}); give split="
        )
    paths = sorted({_relative(str(f), where, spec.repo) for f in data_files[spec.split]})
    if spec.files:
        paths = [p for p in paths if fnmatch.fnmatch(p, spec.files)]
    if not paths:
        raise UserError(f"{spec.text}: no data file matches (files={spec.files!r})")
    return paths


def _relative(resolved: str, where: str, repo: str) -> str:
    """A data file's repo-relative path, from datasets' resolved URL or local path."""
    prefix = f"hf://datasets/{repo}@"
    if resolved.startswith(prefix):
        return resolved[len(prefix) :].split("/", 1)[1]
    return os.path.relpath(resolved, where)


def _offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_problem(spec: HubSpec, err: Exception) -> str:
    """One line for what went wrong reaching a repository or its configs."""
    from huggingface_hub import errors

    name = type(err).__name__
    if isinstance(err, errors.GatedRepoError):
        return (
            f"{spec.text}: {spec.repo} is gated: accept its terms on https://huggingface.co/datasets/{spec.repo} "
            "and log in (hf auth login, or HF_TOKEN)"
        )
    if isinstance(err, errors.RepositoryNotFoundError):
        return f"{spec.text}: no dataset repository {spec.repo} on the Hub (or it is private: log in with hf auth login, or HF_TOKEN)"
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{spec.text}: {spec.repo} has no revision {spec.revision!r}"
    message = str(err).strip().splitlines()[0] if str(err).strip() else name
    if "config" in message.lower() or "BuilderConfig" in message:
        return f"{spec.text}: {message[:300]}; give config=NAME"
    return (
        f"{spec.text}: could not read {spec.repo} ({name}: {message[:200]}); check the network, or use "
        "HF_HUB_OFFLINE=1 with a cached copy, or a local copy as hf:///path/to/it"
    )


class Cache:
    """Fetches `files[i]` into `directory / f"{i:06d}"`, in order, ahead of use while the files
    present stay within `max_bytes`; `release(i)` removes one (module docstring)."""

    def __init__(self, files: dict[int, RemoteFile], directory: Path, max_bytes: int) -> None:
        self.files, self.directory, self.max_bytes = files, directory, max_bytes
        too_big = [f for f in files.values() if f.source != "in-place" and f.size > max_bytes]
        if too_big:
            raise UserError(
                f"{too_big[0].name} is {too_big[0].size:,} bytes, more than the cache cap of {max_bytes:,}: "
                "raise --cache-max"
            )
        self.present: dict[int, int] = {}  # fetched, not released: index -> bytes
        self.peak = 0
        self._ready: dict[int, BaseException | None] = {}
        self._lock = threading.Condition()
        self._queue = sorted(i for i, f in files.items() if f.source != "in-place")
        self._stop = False
        self._thread: threading.Thread | None = None

    def ready(self, i: int) -> bool:
        """Whether file i can be read now."""
        with self._lock:
            return self.files[i].source == "in-place" or i in self._ready

    def local_path(self, i: int) -> Path:
        file = self.files[i]
        if file.source == "in-place":
            return Path(file.where)
        return self.directory / f"{i:06d}" / file.path

    def start(self, skip_before: int) -> None:
        """Fetch, in the background, every file from index `skip_before` on (what an interrupted run
        left in the cache folder is dropped first: it is fetched again when needed)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        with writing(self.directory, "--cache-dir"):
            self.directory.mkdir(parents=True)
        self._queue = [i for i in self._queue if i >= skip_before]
        self._thread = threading.Thread(target=self._fetch_all, name="hub-fetch", daemon=True)
        self._thread.start()

    def wait(self, i: int, idle: Callable[[], None]) -> Path:
        """The local path of file i once fetched; `idle()` is called first if it is not (the
        caller commits and releases then, making room)."""
        if self.files[i].source == "in-place":
            return self.local_path(i)
        with self._lock:
            ready = i in self._ready
        if not ready:
            idle()
        with self._lock:
            while i not in self._ready:
                self._lock.wait()
            error = self._ready[i]
        if error is not None:
            raise error
        return self.local_path(i)

    def release(self, i: int) -> None:
        if i in self.present:
            shutil.rmtree(self.directory / f"{i:06d}", ignore_errors=True)
            with self._lock:
                del self.present[i]
                self._lock.notify_all()

    def close(self) -> None:
        """Stop fetching (a download under way is abandoned with the process)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def remove(self) -> None:
        """Delete the cache folder (the preparation is complete)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _fetch_all(self) -> None:
        for i in self._queue:
            size = self.files[i].size
            with self._lock:
                while not self._stop and self.present and sum(self.present.values()) + size > self.max_bytes:
                    self._lock.wait()
                if self._stop:
                    return
                self.present[i] = size
                self.peak = max(self.peak, sum(self.present.values()))
            error: BaseException | None = None
            try:
                self._fetch(i)
            except BaseException as err:  # handed to the waiting main thread
                error = err
            with self._lock:
                self._ready[i] = error
                self._lock.notify_all()
            if error is not None:
                return

    def _fetch(self, i: int) -> None:
        file, folder = self.files[i], self.directory / f"{i:06d}"
        for attempt in range(RETRIES):
            try:
                if file.source == "copy":
                    _copy(Path(file.where), folder / file.path)
                else:
                    _download(file, folder)
                return
            except UserError:
                raise
            except Exception as err:
                if attempt == RETRIES - 1:
                    raise UserError(
                        f"{file.name}: fetching failed {RETRIES} times ({type(err).__name__}: "
                        f"{str(err).strip()[:200]}); what was committed is kept: run the same command again to resume"
                    ) from None
                wait = BACKOFF_SECONDS * 2**attempt
                print(f"{file.name}: {type(err).__name__}; retrying in {wait:.0f} s", file=sys.stderr)
                time.sleep(wait)


def _copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, destination)


def _download(file: RemoteFile, folder: Path) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(file.repo, file.path, repo_type="dataset", revision=file.revision, local_dir=folder)


def _require_hub_libraries() -> None:
    try:
        import datasets  # noqa: F401
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise UserError(
            "hf:// inputs need `datasets` and `huggingface_hub`: pip install 'pretrain[data]'"
        ) from None


def tokenizer_file(name: str) -> tuple[Path, str | None]:
    """A tokenizer.json path, a folder holding one (a local Hugging Face model folder), or a Hub
    model repository `OWNER/NAME` (its tokenizer.json, from the Hugging Face cache when there);
    and for a Hub repository, `OWNER/NAME@SHA`, what the manifest records."""
    path = Path(name)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {name}: the folder holds no tokenizer.json")
        return path / "tokenizer.json", None
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/")) or name.endswith(".json"):
        return path, None  # a file (load_tokenizer names it if it is missing or unreadable)
    _require_hub_libraries()
    from huggingface_hub import hf_hub_download

    try:
        found = Path(hf_hub_download(name, "tokenizer.json"))
        return found, f"{name}@{found.parent.name}"  # the cache's snapshots/<sha>/tokenizer.json
    except Exception as err:
        spec = HubSpec(f"--tokenizer {name}", name, None, None, "train", None)
        raise UserError(_hub_problem(spec, err).replace("dataset repository", "model repository")) from None


def documents(
    sources: Sequence[Path | RemoteFile],
    fields: Any,
    left_out: list[str],
    cache_dir: Path,
    max_bytes: int,
) -> Iterator[str]:
    """Every usable document of local and Hub inputs in order (`inputs.documents`), each Hub file
    fetched into `cache_dir` when reached and removed once read."""
    from pretrain.data import inputs

    remote = {i: s for i, s in enumerate(sources) if isinstance(s, RemoteFile)}
    cache = Cache(remote, cache_dir, max_bytes) if remote else None
    if cache is not None:
        cache.start(0)
    try:
        for i, source in enumerate(sources):
            if isinstance(source, Path):
                yield from inputs.documents([source], fields, left_out)
            else:
                assert cache is not None
                path = cache.wait(i, lambda: None)
                yield from inputs.documents([path], fields, left_out, names=[source.name])
                cache.release(i)
    finally:
        if cache is not None:
            cache.close()
            cache.remove()


def expand(patterns: Sequence[str]) -> list[Path | RemoteFile]:
    """Local inputs (as `inputs.expand`) and Hub inputs, in the order given."""
    from pretrain.data import inputs

    if any(map(is_hub, patterns)):
        _require_hub_libraries()

    found: list[Path | RemoteFile] = []
    for pattern in patterns:
        found += resolve(parse(pattern)) if is_hub(pattern) else inputs.expand([pattern])
    return inputs.read_once(found)
