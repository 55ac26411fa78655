"""The worker side of `pretrain data prepare`: a process pool that reads and tokenizes work units.

Each worker is single-threaded (`encode_batch_fast`); `processed` yields the units' results in unit
order. Each document goes to validation iff a hash of its text falls below `val_fraction` (`is_val`),
so the split does not depend on the order or the worker count.

Memory: a long document is tokenized a piece at a time, and once its ids pass SPILL_TOKENS the
worker writes them to a spill file (`.prepare/spill/`) that the writer copies into the shard, so
no process holds a huge document's ids; a text file is read, hashed and tokenized a block at a
time, so its length costs nothing, and so is a JSON line longer than `inputs.LONG_LINE`, its text
decoded and tokenized as the line is read (`inputs.LongLine`, `benchmarks/prepare_memory.py`).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import hashlib
import itertools
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from pretrain.data.prepare import inputs
from pretrain.data.prepare.inputs import Problem, Unit
from pretrain.data.prepare.settings import Settings
from pretrain.data.prepare.units import END, UnitSource
from pretrain.data.shards import SPLITS

PIECE_CHARS = 1 << 20  # longer documents are tokenized a piece at a time (`_encode`)
SPILL_TOKENS = 1 << 22  # a document with more tokens goes to a shard through a spill file (`_Sink`)
READ_BYTES = 1 << 20  # a text file is read this much at a time (`_TextFile`)
HASH_CHARS = 1 << 22  # a document is hashed this many characters at a time (`is_val`)


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
def serial_tokenizers() -> Iterator[None]:
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


def processed(
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
