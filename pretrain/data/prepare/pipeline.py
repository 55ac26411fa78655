"""`pretrain data prepare`: raw text -> token shards, in parallel, resumable, byte-identical.

Pipeline: the inputs are cut into fixed work units (`inputs.plan`); a process pool reads and
tokenizes units (each worker single-threaded, `encode_batch_fast`), and the main process
appends their documents in unit order to the current shard of each split. Each document
goes to validation iff a hash of its text falls below `val_fraction`, so the split does not
depend on the order or the worker count. A shard is cut before the document that would
overflow `shard_tokens`, which depends only on the document sequence: the output is the
same byte for byte whatever `--num-proc` is.

Resume: about once a second (between units) the open shards' temporary files are fsynced
and `.prepare/state.json` is replaced atomically: the commit point (units done, open shard
sizes, skip counts). Shards closed since the last commit are then published: sidecar
written, `.bin.tmp` renamed to `.bin`. A rerun after a kill at any point truncates the
temporary files to the committed sizes, finishes publishing, and continues with the next
unit. `manifest.json` is written last, and readers accept only shards it lists, so no
partial shard is ever read. A state or a published shard's sidecar that is damaged (empty,
truncated, not JSON, the wrong shape), or a shard file it counts on that is gone, is not guessed
at: the preparation starts over, saying so in one line (nothing finished is lost).

Memory: a long document is tokenized a piece at a time, and once its ids pass SPILL_TOKENS the
worker writes them to a spill file (`.prepare/spill/`) that the writer copies into the shard, so
no process holds a huge document's ids; a text file is read, hashed and tokenized a block at a
time, so its length costs nothing, and so is a JSON line longer than `inputs.LONG_LINE`, its text
decoded and tokenized as the line is read (`inputs.LongLine`, `benchmarks/prepare_memory.py`).

One preparation per output folder: `prepare` holds the folder's lease (`LOCK`, `pretrain.lease`)
while it runs; another is refused naming it, and a killed one's lease on this host is taken over.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from pretrain import lease
from pretrain.data.prepare import hub, inputs
from pretrain.data.prepare.hub import RemoteFile
from pretrain.data.prepare.inputs import Problem, Unit
from pretrain.data.prepare.settings import Settings
from pretrain.data.prepare.units import END, Source, UnitSource, recorded_revisions
from pretrain.data.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    TOKENIZER,
    Manifest,
    as_object,
    content_fingerprint,
    dtype_for_vocab,
    field,
    load_manifest,
    read_sidecar,
    sha256_file,
    shard_name,
)
from pretrain.data.tokenizer import TokenizerInfo, load_tokenizer
from pretrain.errors import UserError, writing
from pretrain.files import read_json, write_atomic, write_json_atomic

STATE_DIR = ".prepare"
SPILL_DIR = "spill"  # in STATE_DIR: long documents' tokens on their way from a worker to a shard
LOCK = ".prepare-owner.json"  # the lease of the one `prepare` writing an output folder
PIECE_CHARS = 1 << 20  # longer documents are tokenized a piece at a time (`_encode`)
SPILL_TOKENS = 1 << 22  # a document with more tokens goes to a shard through a spill file (`_Sink`)
READ_BYTES = 1 << 20  # a text file is read this much at a time (`_TextFile`)
HASH_CHARS = 1 << 22  # a document is hashed this many characters at a time (`is_val`)
OUR_FILE = re.compile(r"shard_\d+\.(bin|json|bin\.tmp|docs\.tmp|json\.tmp)")  # what prepare writes in a split
EXAMPLES = 20  # skipped records listed in the manifest
WARNINGS = 10  # skipped records printed while running


@dataclass(frozen=True)
class Spill:
    """One long document's tokens (with its BOS/EOS), written by a worker to a file of their own."""

    path: str
    tokens: int


# Documents of a split, in order: several packed in memory (tokens back to back, lengths), or one spilled.
Part = tuple[np.ndarray, np.ndarray] | Spill


@dataclass
class UnitResult:
    """One tokenized unit: per split, its documents as parts."""

    parts: dict[str, list[Part]]
    problems: list[Problem]
    lines: int
    excluded: int

    def documents(self) -> int:
        return sum(1 if isinstance(p, Spill) else len(p[1]) for parts in self.parts.values() for p in parts)

    def tokens(self) -> int:
        return sum(p.tokens if isinstance(p, Spill) else len(p[0]) for ps in self.parts.values() for p in ps)


# ---------------------------------------------------------------- worker side

_worker: dict[str, Any] = {}


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the preparing process dies, even by
    SIGKILL, so a killed `prepare` never leaves orphaned workers behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _init_worker(
    paths: list[Path],
    tokenizer_path: str,
    fields: inputs.Fields,
    settings: Settings,
    eos: int,
    bos: int | None,
    dtype: str,
    spill_dir: str,
) -> None:
    _die_with_parent()
    _worker.update(
        paths=paths,
        tokenizer=Tokenizer.from_file(tokenizer_path),
        fields=fields,
        val_fraction=settings.val_fraction,
        eos=eos,
        bos=bos if settings.bos else None,
        dtype=np.dtype(dtype),
        spill_dir=spill_dir,
    )


