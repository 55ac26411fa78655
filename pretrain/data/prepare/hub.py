"""Inputs straight from the Hugging Face Hub: `hf://REPO[@REVISION][?KEY=VALUE&KEY=VALUE...]`.

Grammar (`parse`); every refusal is one line naming the input:
- `REPO` is `OWNER/NAME` (a Hub dataset repository), or a local folder laid out as one: an
  absolute path `hf:///abs/path` or a relative one `hf://./rel/path` (`~` is not expanded).
- `@` (the first one before `?`) starts the REVISION: a branch, tag or commit sha. On a local
  folder a revision is honoured only when the folder is a git checkout whose HEAD is that
  revision with no uncommitted change to tracked files (the manifest then records the sha);
  otherwise it is refused, never ignored.
- `?` (the first one) starts the options; `&` separates them; `=` (the first in an option)
  separates key and value. Keys: `config=`, `split=` (default train), `files=GLOB` (fnmatch on
  the repo-relative path) and `revision=` (the same as `@`, not both). An unknown, repeated or
  empty option is refused.
- `#` has no meaning (there are no fragments): it is refused.
- `%XX` is a percent-escape (UTF-8), decoded in the path, the revision and every value, after
  the input is split at the characters above. So a literal `@ # ? %` is written `%40 %23 %3F
  %25`, and `&` inside a value `%26` (`hf:///data/corpus%40v2` is the folder `corpus@v2`); a `%`
  that starts no escape is refused. A space may be written as it is (quoted in the shell) or as `%20`; `+` is a plus.
  `escape` writes a path this way; manifest and message names (`RemoteFile.name`) use it.

Which files: one config's (subset's) split of the repository, as `datasets` resolves its data
files from the README's `configs:` metadata or the file-name conventions
(`load_dataset_builder`), narrowed by `files=GLOB`, in path order. They must be in a format
the local reader reads (`inputs`): `.jsonl`, `.ndjson`, `.json` (lines or one array), `.txt`
(one document per file, as given locally, not one per line as `datasets` reads it), each
optionally `.gz` or `.zst`, and `.parquet`; anything else (CSV, TSV, Arrow, ...) is refused.
The revision (default the main branch) is resolved to its commit sha once and every file is
read at that sha; the manifest records repository, config, split and sha (`pretrain data
info`). With `HF_HUB_OFFLINE=1`, a repository already in the Hugging Face cache is read in
place from there.

Fetching: a file becomes local only when the preparation reaches it (`Cache`: one folder per
file under the cache directory, at most `max_bytes` at a time, fetched ahead in order while
there is room), and is removed once all its work units are committed. A file already in the
Hugging Face cache is read in place, never removed. Network failures are retried with backoff;
what waiting cannot mend (a file gone from the mirror or repository, a full or read-only disk,
a repository gone or gated) stops at once in one line. Either way everything committed is
kept and a rerun of the same command resumes: at the commit the interrupted run read, with
the mirror files it read checked by content (`pretrain.data.prepare.units`).
"""

from __future__ import annotations

import errno
import fnmatch
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pretrain.data.prepare import inputs
from pretrain.data.shards import sha256_file
from pretrain.errors import UserError, writing
from pretrain.files import write_atomic_with

SCHEME = "hf://"
RETRIES = 5  # download attempts per file
BACKOFF_SECONDS = 2.0  # first wait; doubled after each failed attempt
OPTIONS = ("config", "split", "files", "revision")
RESERVED = "%@#?&"  # written as %XX escapes where they are meant literally
REPO_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
RESUME = "what was committed is kept: run the same command again to resume"
FORMATS = ".jsonl, .ndjson, .json or .txt, optionally .gz or .zst, and .parquet"


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
        return f"{SCHEME}{escape(self.repo)}@{self.revision}/{escape(self.path)}"

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
    """`hf://REPO[@REVISION][?KEY=VALUE&...]` -> HubSpec, by the grammar of the module docstring
    (one-line errors for what it cannot honour)."""
    body = text[len(SCHEME) :]
    if "#" in body:
        raise UserError(f"{text}: # has no meaning in an hf:// input; a literal # is written %23")
    where, _, query = body.partition("?")
    path, at, revision = where.partition("@")
    options = _options(text, query)
    if at and not revision:
        raise UserError(f"{text}: nothing after @; give @REVISION, or write a literal @ as %40")
    if at and "revision" in options:
        raise UserError(f"{text}: a revision is given twice (@ and revision=); give one")
    repo = _decoded(text, path)
    if not repo or not (repo.startswith(("/", ".")) or REPO_NAME.fullmatch(repo)):
        raise UserError(
            f"{text}: expected hf://OWNER/NAME, or a local folder as hf:///abs/path or hf://./rel/path"
        )
    return HubSpec(
        text,
        repo,
        _decoded(text, revision) if at else options.get("revision"),
        options.get("config"),
        options.get("split", "train"),
        options.get("files"),
    )


