"""Raw corpus inputs: find the files, cut them into work units, read each unit's documents.

Formats: JSON lines (`.jsonl`, `.ndjson`, `.json`), JSON arrays (`.json` starting with `[`),
plain text (`.txt`, one document per file), each optionally `.gz` or `.zst` compressed;
Parquet (`.parquet`) and `datasets.save_to_disk` folders. A document is the string in the
text field of a record; records matching an `--exclude KEY=VALUE` rule are left out (e.g.
TinyLlama drops SlimPajama's GitHub subset). JSON is read line by line here, so a bad record
is reported with its file and line; Parquet is read per row group with pyarrow and
save_to_disk folders through `datasets` (both imported only when such an input is given).
A JSON line longer than LONG_LINE bytes is parsed as it is read (`LongLine`): its text is
decoded a block at a time and handed on (`read`'s `consume`), so one huge document is never held
whole; what a record holds besides is checked with json.loads, so a bad line is named as a short
one is.

Work units are fixed slices of the inputs (about UNIT_BYTES of an uncompressed JSON-lines
file cut at line ends, one Parquet row group, a run of rows of a saved dataset, or a whole
compressed / text / JSON-array file). They depend only on the files, never on the number of
worker processes, so the documents of unit u are always the same.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from pretrain.errors import UserError

UNIT_BYTES = 2**21
LONG_LINE = 1 << 24  # a JSON line longer than this (bytes) is parsed as it is read (`LongLine`)
STREAM_BYTES = 1 << 20  # such a line is read this much at a time
COPY_CHARS = 1 << 16  # a long line's string values up to this long are checked by json.loads as they are
LINE_FORMATS = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = (".gz", ".zst")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


class Problem(NamedTuple):
    """A record (or whole file) that could not be used."""

    line: int | None  # 1-based line within the unit, for line-based units; else None
    where: str  # "row 12", "record 3" or "" (the whole file)
    reason: str  # category counted in the summary, e.g. "malformed JSON"
    detail: str


@dataclass(frozen=True)
class Unit:
    """A fixed slice of one input: bytes [start, stop) of a JSON-lines file, row groups or rows."""

    file: int
    kind: str  # "lines", "stream", "text", "parquet", "saved"
    start: int = 0
    stop: int = 0
    subset: str | None = None  # split name inside a saved DatasetDict
    size: int = 0  # input bytes, for progress


def _stem_and_compression(path: Path) -> tuple[str, str]:
    name = path.name.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return name, ""


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in SAVED_DATASET_FILES)


def is_supported(path: Path) -> bool:
    stem, _ = _stem_and_compression(path)
    return stem.endswith((*LINE_FORMATS, ".txt")) or path.name.lower().endswith(".parquet")


def expand(patterns: Sequence[str]) -> list[Path]:
    """Input files and saved datasets for glob patterns, files and folders, in a stable order."""
    found: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            if not matches:
                raise UserError(f"{pattern}: no file matches this pattern")
        else:
            path = Path(pattern)
            if not path.exists():
                raise UserError(f"{pattern}: no such file or directory")
            matches = [path]
        before = len(found)
        for path in matches:
            if is_saved_dataset(path):
                found.append(path)
            elif path.is_dir():
                found.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_supported(p)))
            elif is_supported(path):
                found.append(path)
        if len(found) == before:
            raise UserError(
                f"{pattern}: no supported input (.jsonl/.json/.txt, optionally .gz/.zst, .parquet, "
                "or a datasets.save_to_disk folder)"
            )
    return read_once(found)


def read_once(found: Sequence[Any]) -> list[Any]:
    """`found` without the paths reached twice (relative and absolute, a link, a folder and a file in
    it), said on stderr; what is not a Path (a Hub file) passes as is."""
    unique: dict[Any, Any] = {}
    for item in found:
        key = item.resolve() if isinstance(item, Path) else item
        first = unique.setdefault(key, item)
        if first is not item:
            print(f"{item} is the same input as {first}: read once", file=sys.stderr)
    return list(unique.values())


def _open_bytes(path: Path) -> io.BufferedIOBase:
    _, compression = _stem_and_compression(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames; a file that ends inside a frame
    (truncated) raises EOFError instead of looking like a shorter file."""

    def __init__(self, path: Path) -> None:
        self._chunks = self._decompressed(path)
        self._buffer = b""

    @staticmethod
    def _decompressed(path: Path) -> Iterator[bytes]:
        import zstandard

        context = zstandard.ZstdDecompressor()
        frame, inside = context.decompressobj(), False
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                while block:
                    yield frame.decompress(block)
                    inside = not frame.eof
                    block = frame.unused_data if frame.eof else b""
                    if frame.eof:
                        frame = context.decompressobj()
        if inside:
            raise EOFError("the file ends inside a compressed frame: it is truncated")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _starts_with_bracket(path: Path) -> bool:
    with _open_bytes(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


@lru_cache(maxsize=4)
def _load_saved(path: Path, subset: str | None) -> Any:
    import datasets

    data = datasets.load_from_disk(str(path))
    return data[subset] if subset is not None else data


def plan(paths: Sequence[Path], text_field: str) -> tuple[list[Unit], list[tuple[int, Problem]]]:
    """Work units of all inputs, and problems found already (empty files, missing columns)."""
    units: list[Unit] = []
    problems: list[tuple[int, Problem]] = []
    for i, path in enumerate(paths):
        if is_saved_dataset(path):
            import datasets

            data = _load_saved(path, None)
            subsets = sorted(data) if isinstance(data, datasets.DatasetDict) else [None]
            for subset in subsets:
                ds = data[subset] if subset is not None else data
                where = f"split {subset!r}" if subset is not None else ""
                if text_field not in ds.column_names:
                    detail = f"missing field {text_field!r} (columns: {', '.join(ds.column_names)})"
                    problems.append((i, Problem(None, where, "missing field", detail)))
                    continue
                if len(ds) == 0:
                    problems.append((i, Problem(None, where, "empty file", "no rows")))
                    continue
                nbytes = max(1, ds.data.nbytes)
                rows = max(1, len(ds) * UNIT_BYTES // nbytes)
                for start in range(0, len(ds), rows):
                    stop = min(len(ds), start + rows)
                    units.append(Unit(i, "saved", start, stop, subset, nbytes * (stop - start) // len(ds)))
            continue
        size = path.stat().st_size
        if size == 0:
            problems.append((i, Problem(None, "", "empty file", "empty file")))
            continue
        stem, compression = _stem_and_compression(path)
        if path.name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
                problems.append(
                    (i, Problem(None, "", "unreadable file", f"not a readable Parquet file: {err}"))
                )
                continue
            if meta.num_rows == 0:
                problems.append((i, Problem(None, "", "empty file", "no rows")))
            for g in range(meta.num_row_groups):
                units.append(Unit(i, "parquet", g, g + 1, size=meta.row_group(g).total_byte_size))
        elif stem.endswith(".txt"):
            units.append(Unit(i, "text", size=size))
        elif compression or (stem.endswith(".json") and _starts_with_bracket(path)):
            units.append(Unit(i, "stream", size=size))
        else:
            units.extend(Unit(i, "lines", a, b, size=b - a) for a, b in _line_ranges(path, size))
    return units, problems


def _line_ranges(path: Path, size: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of about UNIT_BYTES, each ending just after a newline (or at the end)."""
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(size, start + UNIT_BYTES))
            while (skipped := f.readline(STREAM_BYTES)) and not skipped.endswith(b"\n"):
                pass  # to the line's end, a block at a time (a line may be huge)
            stop = min(size, f.tell())
            yield start, stop
            start = stop


@dataclass(frozen=True)
class Fields:
    """Which field holds the text, and which records to leave out (`--exclude KEY=VALUE`)."""

    text: str = "text"
    exclude: tuple[str, ...] = ()  # "dotted.key=value": drop records whose value there equals it

    def __post_init__(self) -> None:
        self.rules  # noqa: B018 (parse now: a malformed rule is an error before any work)

    @cached_property
    def rules(self) -> list[tuple[list[str], str]]:
        """(key path, value) per rule; raises UserError on a malformed rule."""
        rules = []
        for rule in self.exclude:
            key, sep, value = rule.partition("=")
            if not sep or not key:
                raise UserError(
                    f"--exclude {rule!r}: expected KEY=VALUE, e.g. meta.redpajama_set_name=RedPajamaGithub"
                )
            rules.append((key.split("."), value))
        return rules

    def columns(self) -> list[str]:
        """Top-level fields a columnar reader must load."""
        return list(dict.fromkeys([self.text, *(keys[0] for keys, _ in self.rules)]))

    def excluded(self, record: dict) -> bool:
        for keys, value in self.rules:
            found: Any = record
            for key in keys:
                found = found.get(key, _MISSING) if isinstance(found, dict) else _MISSING
            if found is not _MISSING and (found if isinstance(found, str) else json.dumps(found)) == value:
                return True
        return False


_MISSING = object()


@dataclass
class Chunk:
    """What reading one unit gives: documents in order, skipped records, lines spanned."""

    texts: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0
    excluded: int = 0
    # long lines' documents as `consume` gave them: (number of `texts` before it, document)
    streamed: list[tuple[int, Any]] = field(default_factory=list)

    def take(self, record: Any, fields: Fields, line: int | None = None, where: str = "") -> None:
        """Keep the record's text, or note why not."""
        if not isinstance(record, dict):
            detail = f"expected a JSON object, got {type(record).__name__}"
            self.problems.append(Problem(line, where, "not an object", detail))
        elif fields.exclude and fields.excluded(record):
            self.excluded += 1
        elif fields.text not in record:
            detail = f"missing field {fields.text!r} (fields: {', '.join(list(record)[:8]) or 'none'})"
            self.problems.append(Problem(line, where, "missing field", detail))
        else:
            self.take_text(record[fields.text], fields.text, line, where)

    def take_text(self, text: Any, name: str, line: int | None = None, where: str = "") -> None:
        reason = detail = ""
        if text is None:
            reason, detail = "missing field", f"field {name!r} is null"
        elif not isinstance(text, str):
            reason, detail = "not a string", f"field {name!r} is {type(text).__name__}, not a string"
        elif not text:
            reason, detail = "empty text", f"field {name!r} is empty"
        elif not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                reason, detail = _lone_surrogate(name, err.start)
        if reason:
            self.problems.append(Problem(line, where, reason, detail))
        else:
            self.texts.append(text)

    def json_lines(
        self,
        readline: Callable[[int], bytes],
        fields: Fields,
        strip: bool = False,
        consume: Consumer | None = None,
    ) -> None:
        """The records of the lines `readline(limit)` gives (`strip`: without their line breaks). A line
        longer than LONG_LINE is parsed as it is read: `consume` reads its text (`LongLine`) and returns
        the document kept in `streamed` (default: the text, kept in `texts`)."""
        n = 0
        while raw := readline(LONG_LINE):
            n += 1
            self.lines = n
            if len(raw) == LONG_LINE and not raw.endswith(b"\n"):
                self.long_line(LongLine(_line_pieces(raw, readline, strip), fields, n), consume)
                continue
            if strip and raw.endswith(b"\n"):
                raw = raw[:-1]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                self.problems.append(_undecodable(n, err.start))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                self.problems.append(_malformed(n, err.msg, err.colno))
                continue
            self.take(record, fields, line=n)

    def long_line(self, line: LongLine, consume: Consumer | None) -> None:
        """Read a long line through `consume`, then keep its document or note why not."""
        document = consume(line) if consume is not None else _joined(line)
        line.finish()
        self.problems += line.result.problems
        self.excluded += line.result.excluded
        self.texts += line.result.texts
        if line.document is None:
            return
        if consume is None:
            self.texts.append(document)
        else:
            self.streamed.append((len(self.texts), document))

    def json_array(self, data: bytes, fields: Fields) -> None:
        try:
            records = json.loads(data)
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            self.problems.append(Problem(line, "", "undecodable bytes", f"invalid UTF-8 at byte {err.start}"))
            return
        except json.JSONDecodeError as err:
            self.problems.append(
                Problem(err.lineno, "", "malformed JSON", f"{err.msg} at column {err.colno}")
            )
            return
        for n, record in enumerate(records, 1):
            self.take(record, fields, where=f"record {n}")

    def text_file(self, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            self.problems.append(Problem(line, "", "undecodable bytes", f"invalid UTF-8 at byte {err.start}"))
            return
        if text:
            self.texts.append(text)
        else:
            self.problems.append(Problem(None, "", "empty file", "empty file"))

    def rows(self, columns: dict[str, list], first: int, fields: Fields, prefix: str = "") -> None:
        names = list(columns)
        for row, values in enumerate(zip(*columns.values(), strict=True), first):
            self.take(dict(zip(names, values, strict=True)), fields, where=f"{prefix}row {row}")


def _lone_surrogate(name: str, at: int) -> tuple[str, str]:
    return "undecodable bytes", f"field {name!r} holds a lone surrogate at character {at}"


def _undecodable(line: int, start: int) -> Problem:
    """Invalid UTF-8 `start` bytes into line `line`."""
    return Problem(line, "", "undecodable bytes", f"invalid UTF-8 at column {start + 1}")


def _malformed(line: int, message: str, column: int) -> Problem:
    return Problem(line, "", "malformed JSON", f"{message} at column {column}")


def _bounded(f: io.BufferedIOBase, size: int) -> Callable[[int], bytes]:
    """`f.readline`, reading at most `size` bytes in all."""
    left = size

    def readline(limit: int) -> bytes:
        nonlocal left
        raw = f.readline(min(limit, left))
        left -= len(raw)
        return raw

    return readline


def _line_pieces(head: bytes, readline: Callable[[int], bytes], strip: bool) -> Iterator[bytes]:
    """A long line's bytes, STREAM_BYTES at a time: `head`, then the rest of the line from `readline`
    (`strip`: without its line break)."""
    piece = head
    while piece:
        last = piece.endswith(b"\n")
        if last and strip:
            piece = piece[:-1]
        for start in range(0, len(piece), STREAM_BYTES):
            yield piece[start : start + STREAM_BYTES]
        if last:
            return
        piece = readline(STREAM_BYTES)


Consumer = Callable[["LongLine"], Any]  # reads a long line's texts, returns the document to keep

_WHITESPACE = " \t\n\r"  # JSON's
_TOKEN = re.compile(r'[ \t\n\r]+|[{}\[\],:]|[^"{}\[\],: \t\n\r]+')  # outside strings
_RAW_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"')
# The valid start of a string's content. It stops before an escape whose meaning the next characters
# decide: a high surrogate \uD8xx with fewer than 6 characters after it (it may begin a pair).
_VALID = re.compile(
    r'[^"\\\x00-\x1f]*(?:(?:\\["\\/bfnrt]|\\u(?![dD][89abAB])[0-9a-fA-F]{4}'
    r'|\\u[dD][89abAB][0-9a-fA-F]{2}(?=[^\\]|\\[^u]|\\u[\s\S]{4}))[^"\\\x00-\x1f]*)*'
)
_ESCAPE_CHARS = 12  # a pair of \uXXXX escapes
_WINDOW = 16  # the characters at a bad place in a string that decide json's message for it


class StreamedText:
    """A string value of a `LongLine`, decoded a block at a time as the line is read; a text value
    is hashed as it passes (blake2b of its UTF-8, as `prepare.is_val` hashes a document)."""

    def __init__(self, text: bool, head: int) -> None:
        self.chars = 0
        self.surrogate: int | None = None  # character index of the first lone surrogate of a text
        self.digest = hashlib.blake2b(digest_size=8)
        self.chunks: Iterator[str] = iter(())
        self._text = text
        self._head: list[str] = []
        self._head_chars = head

    def add(self, chunk: str) -> None:
        """Count (and hash) the next decoded characters; keep the head's."""
        if self._head_chars > 0:
            self._head.append(chunk[: self._head_chars])
            self._head_chars -= len(self._head[-1])
        if self._text and self.surrogate is None:
            try:
                self.digest.update(chunk.encode("utf-8"))
            except UnicodeEncodeError as err:
                self.surrogate = self.chars + err.start
        self.chars += len(chunk)

    def head(self) -> str:
        return "".join(self._head)

    def blocks(self) -> Iterator[str]:
        """The characters, a block at a time as the line is read; they stop before a lone surrogate
        (no usable document)."""
        for chunk in self.chunks:
            if self.surrogate is not None:
                return
            yield chunk


class LongLine:
    """One JSON line too long to hold, parsed as it is read. Each string value of the record's text
    field is decoded a block at a time (`values`: the last one is the document). Everything else is
    kept as a skeleton, each string over COPY_CHARS replaced by its head (long enough for every
    `--exclude` rule), or, at a bad place in a string, cut after the few characters there; at the
    end json.loads checks the skeleton, so a problem is named (and located) as for a short line.
    After `finish`: `result` holds the problems and exclusions, `document` the accepted text."""

    def __init__(self, pieces: Iterator[bytes], fields: Fields, number: int) -> None:
        self.fields, self.number = fields, number
        self.result = Chunk()
        self.document: StreamedText | None = None
        self._bytes = pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._read = 0  # bytes decoded
        self._chars = 0  # characters decoded
        self._last = ""  # the last character decoded
        self._ended = False
        self._bad: int | None = None  # byte offset of invalid UTF-8
        self.buf, self.pos, self.base = "", 0, 0  # characters read, the parse position, buf[0]'s in the line
        self._skeleton: list[str] = []
        self._skeleton_chars = 0
        self._spans: list[tuple[int, int, int, int]] = []  # replaced strings: skeleton start, end, line's
        self._cut: tuple[int, int, int] | None = None  # skeleton quote, line quote, line start of the rest
        self._depth, self._object, self._state = 0, False, ""  # nesting, in a top-level object, what is next
        self._key: str | None = None  # the last top-level key
        self._head = max((len(value) for _, value in fields.rules), default=-1) + 1
        self._values = self._parse()

    def values(self) -> Iterator[StreamedText]:
        """The string values of the text field, as the parse reaches them (read each one's `blocks`)."""
        return self._values

    def finish(self) -> None:
        """Read the rest of the line and decide."""
        for _ in self._values:
            pass

    def _fill(self) -> bool:
        """Add the line's next characters to `buf` (dropping those parsed); False at the line's end or
        at invalid UTF-8 (whose offset is kept)."""
        while not self._ended:
            piece = next(self._bytes, None)
            pending = len(self._decoder.getstate()[0])
            try:
                text = self._decoder.decode(piece or b"", final=piece is None)
            except UnicodeDecodeError as err:
                self._bad, self._ended = self._read - pending + err.start, True
                for _ in self._bytes:  # the rest of the line
                    pass
                return False
            self._ended = piece is None
            self._read += len(piece or b"")
            if text:
                self._chars += len(text)
                self._last = text[-1]
                self.buf, self.base, self.pos = self.buf[self.pos :] + text, self.base + self.pos, 0
                return True
        return False

    def _copy(self, text: str) -> None:
        self._skeleton.append(text)
        self._skeleton_chars += len(text)

    def _parse(self) -> Iterator[StreamedText]:
        while self._cut is None and (self.pos < len(self.buf) or self._fill()):
            if self.buf[self.pos] == '"':
                yield from self._string_token()
            else:
                self._structure()
        while self._fill():  # after a cut: the rest is only checked for UTF-8
            self.buf, self.pos = "", 0
        self._check()

    def _structure(self) -> None:
        """Copy the next token outside strings, following where keys and values are."""
        token = _TOKEN.match(self.buf, self.pos)
        assert token is not None  # every character but a quote starts a token
        c = token.group()[0]
        if c in "{[":
            self._depth += 1
            self._object = self._object if self._depth > 1 else c == "{"
            self._state = "key" if self._depth == 1 and self._object else ""
        elif c == ",":
            self._state = "key" if self._depth == 1 and self._object else ""
        elif c == ":":
            self._state = "value" if self._state == "colon" else ""
        elif c in "}]":
            self._depth -= 1
            self._state = ""
        elif c not in _WHITESPACE:
            self._state = ""
        self._copy(token.group())
        self.pos = token.end()

    def _string_token(self) -> Iterator[StreamedText]:
        top = self._depth == 1 and self._object
        if top and self._state == "key":
            self._key, self._state = self._key_token(), "colon"
            if self._key == self.fields.text:
                self.document = None  # a later value of the field replaces an earlier one
            return
        is_text = top and self._state == "value" and self._key == self.fields.text
        self._state = ""
        if not is_text and (raw := _RAW_STRING.match(self.buf, self.pos, self.pos + COPY_CHARS)):
            self._copy(raw.group())
            self.pos = raw.end()
            return
        value = StreamedText(is_text, self._head)
        value.chunks = self._string(value)
        if is_text:
            yield value
        for _ in value.chunks:
            pass
        if is_text and self._cut is None:
            self.document = value

    def _key_token(self) -> str | None:
        """Copy a key; its value (None if it is not valid JSON)."""
        while not (raw := _RAW_STRING.match(self.buf, self.pos)):
            if not self._fill():  # the line ends inside the key
                self._copy(self.buf[self.pos :])
                self.pos = len(self.buf)
                return None
        self._copy(raw.group())
        self.pos = raw.end()
        try:
            return json.loads(raw.group())
        except json.JSONDecodeError:
            return None

    def _string(self, value: StreamedText) -> Iterator[str]:
        """Decode the string at `pos` a block at a time into `value`; copy its head to the skeleton,
        or, where it is malformed or ends early, cut the skeleton after the characters there."""
        quote = self.base + self.pos
        self.pos += 1
        while True:
            valid = _VALID.match(self.buf, self.pos)
            assert valid is not None  # it matches "" at least
            end = valid.end()
            if end > self.pos:
                chunk = self.buf[self.pos : end]
                self.pos = end
                chunk = json.loads(f'"{chunk}"') if "\\" in chunk else chunk
                value.add(chunk)
                yield chunk
            if self.pos < len(self.buf) and self.buf[self.pos] == '"':
                self.pos += 1
                start = self._skeleton_chars
                self._copy(json.dumps(value.head()))
                self._spans.append((start, self._skeleton_chars, quote, self.base + self.pos))
                return
            waits = len(self.buf) - self.pos < _ESCAPE_CHARS and self.buf[self.pos :].startswith("\\")
            if not ((self.pos == len(self.buf) or waits) and self._fill()):
                break
        while len(self.buf) - self.pos < _WINDOW and self._fill():
            pass
        self._cut = (self._skeleton_chars, quote, self.base + self.pos)
        self._copy('"' + self.buf[self.pos : self.pos + _WINDOW])

    def _original(self, at: int) -> int:
        """The character offset in the line of offset `at` in the skeleton."""
        if self._cut is not None and at >= self._cut[0]:
            skeleton, quote, rest = self._cut
            return quote if at == skeleton else rest + at - skeleton - 1
        for start, end, line_start, line_end in reversed(self._spans):
            if at >= end:
                return line_end + at - end
            if at >= start:
                return line_start
        return at

    def _check(self) -> None:
        """Decide the record as `Chunk.json_lines` decides a short line."""
        n, fields, result, document = self.number, self.fields, self.result, self.document
        self.document = None
        if self._bad is not None:
            result.problems.append(_undecodable(n, self._bad))
            return
        skeleton = "".join(self._skeleton)
        self._skeleton = []
        if not (self._spans or self._cut or skeleton.strip(_WHITESPACE + "\x0b\x0c")):
            return  # a blank line
        try:
            record = json.loads(skeleton)
        except json.JSONDecodeError as err:
            at = self._original(err.pos)
            result.problems.append(
                _malformed(n, err.msg, 1 if at == self._chars and self._last == "\n" else at + 1)
            )
            return
        if document is None:
            result.take(record, fields, line=n)
        elif fields.exclude and fields.excluded(record):
            result.excluded += 1
        elif not document.chars:
            result.take_text("", fields.text, line=n)
        elif document.surrogate is not None:
            result.problems.append(Problem(n, "", *_lone_surrogate(fields.text, document.surrogate)))
        else:
            self.document = document


def _joined(line: LongLine) -> str:
    """A long line's text, whole (for readers that keep documents as strings)."""
    text = ""
    for value in line.values():
        text = "".join(value.blocks())
    return text


def read(path: Path, unit: Unit, fields: Fields, consume: Consumer | None = None) -> Chunk:
    """The documents of `unit`, in order, and the records left out. The document of a JSON line longer
    than LONG_LINE is what `consume` makes of it while it is read (`Chunk.json_lines`)."""
    chunk = Chunk()
    if unit.kind == "lines":
        with open(path, "rb") as f:
            f.seek(unit.start)
            chunk.json_lines(_bounded(f, unit.stop - unit.start), fields, strip=True, consume=consume)
            f.seek(unit.stop - 1)
            chunk.lines -= f.read(1) != b"\n"  # line breaks: the last line may have none
    elif unit.kind in ("stream", "text"):
        try:
            with _open_bytes(path) as f:
                if unit.kind == "text":
                    chunk.text_file(f.read())
                elif _stem_and_compression(path)[0].endswith(".json") and _starts_with_bracket(path):
                    chunk.json_array(f.read(), fields)
                else:
                    chunk.json_lines(f.readline, fields, consume=consume)
        except _decompress_errors() as err:
            chunk.problems.append(Problem(None, "", "unreadable file", f"cannot decompress: {err}"))
        if unit.kind == "stream" and not (chunk.texts or chunk.problems or chunk.excluded):
            chunk.problems.append(Problem(None, "", "empty file", "empty file (no records)"))
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        present = file.schema_arrow.names
        if fields.text not in present:
            detail = f"missing field {fields.text!r} (columns: {', '.join(present)})"
            chunk.problems.append(Problem(None, f"row group {unit.start}", "missing field", detail))
        else:
            columns = [c for c in fields.columns() if c in present]
            table = file.read_row_group(unit.start, columns=columns)
            first = sum(file.metadata.row_group(g).num_rows for g in range(unit.start))
            chunk.rows(table.to_pydict(), first, fields)
    else:
        ds = _load_saved(path, unit.subset)
        columns = [c for c in fields.columns() if c in ds.column_names]
        prefix = f"split {unit.subset!r} " if unit.subset is not None else ""
        chunk.rows(ds.select_columns(columns)[unit.start : unit.stop], unit.start, fields, prefix)
    return chunk


def documents(
    paths: Sequence[Path],
    fields: Fields,
    left_out: list[str] | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[str]:
    """Every usable document of the inputs, in order; the records left out are described in
    `left_out`, naming each input by `names` (default: its path)."""
    units, early = plan(paths, fields.text)
    named = list(names) if names is not None else [str(p) for p in paths]
    if left_out is not None:
        left_out += [describe_problem(named[i], problem, 0) for i, problem in early]
    for unit in units:
        chunk = read(paths[unit.file], unit, fields)
        if left_out is not None:
            left_out += [describe_problem(named[unit.file], problem, 0) for problem in chunk.problems]
        yield from chunk.texts


def input_record(path: Path) -> dict:
    """How the manifest lists an input."""
    if path.is_dir():
        return {
            "path": str(path),
            "bytes": sum(p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()),
        }
    return {"path": str(path), "bytes": path.stat().st_size}


def describe_problem(path: Path | str, problem: Problem, line_base: int) -> str:
    """`file:line: detail`, `file: row N: detail` or `file: detail`."""
    if problem.line is not None:
        return f"{path}:{line_base + problem.line}: {problem.detail}"
    if problem.where:
        return f"{path}: {problem.where}: {problem.detail}"
    return f"{path}: {problem.detail}"


def modified(path: Path) -> int:
    """A change stamp for resume checks (newest mtime inside a folder)."""
    if path.is_dir():
        return max((p.stat().st_mtime_ns for p in path.rglob("*")), default=0)
    return os.stat(path).st_mtime_ns
