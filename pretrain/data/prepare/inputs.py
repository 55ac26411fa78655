"""Raw corpus inputs: find the files, cut them into work units, read each unit's documents.

Formats: JSON lines (`.jsonl`, `.ndjson`, `.json`), JSON arrays (`.json` starting with `[`),
plain text (`.txt`, one document per file), each optionally `.gz` or `.zst` compressed;
Parquet (`.parquet`) and `datasets.save_to_disk` folders. A document is the string in the
text field of a record; records matching an `--exclude KEY=VALUE` rule are left out (e.g.
TinyLlama drops SlimPajama's GitHub subset). JSON is read line by line here, so a bad record
is reported with its file and line; Parquet is read per row group with pyarrow and
save_to_disk folders through `datasets` (both imported only when such an input is given).

Work units are fixed slices of the inputs (about UNIT_BYTES of an uncompressed JSON-lines
file cut at line ends, one Parquet row group, a run of rows of a saved dataset, or a whole
compressed / text / JSON-array file). They depend only on the files, never on the number of
worker processes, so the documents of unit u are always the same.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from pretrain.errors import UserError

UNIT_BYTES = 2**21
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
            f.readline()
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
                reason, detail = (
                    "undecodable bytes",
                    f"field {name!r} holds a lone surrogate at character {err.start}",
                )
        if reason:
            self.problems.append(Problem(line, where, reason, detail))
        else:
            self.texts.append(text)

    def json_lines(self, lines: Iterable[bytes], fields: Fields) -> None:
        for n, raw in enumerate(lines, 1):
            self.lines = n
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                self.problems.append(
                    Problem(n, "", "undecodable bytes", f"invalid UTF-8 at column {err.start + 1}")
                )
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                self.problems.append(Problem(n, "", "malformed JSON", f"{err.msg} at column {err.colno}"))
                continue
            self.take(record, fields, line=n)

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


def read(path: Path, unit: Unit, fields: Fields) -> Chunk:
    """The documents of `unit`, in order, and the records left out."""
    chunk = Chunk()
    if unit.kind == "lines":
        with open(path, "rb") as f:
            f.seek(unit.start)
            data = f.read(unit.stop - unit.start)
        chunk.json_lines(data.split(b"\n"), fields)
        chunk.lines = data.count(b"\n")
    elif unit.kind in ("stream", "text"):
        try:
            with _open_bytes(path) as f:
                if unit.kind == "text":
                    chunk.text_file(f.read())
                elif _stem_and_compression(path)[0].endswith(".json") and _starts_with_bracket(path):
                    chunk.json_array(f.read(), fields)
                else:
                    chunk.json_lines(f, fields)
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
