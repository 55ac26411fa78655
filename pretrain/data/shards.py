"""The on-disk token shard format: flat token files, a JSON sidecar each, one manifest per dataset.

A prepared dataset directory holds::

    manifest.json               written last: a dataset is complete iff this exists
    tokenizer.json              the tokenizer the tokens came from
    train/shard_00000.bin       raw little-endian tokens (uint16 if vocab < 65536, else uint32)
    train/shard_00000.json      sidecar: dtype, tokens, documents, doc_offsets (where each
                                document starts), eos_id, bos_id, tokenizer fingerprint, sha256
    val/shard_00000.bin ...

Every document ends with EOS (and starts with BOS when asked). Files are published
atomically (written aside, fsynced, renamed), so a reader never sees a partial file; the
reader only trusts shards the manifest lists and checks each file's size against it.

A manifest or sidecar damaged after the fact (empty, truncated, not UTF-8, not JSON, or JSON of
another shape: `42`, `[]`, a field missing or of the wrong type) is refused in one line naming
the file and the field (`load_manifest`, `describe`, `read_sidecar`), never read half-way.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.errors import UserError
from pretrain.files import read_json

FORMAT = "pretrain-tokens/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype holding ids < vocab_size."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32).newbyteorder("<")


def shard_name(split: str, index: int) -> str:
    """Relative path of a split's index-th shard, without extension."""
    return f"{split}/shard_{index:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_fingerprint(splits: dict[str, list[dict]], tokenizer_fingerprint: str, dtype: str) -> str:
    """Hash of everything a reader sees: tokenizer, dtype and every shard's bytes, in order."""
    h = hashlib.sha256(f"{FORMAT}\n{tokenizer_fingerprint}\n{dtype}\n".encode())
    for split in SPLITS:
        for shard in splits.get(split, []):
            h.update(f"{split} {shard['file']} {shard['tokens']} {shard['sha256']}\n".encode())
    return h.hexdigest()


def field(data: Any, dotted: str, kinds: type | tuple[type, ...]) -> Any:
    """`data`'s value at a dotted path (`splits.train.shards.0.tokens`: a number indexes a list), of
    one of `kinds` (a bool is no int); ValueError naming the field when it is missing or mistyped."""
    value = data
    for key in dotted.split("."):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            raise ValueError(f"field {dotted!r} is missing")
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        expected = " or ".join(map(_json_type_name, allowed))
        raise ValueError(f"field {dotted!r} is a JSON {_json_type(value)}, not {expected}")
    return value


def as_object(value: Any) -> dict:
    """`value` if it is a JSON object; ValueError naming what it is instead (`42`, `[]`)."""
    if value is None:
        raise ValueError("missing, or a JSON null")
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {_json_type(value)}, not an object")
    return value


def _json_type(value: Any) -> str:
    return _json_type_name(type(value))


def _json_type_name(kind: type) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if kind is type(None) else names.get(kind, kind.__name__)


def read_sidecar(path: Path, itemsize: int) -> dict:
    """A published shard's sidecar, checked against its `.bin` (size); ValueError saying what is wrong."""
    data = as_object(read_json(path))
    tokens = field(data, "tokens", int)
    documents = field(data, "documents", int)
    field(data, "sha256", str)
    offsets = field(data, "doc_offsets", list)
    if len(offsets) != documents:
        raise ValueError(f"{len(offsets)} document offsets for {documents} documents")
    size = path.with_suffix(".bin").stat().st_size
    if size != tokens * itemsize:
        raise ValueError(f"it counts {tokens} tokens, but {path.with_suffix('.bin').name} holds {size} bytes")
    return data