def _options(text: str, query: str) -> dict[str, str]:
    """The `KEY=VALUE&...` after `?`: known keys, each once, values percent-decoded and not empty."""
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in OPTIONS:
            raise UserError(f"{text}: unknown option {key!r} (use {', '.join(k + '=' for k in OPTIONS)})")
        if not eq or not value:
            raise UserError(f"{text}: {key}= needs a value")
        if key in options:
            raise UserError(f"{text}: {key}= is given twice; give it once")
        options[key] = _decoded(text, value)
    return options


def _decoded(text: str, part: str) -> str:
    """`part` with its %XX escapes decoded (UTF-8); a % that starts no escape is refused."""
    if BAD_ESCAPE.search(part):
        raise UserError(f"{text}: a % must start an escape such as %40; a literal % is written %25")
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise UserError(f"{text}: the %-escapes in {part!r} are not UTF-8") from None


def escape(text: str) -> str:
    """`text` written for an hf:// input: the characters of the grammar as %XX escapes."""
    return "".join(f"%{ord(c):02X}" if c in RESERVED else c for c in text)


def resolve(spec: HubSpec, pinned: str | None = None) -> list[RemoteFile]:
    """The spec's data files, in path order, at one commit (module docstring): `pinned`, the commit
    an interrupted preparation of the same input read, when given (a rerun resumes there)."""
    if spec.local:
        root = Path(spec.repo)
        if not root.is_dir():
            raise UserError(f"{spec.text}: {root} is not a folder{_literal_hint(spec)}")
        revision = _checkout_at(spec, root) if spec.revision else "local"
        files = _data_files(spec, str(root), None)
        return [
            RemoteFile(spec.repo, revision, p, (root / p).stat().st_size, "copy", str(root / p), spec.text)
            for p in files
        ]
    if pinned and pinned != spec.revision:
        print(
            f"{spec.text}: resuming at commit {pinned}, which the interrupted run read "
            f"(--overwrite starts over at {spec.revision or 'the main branch'} as it is now)",
            file=sys.stderr,
        )
        spec = replace(spec, revision=pinned)
    if _offline():
        return _resolve_cached(spec)
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(spec.repo, revision=spec.revision, files_metadata=True)
    except Exception as err:
        raise UserError(_hub_problem(spec.text, spec.repo, spec.revision, err)) from None
    assert info.sha is not None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    files = _data_files(spec, spec.repo, info.sha)
    return [
        RemoteFile(
            spec.repo, info.sha, p, sizes.get(p, 0), *_cached_or_hub(spec.repo, info.sha, p), spec.text
        )
        for p in files
    ]


def _literal_hint(spec: HubSpec) -> str:
    """For a local path written with `@` or `%`: how those are written when meant literally."""
    path = spec.text[len(SCHEME) :].split("?")[0]
    hints = [f"a literal {c} in a path is written {escape(c)}" for c in "@%" if c in path]
    return f" ({'; '.join(hints)})" if hints else ""


def _checkout_at(spec: HubSpec, root: Path) -> str:
    """The commit a local folder's files are at, which must be the spec's revision: the folder is a
    git checkout, its HEAD is that revision, and no tracked file differs from it."""
    rev = spec.revision
    if not (root / ".git").exists():
        raise UserError(
            f"{spec.text}: a revision (@{rev}) needs {root} to be a git checkout, and it is a plain "
            f"folder: leave out @{rev}{_literal_hint(spec)}"
        )
    wanted = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if not wanted:
        raise UserError(f"{spec.text}: the git checkout {root} has no revision {rev!r}{_literal_hint(spec)}")
    head = _git(root, "rev-parse", "HEAD")
    if head != wanted:
        raise UserError(
            f"{spec.text}: the checkout {root} is at {head[:12]}, not at {rev} ({wanted[:12]}): "
            f"run git -C {root} checkout {rev}, or leave out @{rev}"
        )
    if _git(root, "status", "--porcelain", "--untracked-files=no"):
        raise UserError(
            f"{spec.text}: {root} has uncommitted changes, so its files are not those of {rev}: "
            "commit or discard them first"
        )
    return wanted


