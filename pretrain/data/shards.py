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
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.errors import UserError

FORMAT = "pretrain-tokens/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype holding ids < vocab_size."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32).newbyteorder("<")


def shard_name(split: str, index: int) -> str:
    """Relative path of a split's index-th shard, without extension."""
    return f"{split}/shard_{index:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def content_fingerprint(splits: dict[str, list[dict]], tokenizer_fingerprint: str, dtype: str) -> str:
    """Hash of everything a reader sees: tokenizer, dtype and every shard's bytes, in order."""
    h = hashlib.sha256(f"{FORMAT}\n{tokenizer_fingerprint}\n{dtype}\n".encode())
    for split in SPLITS:
        for shard in splits.get(split, []):
            h.update(f"{split} {shard['file']} {shard['tokens']} {shard['sha256']}\n".encode())
    return h.hexdigest()


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
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable manifest: {err}") from None
    if data.get("format") != FORMAT:
        raise UserError(f"{path}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
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