def is_val(text: str, val_fraction: float) -> bool:
    """The document's split: a hash of its text, so duplicates share a split (hashed a slice at a
    time: no copy of a long document)."""
    digest = hashlib.blake2b(digest_size=8)
    for start in range(0, len(text), HASH_CHARS):
        digest.update(text[start : start + HASH_CHARS].encode("utf-8"))
    return _below(digest, val_fraction)


def _below(digest: Any, val_fraction: float) -> bool:
    """The split rule on a finished 8-byte blake2b of a document's UTF-8 bytes."""
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2**64


def _pack(
    ids: Sequence[Sequence[int] | np.ndarray], eos: int, bos: int | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by EOS (and preceded by BOS if given)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    if bos is None:
        return np.insert(flat, ends, eos), lengths + 1
    where = np.stack([ends - lengths, ends], axis=1).ravel()
    return np.insert(flat, where, np.tile([bos, eos], len(ids))), lengths + 2


Doc = Sequence[int] | np.ndarray | Spill  # one document's ids: in memory (no BOS/EOS yet), or spilled


def _parts(docs: Sequence[Doc]) -> list[Part]:
    """A split's documents as parts: each run of in-memory documents packed, each spilled one alone."""
    w = _worker
    parts: list[Part] = []
    run: list[Sequence[int] | np.ndarray] = []
    for doc in [*docs, None]:
        if (doc is None or isinstance(doc, Spill)) and run:
            parts.append(_pack(run, w["eos"], w["bos"], w["dtype"]))
            run = []
        if isinstance(doc, Spill):
            parts.append(doc)
        elif doc is not None:
            run.append(doc)
    return parts


def tokenize_unit(unit: Unit) -> UnitResult:
    """Read, split and tokenize one unit (runs in a worker process)."""
    w = _worker
    if unit.kind == "text":
        return _tokenize_text_file(unit)
    chunk = inputs.read(w["paths"][unit.file], unit, w["fields"], _encode_line)
    val = [is_val(t, w["val_fraction"]) for t in chunk.texts]
    ids = _encode(w["tokenizer"], chunk.texts)
    chunk.texts.clear()
    docs: list[tuple[Doc, bool]] = list(zip(ids, val, strict=True))
    for at, doc in reversed(chunk.streamed):  # long lines' documents, in their places
        docs.insert(at, doc)
    parts = {split: _parts([x for x, v in docs if v == (split == "val")]) for split in SPLITS}
    return UnitResult(parts, chunk.problems, chunk.lines, chunk.excluded)


def _encode_line(line: inputs.LongLine) -> tuple[Doc, bool] | None:
    """A long JSON line's document and split, tokenized a piece at a time as its text is read
    (`inputs.LongLine`); None (and no spill file left) if the line gives no document."""
    w = _worker
    doc: Doc | None = None
    for value in line.values():
        _discard(doc)  # an earlier value of a field given twice
        doc = _encode_pieces(w["tokenizer"], _pieces(value.blocks()))
    line.finish()
    if line.document is None or doc is None:
        _discard(doc)
        return None
    return doc, _below(line.document.digest, w["val_fraction"])


def _discard(doc: Doc | None) -> None:
    if isinstance(doc, Spill):
        os.unlink(doc.path)


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[Doc]:
    """Token ids of each text. A long document is encoded a piece at a time, cut where white space
    follows a non-space character: a pre-tokenization boundary of byte-level BPE, so the ids are those
    of encoding it whole, while memory stays bounded by the piece (a 50 MB document whole peaks at
    several GB); its ids go to a spill file once they are many (`_Sink`)."""
    short = [i for i, text in enumerate(texts) if len(text) <= PIECE_CHARS]
    ids: list[Doc] = [[] for _ in texts]
    encoded = tokenizer.encode_batch_fast([texts[i] for i in short], add_special_tokens=False)
    for i, encoding in zip(short, encoded, strict=True):
        ids[i] = encoding.ids
    for i, text in enumerate(texts):
        if len(text) > PIECE_CHARS:
            ids[i] = _encode_pieces(tokenizer, _pieces(_slices(text)))
    return ids


def _encode_pieces(tokenizer: Tokenizer, pieces: Iterable[str]) -> np.ndarray | Spill:
    """One document's ids, encoded piece by piece into a `_Sink`; the sink's file is removed if
    reading the pieces fails."""
    sink = _Sink()
    try:
        for piece in pieces:
            sink.add(tokenizer.encode(piece, add_special_tokens=False).ids)
    except BaseException:
        sink.discard()
        raise
    return sink.result()


_spill_numbers = itertools.count()


class _Sink:
    """One long document's ids, added piece by piece: kept in memory up to SPILL_TOKENS, then
    written to a spill file (in the shard dtype, with BOS and EOS), so that a worker never holds a
    huge document's ids and never sends them through a pipe; the writer copies the file."""

    def __init__(self) -> None:
        self.dtype: np.dtype = _worker["dtype"]
        self.pieces: list[np.ndarray] = []
        self.count = 0
        self.file: BinaryIO | None = None
        self.path = ""

    def add(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        if self.file is None and self.count + len(array) > SPILL_TOKENS:
            self._spill()
        if self.file is None:
            self.pieces.append(array)
        else:
            self.file.write(array.tobytes())
        self.count += len(array)

    def _spill(self) -> None:
        self.path = os.path.join(_worker["spill_dir"], f"{os.getpid()}-{next(_spill_numbers)}.tokens")
        self.file = open(self.path, "wb")
        if _worker["bos"] is not None:
            self.file.write(np.array([_worker["bos"]], dtype=self.dtype).tobytes())
        for piece in self.pieces:
            self.file.write(piece.tobytes())
        self.pieces = []

    def result(self) -> np.ndarray | Spill:
        """The ids in memory (no BOS/EOS), or the spill file, finished with EOS."""
        if self.file is None:
            return np.concatenate(self.pieces) if self.pieces else np.zeros(0, self.dtype)
        self.file.write(np.array([_worker["eos"]], dtype=self.dtype).tobytes())
        self.file.close()
        return Spill(self.path, self.count + 1 + (_worker["bos"] is not None))

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            os.unlink(self.path)


def _tokenize_text_file(unit: Unit) -> UnitResult:
    """A text file is one document: read, hashed and tokenized a block at a time, so that memory stays
    bounded however long it is. Same document, split and problems as reading it whole (`inputs.read`)."""
    w = _worker
    text = _TextFile(w["paths"][unit.file])
    doc = _encode_pieces(w["tokenizer"], _pieces(text.blocks()))
    if text.problem is None and not text.size:
        text.problem = Problem(None, "", "empty file", "empty file")
    if text.problem is not None:
        _discard(doc)
        return UnitResult({split: [] for split in SPLITS}, [text.problem], 0, 0)
    split = "val" if _below(text.digest, w["val_fraction"]) else "train"
    return UnitResult({s: _parts([doc] if s == split else []) for s in SPLITS}, [], 0, 0)


class _TextFile:
    """A (possibly compressed) UTF-8 text file's characters, READ_BYTES at a time, hashing its bytes as
    they pass; a decoding problem stops the characters and is kept in `problem`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.blake2b(digest_size=8)
        self.size = 0  # bytes read so far
        self.lines = 0  # line breaks in them
        self.problem: Problem | None = None

    def blocks(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with inputs._open_bytes(self.path) as f:
                while block := f.read(READ_BYTES):
                    pending = len(decoder.getstate()[0])  # bytes of a character begun in the block before
                    try:
                        text = decoder.decode(block)
                    except UnicodeDecodeError as err:
                        self._undecodable(block[: max(0, err.start - pending)], err.start - pending)
                        return
                    yield text
                    self.digest.update(block)
                    self.size += len(block)
                    self.lines += block.count(b"\n")
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError as err:  # the file ends inside a character
                    self._undecodable(b"", err.start - len(decoder.getstate()[0]))
        except inputs._decompress_errors() as err:
            self.problem = Problem(None, "", "unreadable file", f"cannot decompress: {err}")

    def _undecodable(self, before: bytes, offset: int) -> None:
        """Invalid UTF-8 `offset` bytes into the current block, after the bytes `before` in it."""
        line = self.lines + before.count(b"\n") + 1
        self.problem = Problem(line, "", "undecodable bytes", f"invalid UTF-8 at byte {self.size + offset}")


def _slices(text: str) -> Iterator[str]:
    """`text` in slices of PIECE_CHARS characters."""
    return (text[start : start + PIECE_CHARS] for start in range(0, len(text), PIECE_CHARS))


def _pieces(blocks: Iterable[str]) -> Iterator[str]:
    """The text of `blocks`, in pieces of at most PIECE_CHARS, each cut before white space that
    follows a non-space character (a hard cut only where PIECE_CHARS characters hold no white space
    at all). The pieces depend only on the text, not on how `blocks` cut it."""
    rest = ""
    for block in blocks:
        rest += block
        while len(rest) > PIECE_CHARS:
            cut = PIECE_CHARS
            while cut > 1 and not (rest[cut].isspace() and not rest[cut - 1].isspace()):
                cut -= 1
            cut = cut if cut > 1 else PIECE_CHARS
            yield rest[:cut]
            rest = rest[cut:]
    if rest:
        yield rest


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """One tokenizer thread per process: --num-proc is the parallelism (and no fork warning)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _processed(
    source: UnitSource, num_proc: int, initargs: tuple, idle: Callable[[], None]
) -> Iterator[tuple[Unit, UnitResult]]:
    """Tokenized units in unit order, at most 2 * num_proc in flight. A unit of a Hub file not
    fetched yet is waited for only when nothing is in flight (after `idle()`, which commits and
    frees the cache), so a full cache never waits on results that nobody collects."""
    if num_proc == 1:
        _init_worker(*initargs)
        source.fetch()
        while (unit := source.next(True, idle)) is not END:
            assert unit is not None  # a blocking `next` gives a unit or END
            yield unit, tokenize_unit(unit)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(
        num_proc, mp_context=context, initializer=_init_worker, initargs=initargs
    ) as pool:
        pool.submit(int).result()  # the workers exist (forked) before the fetch thread starts
        source.fetch()
        pending: deque[tuple[Unit, Future[UnitResult]]] = deque()
        try:
            while True:
                while len(pending) < 2 * num_proc:
                    unit = source.next(not pending, idle)
                    if unit is None or unit is END:
                        break
                    pending.append((unit, pool.submit(tokenize_unit, unit)))
                if not pending:
                    return
                unit, future = pending.popleft()
                yield unit, future.result()
        finally:
            for _, future in pending:
                future.cancel()


# ---------------------------------------------------------------- shard writing


def _temp_paths(root: Path, split: str, index: int) -> tuple[Path, Path]:
    base = root / shard_name(split, index)
    return base.with_name(base.name + ".bin.tmp"), base.with_name(base.name + ".docs.tmp")


class SplitWriter:
    """Appends documents to one split's shards; cuts depend only on the document sequence."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int, state: dict) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.index, self.tokens, self.docs = state["index"], state["tokens"], state["docs"]
        self.closed: list[int] = []  # closed in the current unit, published after the commit
        (root / split).mkdir(parents=True, exist_ok=True)
        self._files: tuple[BinaryIO, BinaryIO] | None = None
        if self.tokens:
            self._reopen()

    def _reopen(self) -> None:
        """Continue the open shard of a committed state: its files cut to the committed sizes."""
        paths = _temp_paths(self.root, self.split, self.index)
        sizes = (self.tokens * self.dtype.itemsize, self.docs * 8)
        for path, size in zip(paths, sizes, strict=True):
            if not path.is_file() or path.stat().st_size < size:
                raise Damaged(
                    f"{path}: shorter than the {size} bytes {STATE_DIR}/state.json counts in it, or missing"
                )
        self._files = (open(paths[0], "r+b"), open(paths[1], "r+b"))
        for f, size in zip(self._files, sizes, strict=True):
            f.truncate(size)
            f.seek(0, os.SEEK_END)

    def state(self) -> dict:
        return {"index": self.index, "tokens": self.tokens, "docs": self.docs}

    def add(self, part: Part) -> None:
        """Append a part's documents."""
        if isinstance(part, Spill):
            self._add_spilled(part)
        else:
            self._add_packed(*part)

    def _add_spilled(self, spill: Spill) -> None:
        """Append one long document from its spill file (copied a block at a time), then delete that."""
        if self.tokens and self.tokens + spill.tokens > self.shard_tokens:
            self.close_shard()
        files = self._open()
        with open(spill.path, "rb") as f:
            shutil.copyfileobj(f, files[0], READ_BYTES)
        files[1].write(np.array([spill.tokens], dtype="<i8").tobytes())
        self.tokens += spill.tokens
        self.docs += 1
        os.unlink(spill.path)

    def _add_packed(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (their tokens back to back, and their lengths)."""
        ends = np.cumsum(lengths)
        i, n = 0, len(lengths)
        while i < n:
            before = int(ends[i - 1]) if i else 0
            j = max(i, int(np.searchsorted(ends, before + self.shard_tokens - self.tokens, side="right")))
            if j == i and self.tokens == 0:
                j = i + 1  # a document longer than a shard gets a shard of its own
            if j > i:
                self._write(tokens[before : int(ends[j - 1])], lengths[i:j])
            if j < n:
                self.close_shard()
            i = j

    def _open(self) -> tuple[BinaryIO, BinaryIO]:
        if self._files is None:
            bin_tmp, docs_tmp = _temp_paths(self.root, self.split, self.index)
            self._files = (open(bin_tmp, "wb"), open(docs_tmp, "wb"))
        return self._files

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        files = self._open()
        files[0].write(tokens.astype(self.dtype, copy=False).tobytes())
        files[1].write(lengths.astype("<i8").tobytes())
        self.tokens += len(tokens)
        self.docs += len(lengths)

    def sync(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.flush()
                os.fsync(f.fileno())

    def close_shard(self) -> None:
        if self.tokens == 0:
            return
        self.sync()
        assert self._files is not None  # a shard with tokens has its files open
        for f in self._files:
            f.close()
        self._files = None
        self.closed.append(self.index)
        self.index, self.tokens, self.docs = self.index + 1, 0, 0

    def abandon(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None


class Damaged(UserError):
    """A file of an unfinished preparation is damaged or missing: the preparation starts over."""


def publish(root: Path, split: str, index: int, header: dict) -> dict:
    """Turn a closed shard's temporary files into `.bin` + sidecar; idempotent. Returns its entry;
    raises Damaged if the files are missing or the sidecar of a published shard is damaged."""
    name = shard_name(split, index)
    final, sidecar = root / f"{name}.bin", root / f"{name}.json"
    bin_tmp, docs_tmp = _temp_paths(root, split, index)
    if not final.exists():
        if not (bin_tmp.is_file() and docs_tmp.is_file()):
            raise Damaged(f"{final}: missing, though {STATE_DIR}/state.json counts it as written")
        lengths = np.fromfile(docs_tmp, dtype="<i8")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        tokens = bin_tmp.stat().st_size // np.dtype(header["dtype"]).itemsize
        meta = {**header, "tokens": tokens, "documents": len(lengths), "sha256": sha256_file(bin_tmp)}
        write_json_atomic(sidecar, {**meta, "doc_offsets": offsets})
        os.replace(bin_tmp, final)
    docs_tmp.unlink(missing_ok=True)
    try:
        meta = read_sidecar(sidecar, np.dtype(header["dtype"]).itemsize)
    except (OSError, ValueError) as err:
        raise Damaged(f"{sidecar}: damaged shard sidecar ({err})") from None
    return {
        "file": f"{name}.bin",
        "tokens": meta["tokens"],
        "documents": meta["documents"],
        "sha256": meta["sha256"],
    }


# ---------------------------------------------------------------- the run


def _identity(sources: list[Source], tok: TokenizerInfo, settings: Settings, dtype: np.dtype) -> str:
    """What a resumed run must share with the interrupted one."""
    spec = {
        "format": FORMAT,
        "unit_bytes": inputs.UNIT_BYTES,
        "tokenizer": tok.manifest_entry(),
        "dtype": dtype.name,
        "settings": asdict(settings),
        "inputs": [
            [s.name, s.size]  # a mirror file's bytes are checked by content on resume (`units`)
            if isinstance(s, RemoteFile)
            else [str(s), inputs.input_record(s)["bytes"], inputs.modified(s)]
            for s in sources
        ],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _fresh_state(identity: str) -> dict:
    return {
        "identity": identity,
        "units_done": 0,
        "line_base": [-1, 0],  # [file, lines] of the units done so far in that file
        "splits": {s: {"index": 0, "tokens": 0, "docs": 0} for s in SPLITS},
        "skipped": {},
        "examples": [],
        "excluded": 0,
    }


def _clean(root: Path) -> None:
    """Delete what an earlier preparation wrote in `root`, recognised by name and format; nothing else."""
    manifest = root / MANIFEST
    if manifest.exists():
        try:
            ours = json.loads(manifest.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(
                f"--overwrite: {manifest} was not written by `pretrain data prepare`; move it away first"
            )
        manifest.unlink()
    for split in SPLITS:
        folder = root / split
        if folder.is_dir():
            for path in folder.iterdir():
                if OUR_FILE.fullmatch(path.name) and path.is_file():
                    path.unlink()
            with contextlib.suppress(OSError):  # kept when it holds files of someone else's
                folder.rmdir()
    shutil.rmtree(root / STATE_DIR, ignore_errors=True)


def _check_apart(root: Path, patterns: Sequence[str], paths: Sequence[Path]) -> None:
    """The output folder must neither hold an input nor lie inside an input folder."""
    out = root.resolve()
    for path in paths:
        if out in path.resolve().parents:
            raise UserError(
                f"--output {root} holds the input {path}: a dataset folder is written and replaced by prepare; "
                "give the dataset a folder of its own, outside the inputs"
            )
    for pattern in patterns:
        folder = Path(pattern)
        if folder.is_dir() and (out == folder.resolve() or folder.resolve() in out.parents):
            raise UserError(
                f"--output {root} is inside the input folder {pattern}: a later run would read the dataset's "
                "own files as input; write it outside the inputs"
            )


def _start(root: Path, identity: str, overwrite: bool) -> dict | None:
    """The committed state to continue from: fresh unless an identical run was interrupted;
    None if an identical run finished (killed while removing its progress folder)."""
    state_path = root / STATE_DIR / "state.json"
    state, damage = (None, None) if overwrite else _read_state(state_path)
    if overwrite:
        _clean(root)
    elif (root / MANIFEST).exists():
        if state is not None and state["identity"] == identity:
            shutil.rmtree(root / STATE_DIR)
            return None
        load_manifest(root)  # a damaged manifest is named as such
        raise UserError(
            f"{root} already holds a prepared dataset ({root / MANIFEST}); pass --overwrite to replace it"
        )
    elif state is not None:
        if state["identity"] == identity:
            return state
        raise UserError(
            f"{root} holds an unfinished preparation of other inputs or settings ({state_path}); "
            "pass --overwrite to start over"
        )
    elif damage is not None:
        _start_over(root, f"{state_path}: damaged ({damage})")
    elif any((root / s).exists() for s in SPLITS):
        raise UserError(
            f"{root} holds shard folders but no manifest or progress; pass --overwrite to start over"
        )
    return _begin(root, identity)


def _begin(root: Path, identity: str) -> dict:
    """A fresh state, committed: a kill before the first commit resumes from nothing."""
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    state = _fresh_state(identity)
    write_json_atomic(root / STATE_DIR / "state.json", state)
    return state


def _start_over(root: Path, why: str) -> None:
    """Remove an unfinished preparation that cannot be continued, saying so (its work is redone)."""
    print(f"{why}: starting the preparation over (nothing finished is lost: no dataset was written yet)",
          file=sys.stderr)  # fmt: skip
    _clean(root)


def _read_state(path: Path) -> tuple[dict | None, str | None]:
    """The committed state at `path` (None if there is none), or None and why it is damaged."""
    if not path.exists():
        return None, None
    try:
        state = as_object(read_json(path))
        _check_state(state)
    except (OSError, ValueError) as err:
        return None, str(err)
    return state, None


def _check_state(state: dict) -> None:
    """The fields a preparation continues from; ValueError naming the first one wrong."""
    field(state, "identity", str)
    field(state, "units_done", int)
    field(state, "line_base.0", int)
    field(state, "line_base.1", int)
    for split in SPLITS:
        for name in ("index", "tokens", "docs"):
            if field(state, f"splits.{split}.{name}", int) < 0:
                raise ValueError(f"field 'splits.{split}.{name}' is negative")
    for name in ("skipped", *(("file_units",) if "file_units" in state else ())):
        for key, count in field(state, name, dict).items():
            if not isinstance(count, int) or isinstance(count, bool):
                raise ValueError(f"field {name!r} counts {key!r} as {count!r}, not an integer")
    field(state, "examples", list)
    field(state, "excluded", int)


def _open_run(root: Path, state: dict, header: dict, shard_tokens: int) -> Run:
    """The output side, continuing `state`; started over (said in one line) when a file the state
    counts on is damaged or missing."""
    try:
        return Run(root, state, header, shard_tokens)
    except Damaged as err:
        _start_over(root, str(err))
    return Run(root, _begin(root, state["identity"]), header, shard_tokens)


class Run:
    """The output side of a preparation: shard writers, committed state, published shards."""

    def __init__(self, root: Path, state: dict, header: dict, shard_tokens: int) -> None:
        self.root, self.state, self.header = root, state, header
        self.published = {split: self._recover(split) for split in SPLITS}
        dtype = np.dtype(header["dtype"])
        self.writers = {s: SplitWriter(root, s, dtype, shard_tokens, state["splits"][s]) for s in SPLITS}

    def _recover(self, split: str) -> list[dict]:
        """Publish shards closed by committed units; drop everything written after the last commit."""
        s = self.state["splits"][split]
        published = [publish(self.root, split, i, self.header) for i in range(s["index"])]
        for path in (self.root / split).glob("shard_*"):
            if not OUR_FILE.fullmatch(path.name):
                continue  # not ours: never deleted as ours
            index, _, suffix = path.name[len("shard_") :].partition(".")
            if int(index) < s["index"]:
                keep = suffix in ("bin", "json")
            else:
                keep = int(index) == s["index"] and s["tokens"] > 0 and suffix in ("bin.tmp", "docs.tmp")
            if not keep:
                path.unlink()
        return published

    def add_problems(self, problems: Sequence[Problem], messages: list[str]) -> None:
        """Count skipped records (`messages` describe them)."""
        state = self.state
        for problem, message in zip(problems, messages, strict=True):
            state["skipped"][problem.reason] = state["skipped"].get(problem.reason, 0) + 1
            if len(state["examples"]) < EXAMPLES:
                state["examples"].append(message)

    def add(self, unit: Unit, result: UnitResult, messages: list[str]) -> None:
        """Append a unit's documents and count its skipped records (`messages` describe them)."""
        state = self.state
        self.add_problems(result.problems, messages)
        for split, writer in self.writers.items():
            for part in result.parts[split]:
                writer.add(part)
        state["excluded"] += result.excluded
        state["units_done"] += 1
        state["line_base"] = [unit.file, self.line_base(unit) + result.lines]

    def line_base(self, unit: Unit) -> int:
        """Lines of `unit`'s file before it (for absolute line numbers in messages)."""
        return self.state["line_base"][1] if self.state["line_base"][0] == unit.file else 0

    def commit(self, final: bool = False) -> None:
        """Make everything added so far durable, then publish the shards it closed."""
        for split, writer in self.writers.items():
            if final:
                writer.close_shard()
            writer.sync()
            self.state["splits"][split] = writer.state()
        write_json_atomic(self.root / STATE_DIR / "state.json", self.state)
        for split, writer in self.writers.items():
            self.published[split] += [publish(self.root, split, i, self.header) for i in writer.closed]
            writer.closed.clear()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.abandon()


def prepare(
    patterns: Sequence[str],
    tokenizer: str | os.PathLike,
    output: str | os.PathLike,
    settings: Settings | None = None,
    *,
    num_proc: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    dtype: str = "auto",
    eos_token: str | None = None,
    bos_token: str | None = None,
    show_progress: bool = True,
    commit_seconds: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    cache_max: int = hub.DEFAULT_CACHE_BYTES,
) -> Manifest:
    """Tokenize the inputs matched by `patterns` into a dataset at `output` (see the module docstring).

    `patterns` are local files, folders and globs, or Hub datasets (`hf://OWNER/NAME...`,
    `pretrain.data.prepare.hub`), whose files are fetched into `cache_dir` (default: in the output's
    progress folder), at most `cache_max` bytes at a time. `tokenizer` is a tokenizer.json, a
    folder holding one, or a Hub repository name. Progress is committed at most every
    `commit_seconds` (0: after every unit); a rerun after a kill continues from the last commit.
    """
    if num_proc is not None and num_proc < 1:
        raise UserError(f"--num-proc must be at least 1 (or left out: all CPUs), got {num_proc}")
    with (
        writing(output, "--output"),
        contextlib.ExitStack() as held,
    ):  # a file in the way, no space, ...: one line
        began = time.time()
        settings = settings or Settings()
        if not 0 <= settings.val_fraction < 1:
            raise UserError(f"--val-fraction {settings.val_fraction} is not in [0, 1)")
        if settings.shard_tokens < 1:
            raise UserError(f"--shard-tokens {settings.shard_tokens} must be positive")
        tokenizer_path, tokenizer_source = hub.tokenizer_file(str(tokenizer))
        tok = replace(load_tokenizer(tokenizer_path, eos_token, bos_token), source=tokenizer_source)
        if settings.bos and tok.bos_id is None:
            raise UserError(
                f"{tok.path}: --bos asked for, but the tokenizer has no BOS token; name one with --bos-token"
            )
        token_dtype = (
            dtype_for_vocab(tok.vocab_size) if dtype == "auto" else np.dtype(dtype).newbyteorder("<")
        )
        if tok.vocab_size > np.iinfo(token_dtype).max + 1:
            raise UserError(
                f"{tok.path}: vocab size {tok.vocab_size:,} does not fit {token_dtype.name} "
                f"(ids up to {np.iinfo(token_dtype).max:,}); use --dtype uint32 or auto"
            )
        if cache_max < 1:
            raise UserError(f"--cache-max must be positive, got {cache_max}")
        fields = inputs.Fields(settings.text_field, settings.exclude)
        pins = {} if overwrite else recorded_revisions(Path(output) / STATE_DIR / "state.json")
        sources = hub.expand(patterns, pins)
        local = [s for s in sources if isinstance(s, Path)]
        _check_apart(Path(output), [p for p in patterns if not hub.is_hub(p)], local)
        units = UnitSource(sources, settings.text_field)
        early = units.early
        early_messages = [inputs.describe_problem(units.names[i], problem, 0) for i, problem in early]
        if strict and early_messages:
            raise UserError(early_messages[0])
        root = Path(output)
        root.mkdir(parents=True, exist_ok=True)
        held.enter_context(_owning(root))
        identity = _identity(sources, tok, settings, token_dtype)
        state = _start(root, identity, overwrite)
        if state is None:
            return load_manifest(root)
        cache = None
        if units.remote:
            folder = Path(cache_dir or root / STATE_DIR / "cache") / f"prepare-{identity[:16]}"
            cache = hub.Cache(units.remote, folder, cache_max)
        header = {
            "format": FORMAT,
            "dtype": token_dtype.name,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id if settings.bos else None,
            "tokenizer_fingerprint": tok.fingerprint,
        }
        run = _open_run(root, state, header, settings.shard_tokens)
        state = run.state
        spill_dir = root / STATE_DIR / SPILL_DIR
        shutil.rmtree(spill_dir, ignore_errors=True)  # what a killed run left on its way to a shard
        spill_dir.mkdir()
        num_proc = num_proc or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
        skipped_bytes = units.start(state, cache)
        bar = tqdm(
            total=units.total_bytes(),
            initial=skipped_bytes,
            unit="B",
            unit_scale=True,
            desc="prepare",
            disable=not show_progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        warned = 0
        for message in early_messages:
            warned = _warn(message, warned, bar)
        docs = tokens = 0
        last_commit = time.monotonic()

        def commit() -> None:
            nonlocal last_commit
            note_found()  # counted in the state that records the files they were found in
            run.commit()
            units.release_committed(state["units_done"])
            last_commit = time.monotonic()

        def note_found() -> None:  # problems of Hub files, found when they are fetched and planned
            nonlocal warned
            found = units.take_found()
            messages = [inputs.describe_problem(units.names[i], p, 0) for i, p in found]
            if strict and messages:
                raise UserError(messages[0])
            for message in messages:
                warned = _warn(message, warned, bar)
            run.add_problems([p for _, p in found], messages)

        try:
            with _serial_tokenizers():
                initargs = (
                    units.read_paths(),
                    str(tok.path),
                    fields,
                    settings,
                    tok.eos_id,
                    tok.bos_id,
                    token_dtype.name,
                    str(spill_dir),
                )
                for unit, result in _processed(units, num_proc, initargs, commit):
                    note_found()
                    base = run.line_base(unit)
                    messages = [
                        inputs.describe_problem(units.names[unit.file], p, base) for p in result.problems
                    ]
                    if strict and messages:
                        raise UserError(messages[0])
                    for message in messages:
                        warned = _warn(message, warned, bar)
                    run.add(unit, result, messages)
                    if time.monotonic() - last_commit >= commit_seconds:
                        commit()
                    docs += result.documents()
                    tokens += result.tokens()
                    elapsed = max(time.time() - began, 1e-9)
                    bar.set_postfix_str(
                        f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed / 1e6:,.2f}M tokens/s",
                        refresh=False,
                    )
                    bar.update(unit.size)
            note_found()
            run.commit(final=True)
        finally:
            bar.close()
            run.close()
            if cache is not None:
                cache.close()
        if cache is not None:
            cache.remove()
            if show_progress:
                print(f"hub cache: peak {cache.peak:,} bytes (cap {cache.max_bytes:,})", file=sys.stderr)
        manifest = _manifest(sources, tok, settings, token_dtype, run.published, state, early_messages, early)
        if not sum(split["documents"] for split in manifest["splits"].values()):
            raise UserError(
                f"no usable document in {', '.join(patterns)} ({manifest['skipped']['total']} skipped)"
            )
        if tok.path.resolve() != (root / TOKENIZER).resolve():
            write_atomic(root / TOKENIZER, tok.path.read_bytes())
        write_json_atomic(root / MANIFEST, manifest)
        shutil.rmtree(root / STATE_DIR)
        prepared = load_manifest(root)
        if show_progress:
            print(summary(prepared, time.time() - began))
        return prepared


@contextlib.contextmanager
def _owning(root: Path) -> Iterator[None]:
    """Hold the lease of output folder `root` (`pretrain.lease`): a second `prepare` into it is refused
    naming this one while it runs; a lease left by a killed one on this host is taken over."""
    path = root / LOCK

    def refuse(owner: dict) -> str:
        return (
            f"{root} is being written by another `pretrain data prepare` ({lease.describe_owner(owner)}): two "
            "preparations into one folder would mix their shards. Wait for it to finish or stop it, or choose "
            f"another --output; if that process is gone for good (its node died), delete {path}"
        )

    lease.acquire(path, refuse, "`pretrain data prepare`")
    try:
        yield
    finally:
        lease.release(path)


def _warn(message: str, warned: int, bar: tqdm) -> int:
    """Print the first WARNINGS skipped records, then one line saying there are more."""
    if warned < WARNINGS:
        bar.write(f"warning: {message} (skipped)", file=sys.stderr)
    elif warned == WARNINGS:
        bar.write("warning: more records skipped; the summary counts them all", file=sys.stderr)
    return warned + 1


def _manifest(
    sources: list[Source],
    tok: TokenizerInfo,
    settings: Settings,
    dtype: np.dtype,
    published: dict[str, list[dict]],
    state: dict,
    early_messages: list[str],
    early: list[tuple[int, Problem]],
) -> dict:
    skipped = Counter(p.reason for _, p in early)
    skipped.update(state["skipped"])
    splits = {
        split: {
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        for split, shards in published.items()
    }
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": tok.manifest_entry(),
        "settings": asdict(settings),
        "inputs": [s.record() if isinstance(s, RemoteFile) else inputs.input_record(s) for s in sources],
        "splits": splits,
        "skipped": {
            "total": sum(skipped.values()),
            "by_reason": dict(sorted(skipped.items())),
            "examples": (early_messages + state["examples"])[:EXAMPLES],
        },
        "excluded": state["excluded"],
        "content_fingerprint": content_fingerprint(published, tok.fingerprint, dtype.name),
    }


def summary(manifest: Manifest, seconds: float) -> str:
    """The closing report of a run: documents, tokens and skipped records per split."""
    d = manifest.data
    docs = sum(s["documents"] for s in d["splits"].values())
    tokens = sum(s["tokens"] for s in d["splits"].values())
    lines = [f"prepared {manifest.root}: {docs:,} documents, {tokens:,} tokens in {seconds:.1f} s"]
    for split, s in d["splits"].items():
        lines.append(
            f"  {split:<5} {s['documents']:>12,} documents {s['tokens']:>16,} tokens  {len(s['shards'])} shard(s)"
        )
    sk = d["skipped"]
    reasons = ", ".join(f"{r} {n:,}" for r, n in sk["by_reason"].items())
    lines.append(f"  skipped {sk['total']:,} record(s)" + (f": {reasons}" if reasons else ""))
    if d["settings"]["exclude"]:
        lines.append(f"  excluded {d['excluded']:,} record(s) by {', '.join(d['settings']['exclude'])}")
    return "\n".join(lines)