def _git(root: Path, *args: str) -> str:
    """A git command's output in `root` ("" when it fails)."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError(
            f"{root}: checking a revision of a local folder needs git, which is not installed"
        ) from None
    return done.stdout.strip() if done.returncode == 0 else ""


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
        raise UserError(_hub_problem(spec.text, spec.repo, spec.revision, err)) from None
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
    unread = [p for p in paths if not inputs.is_supported(Path(p))]
    if unread:
        raise UserError(
            f"{spec.text}: {unread[0]} is not in a format read here ({FORMATS}); "
            "leave such files out with files=GLOB, or convert them"
        )
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


def _hub_problem(text: str, repo: str, revision: str | None, err: Exception, kind: str = "dataset") -> str:
    """One line for what went wrong reaching a `kind` ("dataset" or "model") repository or its
    configs; `text` is what the user typed."""
    from huggingface_hub import errors

    name = type(err).__name__
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo}"
    if isinstance(err, errors.GatedRepoError):
        return f"{text}: {repo} is gated: accept its terms on {page} and log in (hf auth login, or HF_TOKEN)"
    if isinstance(err, errors.RepositoryNotFoundError):
        return f"{text}: no {kind} repository {repo} on the Hub (or it is private: log in with hf auth login, or HF_TOKEN)"
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{text}: {repo} has no revision {revision!r}"
    message = str(err).strip().splitlines()[0] if str(err).strip() else name
    if kind == "dataset" and ("config" in message.lower() or "BuilderConfig" in message):
        return f"{text}: {message[:300]}; give config=NAME"
    local = (
        "a local copy as hf:///path/to/it"
        if kind == "dataset"
        else "a tokenizer.json or a folder holding one"
    )
    if _offline():
        fetch = f"hf download {repo}" + (" --repo-type dataset" if kind == "dataset" else " tokenizer.json")
        return (
            f"{text}: HF_HUB_OFFLINE is set and the Hugging Face cache has no usable copy of {repo} "
            f"({name}: {message[:200]}): fetch it where there is internet ({fetch}), or give {local}"
        )
    return (
        f"{text}: could not read {repo} ({name}: {message[:200]}); check the network, or set "
        f"HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache, or give {local}"
    )


class Cache:
    """Fetches `files[i]` into `directory / f"{i:06d}"`, in order, ahead of use while the files
    present stay within `max_bytes`; `release(i)` removes one (module docstring)."""

    def __init__(
        self, files: dict[int, RemoteFile], directory: Path, max_bytes: int, rerun: str = RESUME
    ) -> None:
        self.files, self.directory, self.max_bytes, self.rerun = files, directory, max_bytes, rerun
        too_big = [f for f in files.values() if f.source != "in-place" and f.size > max_bytes]
        if too_big:
            raise UserError(
                f"{too_big[0].name} is {too_big[0].size:,} bytes, more than the cache cap of {max_bytes:,}: "
                "raise --cache-max"
            )
        self.present: dict[int, int] = {}  # fetched, not released: index -> bytes
        self.stamps: dict[int, list] = {}  # a copied file's [mtime_ns before the copy, sha256]
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
        file = self.files[i]
        if file.source == "in-place":
            if not Path(file.where).is_file():
                raise UserError(
                    f"{file.name}: {file.where} is gone from the Hugging Face cache: restore it (hf download "
                    f"{file.repo} {file.path} --repo-type dataset --revision {file.revision}); {self.rerun}"
                )
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
                    mtime = os.stat(file.where).st_mtime_ns
                    _copy(Path(file.where), folder / file.path)
                    self.stamps[i] = [mtime, sha256_file(folder / file.path)]
                else:
                    _download(file, folder)
                return
            except UserError:
                raise
            except Exception as err:
                if (lasting := self._lasting(file, err)) is not None:
                    raise UserError(lasting) from None
                if attempt == RETRIES - 1:
                    raise UserError(
                        f"{file.name}: fetching failed {RETRIES} times ({type(err).__name__}: "
                        f"{str(err).strip()[:200]}); {self.rerun}"
                    ) from None
                wait = BACKOFF_SECONDS * 2**attempt
                print(f"{file.name}: {type(err).__name__}; retrying in {wait:.0f} s", file=sys.stderr)
                time.sleep(wait)

    def _lasting(self, file: RemoteFile, err: Exception) -> str | None:
        """One line for a failure that waiting cannot mend (a vanished file, a full or read-only
        disk, a repository gone or gated); None for a passing one (the network), which is retried."""
        from huggingface_hub import errors

        if isinstance(err, FileNotFoundError) and file.source == "copy" and not Path(file.where).exists():
            return f"{file.name}: {file.where} is gone from the folder since the run listed it: restore it; {self.rerun}"
        if isinstance(err, errors.RemoteEntryNotFoundError):
            return (
                f"{file.name}: {file.repo} no longer holds this file at revision {file.revision} (its history "
                "was rewritten?): start over on what it holds now (prepare --overwrite)"
            )
        if isinstance(
            err, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.DisabledRepoError)
        ):
            return _hub_problem(file.name, file.repo, file.revision, err) + f"; then {self.rerun}"
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"--cache-dir {self.directory}: no space left on the device ({err.strerror}) while fetching "
                f"{file.name}: free space, lower --cache-max or choose another --cache-dir; {self.rerun}"
            )
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{file.name}: {err.filename}: {err.strerror}; fix its permissions; {self.rerun}"
        return None


def _copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_with(destination, lambda tmp: shutil.copyfile(source, tmp))


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
    model repository `OWNER/NAME[@REVISION]` or `hf://OWNER/NAME[@REVISION]` (its tokenizer.json,
    from the Hugging Face cache when there); and for a Hub repository, `OWNER/NAME@SHA`, what the
    manifest records. `hf:///path` and `hf://./path` name a local file or folder (%-escapes decoded)."""
    if is_hub(name):
        return _tokenizer_input(name)
    path = Path(name)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {name}: the folder holds no tokenizer.json")
        return path / "tokenizer.json", None
    repo, _, revision = name.partition("@")
    if path.exists() or not REPO_NAME.fullmatch(repo) or name.endswith(".json"):
        return path, None  # a file (load_tokenizer names it if it is missing or unreadable)
    return _hub_tokenizer(f"--tokenizer {name}", repo, revision or None)


