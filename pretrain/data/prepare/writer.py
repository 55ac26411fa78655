"""The shard writer of `pretrain data prepare`: documents appended in unit order to each split's open
shard, committed, then published.

A shard is cut before the document that would overflow `shard_tokens`, which depends only on the
document sequence: the output is the same byte for byte whatever `--num-proc` is. About once a second
(between units) the open shards' temporary files are fsynced and the state is replaced atomically
(`DatasetWriter.commit`); shards closed since then are published: sidecar written, `.bin.tmp` renamed
to `.bin`. Reopened after a kill, the temporary files are cut to the committed sizes and publishing is
finished; a shard file the state counts on that is gone, or a damaged sidecar, raises `Damaged`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pretrain.data.prepare.inputs import Problem, Unit
from pretrain.data.prepare.state import OUR_FILE, STATE_DIR
from pretrain.data.prepare.worker import Part, Spill, UnitResult
from pretrain.data.shards import SPLITS, read_sidecar, sha256_file, shard_name
from pretrain.errors import UserError
from pretrain.files import write_json_atomic

COPY_BYTES = 1 << 20  # a spill file is copied into a shard this much at a time
EXAMPLES = 20  # skipped records listed in the manifest


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
            shutil.copyfileobj(f, files[0], COPY_BYTES)
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


class DatasetWriter:
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