def _check_manifest(data: Any) -> None:
    """The fields every reader of a manifest relies on; ValueError naming the first one wrong."""
    if as_object(data).get("format") != FORMAT:
        raise ValueError(f"field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
    if field(data, "dtype", str) not in DTYPES:
        raise ValueError(f"field 'dtype' is {data['dtype']!r}, not one of {', '.join(DTYPES)}")
    field(data, "tokenizer.fingerprint", str)
    field(data, "tokenizer.vocab_size", int)
    field(data, "tokenizer.eos_id", int)
    field(data, "settings", dict)
    field(data, "content_fingerprint", str)
    for split in SPLITS:
        field(data, f"splits.{split}.documents", int)
        field(data, f"splits.{split}.tokens", int)
        for i, entry in enumerate(field(data, f"splits.{split}.shards", list)):
            name = field(data, f"splits.{split}.shards.{i}.file", str)
            if not re.fullmatch(rf"{split}/shard_\d+\.bin", name):
                raise ValueError(
                    f"field 'splits.{split}.shards.{i}.file' is {name!r}, not {split}/shard_NNNNN.bin"
                )
            if field(data, f"splits.{split}.shards.{i}.tokens", int) < 0:
                raise ValueError(f"field 'splits.{split}.shards.{i}.tokens' is negative")
            if "sha256" in entry:
                field(data, f"splits.{split}.shards.{i}.sha256", str)


def _damaged_manifest(path: Path, why: str) -> UserError:
    return UserError(
        f"{path}: damaged manifest ({why}); delete it and prepare the dataset again "
        "(`pretrain data prepare ... --overwrite`)"
    )


@dataclass(frozen=True)
class Shard:
    """One token file of a split, as listed in the manifest."""

    path: Path
    tokens: int
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A complete prepared dataset, read from `DIR/manifest.json` and checked against the files."""

    root: Path
    data: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"]).newbyteorder("<")

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.data["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.data["tokenizer"]["eos_id"]

    @property
    def fingerprint(self) -> str:
        """Content fingerprint: changes whenever any token a reader could see changes."""
        return self.data["content_fingerprint"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER

    def shards(self, split: str) -> list[Shard]:
        entries = self.data["splits"].get(split, {}).get("shards", [])
        return [Shard(self.root / e["file"], e["tokens"], e.get("sha256")) for e in entries]

    def tokens(self, split: str) -> int:
        return self.data["splits"].get(split, {}).get("tokens", 0)


def load_manifest(root: str | os.PathLike) -> Manifest:
    """Open a prepared dataset; refuse one that is incomplete or whose shards do not match."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        recipe = root.resolve().parent / "prepare.py"  # data/<corpus>/out of a recipe in this clone
        if (root / ".prepare").exists():
            hint = " (preparation unfinished: run `pretrain data prepare` again)"
        elif root.name == "out" and recipe.is_file():
            hint = f" (prepare it with: python {recipe})"
        else:
            hint = " (prepare it with `pretrain data prepare ... --output DIR`, or a recipe in data/)"
        raise UserError(f"{path}: no such file: {root} is not a prepared dataset{hint}")
    try:
        data = read_json(path)
        _check_manifest(data)
    except OSError as err:
        raise UserError(f"{path}: unreadable manifest: {err.strerror}") from None
    except ValueError as err:
        raise _damaged_manifest(path, str(err)) from None
    manifest = Manifest(root, data)
    itemsize = manifest.dtype.itemsize
    for split in SPLITS:
        for shard in manifest.shards(split):
            size = shard.path.stat().st_size if shard.path.is_file() else None
            if size != shard.tokens * itemsize:
                found = "missing" if size is None else f"{size} bytes"
                raise UserError(
                    f"{shard.path}: {found}, but {path} lists {shard.tokens} tokens "
                    f"({shard.tokens * itemsize} bytes): the dataset is damaged; prepare it again"
                )
    return manifest


def read_tokens(manifest: Manifest, shard: str, offset: int, count: int) -> np.ndarray:
    """`count` tokens from `offset` of one shard the manifest lists (`pretrain data show`)."""
    files = {
        str(s.path.relative_to(manifest.root)): s.tokens
        for split in ("train", "val")
        for s in manifest.shards(split)
    }
    if shard not in files:
        known = ", ".join(sorted(files)[:3]) + (", ..." if len(files) > 3 else "")
        raise UserError(f"--shard {shard}: not a shard of {manifest.root} (its shards: {known})")
    size = int(files[shard])
    if not 0 <= offset < size or count < 1:
        raise UserError(
            f"--offset {offset} --tokens {count}: {shard} holds tokens [0, {size:,}); give 0 <= offset < {size:,}, tokens >= 1"
        )
    tokens = np.memmap(manifest.root / shard, dtype=manifest.dtype, mode="r")
    return np.array(tokens[offset : min(offset + count, size)])


def describe(manifest: Manifest) -> str:
    """The manifest in human form (`pretrain data info`)."""
    d = manifest.data
    try:
        _check_description(d)
    except ValueError as err:
        raise _damaged_manifest(manifest.root / MANIFEST, str(err)) from None
    tok = d["tokenizer"]
    s = d["settings"]
    lines = [
        f"dataset      {manifest.root}",
        f"format       {d['format']}  dtype {d['dtype']}",
        f"tokenizer    vocab {tok['vocab_size']:,}  eos {tok['eos_id']}  bos {tok['bos_id']}  "
        f"fingerprint {tok['fingerprint'][:16]}" + (f"  from {tok['source']}" if tok.get("source") else ""),
        f"content      fingerprint {d['content_fingerprint'][:16]}",
        f"settings     text field {s['text_field']!r}  val fraction {s['val_fraction']}  "
        f"shard tokens {s['shard_tokens']:,}  bos {'yes' if s['bos'] else 'no'}",
        f"inputs       {len(d['inputs'])} file(s), {sum(i['bytes'] for i in d['inputs']):,} bytes",
    ]
    hub_inputs: dict[tuple[str, str, str], int] = {}
    for record in d["inputs"]:
        if "repo" in record:  # a Hub dataset's file, read at an exact revision
            key = (record["input"], record["repo"], record["revision"])
            hub_inputs[key] = hub_inputs.get(key, 0) + 1
    for (given, repo, revision), files in hub_inputs.items():
        lines.append(f"  hub        {given}: {repo} at revision {revision}, {files} file(s)")
    for split in SPLITS:
        sp = d["splits"][split]
        lines.append(
            f"{split:<12} {sp['documents']:,} documents  {sp['tokens']:,} tokens  {len(sp['shards'])} shard(s)"
        )
    sk = d["skipped"]
    lines.append(f"skipped      {sk['total']:,} record(s)")
    lines += [f"  {reason}: {n:,}" for reason, n in sorted(sk["by_reason"].items())]
    lines += [f"  e.g. {example}" for example in sk["examples"]]
    if s["exclude"]:
        lines.append(f"excluded     {d['excluded']:,} record(s) by {', '.join(s['exclude'])}")
    return "\n".join(lines)


def _check_description(data: dict) -> None:
    """The fields `describe` shows beyond those `load_manifest` checks."""
    field(data, "tokenizer.bos_id", (int, type(None)))
    for name, kinds in (
        ("text_field", str),
        ("val_fraction", (int, float)),
        ("shard_tokens", int),
        ("bos", bool),
    ):
        field(data, f"settings.{name}", kinds)
    if field(data, "settings.exclude", list):
        field(data, "excluded", int)
    for i, record in enumerate(field(data, "inputs", list)):
        field(data, f"inputs.{i}.bytes", int)
        if "repo" in record:
            for name in ("input", "repo", "revision"):
                field(data, f"inputs.{i}.{name}", str)
    field(data, "skipped.total", int)
    for reason, count in field(data, "skipped.by_reason", dict).items():
        if not isinstance(count, int) or isinstance(count, bool):
            raise ValueError(f"field 'skipped.by_reason' counts {reason!r} as {count!r}, not an integer")
    field(data, "skipped.examples", list)