def _tokenizer_input(name: str) -> tuple[Path, str | None]:
    """`--tokenizer hf://...`: a model repository, or a local path, by the grammar of `parse`."""
    if "?" in name:
        raise UserError(
            f"--tokenizer {name}: options (?...) are for dataset inputs; give hf://OWNER/NAME[@REVISION] "
            "or a path (a literal ? is written %3F)"
        )
    spec = parse(name)
    if not spec.local:
        return _hub_tokenizer(f"--tokenizer {name}", spec.repo, spec.revision)
    if spec.revision:
        raise UserError(
            f"--tokenizer {name}: a local tokenizer has no revision: leave out @{spec.revision} "
            "(a literal @ in a path is written %40)"
        )
    return tokenizer_file(spec.repo)


def _hub_tokenizer(text: str, repo: str, revision: str | None) -> tuple[Path, str]:
    """tokenizer.json of a Hub model repository at `revision`, and `OWNER/NAME@SHA`."""
    _require_hub_libraries()
    from huggingface_hub import errors, hf_hub_download

    try:
        found = Path(hf_hub_download(repo, "tokenizer.json", revision=revision))
    except errors.RemoteEntryNotFoundError:
        raise UserError(f"{text}: the model repository {repo} holds no tokenizer.json") from None
    except Exception as err:
        raise UserError(_hub_problem(text, repo, revision, err, kind="model")) from None
    return found, f"{repo}@{found.parent.name}"  # the cache's snapshots/<sha>/tokenizer.json


def documents(
    sources: Sequence[Path | RemoteFile],
    fields: Any,
    left_out: list[str],
    cache_dir: Path,
    max_bytes: int,
) -> Iterator[str]:
    """Every usable document of local and Hub inputs in order (`inputs.documents`), each Hub file
    fetched into `cache_dir` when reached and removed once read."""
    remote = {i: s for i, s in enumerate(sources) if isinstance(s, RemoteFile)}
    cache = Cache(remote, cache_dir, max_bytes, rerun="run the same command again") if remote else None
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


def expand(patterns: Sequence[str], pins: dict[str, str] | None = None) -> list[Path | RemoteFile]:
    """Local inputs (as `inputs.expand`) and Hub inputs, in the order given; `pins` maps a Hub input
    to the commit an interrupted run of it read (`resolve`)."""
    if any(map(is_hub, patterns)):
        _require_hub_libraries()

    found: list[Path | RemoteFile] = []
    for pattern in patterns:
        if is_hub(pattern):
            found += resolve(parse(pattern), (pins or {}).get(pattern))
        else:
            found += inputs.expand([pattern])
    return inputs.read_once(found)
