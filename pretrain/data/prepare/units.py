"""The work units of a preparation's inputs, local files and Hub files alike, in one order.

A local input is cut into units up front (`inputs.plan`). A Hub file (`pretrain.data.prepare.hub`) is
cut the same way once the cache has fetched it, so its units are those of the same file given
locally, and the unit sequence, hence the output, does not depend on where the bytes came from.
How many units a Hub file has is kept in the preparation's state once known, so a resumed run
skips the files it finished without fetching them again.

A file copied from a local mirror (`hf:///path`) is also stamped in the state when first read
(its mtime and the sha256 of its bytes). A resumed run checks that every file it read before
still holds those bytes: by mtime, and by content where the mtime moved (a file restored from
a backup resumes; a file rewritten with other bytes is refused in one line). The commit each Hub
input was read at is kept too: a rerun reads that commit again even if the branch moved since
(`recorded_revisions`), so "run the same command again to resume" holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pretrain.data.prepare import inputs
from pretrain.data.prepare.hub import Cache, RemoteFile
from pretrain.data.prepare.inputs import Problem, Unit
from pretrain.data.shards import sha256_file
from pretrain.errors import UserError

Source = Path | RemoteFile
END = Unit(-1, "end")  # `UnitSource.next`: no unit left


class UnitSource:
    """Units of all inputs in order, from a start index (`next`), with the cache behind Hub files."""

    def __init__(self, sources: list[Source], text_field: str) -> None:
        self.sources, self.text_field = sources, text_field
        self.cache: Cache | None = None
        self.names = [s.name if isinstance(s, RemoteFile) else str(s) for s in sources]
        self.file_units: dict[str, int] = {}  # units per Hub file planned so far (kept in the state)
        self.file_stamps: dict[str, list] = {}  # a mirror file's [mtime_ns, sha256] when read (state)
        self.units: dict[int, list[Unit]] = {}
        self.early: list[tuple[int, Problem]] = []  # problems found while planning local inputs
        self.found: list[tuple[int, Problem]] = []  # ... and Hub files planned for the first time
        for i, source in enumerate(sources):
            if isinstance(source, Path):
                planned, early = inputs.plan([source], text_field)
                self.units[i] = [dataclasses.replace(u, file=i) for u in planned]
                self.early += [(i, problem) for _, problem in early]
        self.ranges: dict[int, tuple[int, int]] = {}  # input -> [first, end) global unit indices
        self._input = self._within = self._base = 0

    def read_paths(self) -> list[Path]:
        """Where each input's bytes are read (a Hub file: its place in the cache)."""
        return [s if isinstance(s, Path) else self._cache().local_path(i) for i, s in enumerate(self.sources)]

    def total_bytes(self) -> int:
        return sum(self._size(i) for i in range(len(self.sources)))

    @property
    def remote(self) -> dict[int, RemoteFile]:
        return {i: s for i, s in enumerate(self.sources) if isinstance(s, RemoteFile)}

    def start(self, state: dict, cache: Cache | None) -> int:
        """Position at the state's next unit (files wholly before it are skipped, not fetched); the
        input bytes skipped (progress)."""
        self.cache = cache
        self.file_units = state.setdefault("file_units", {})
        self.file_stamps = state.setdefault("file_stamps", {})
        state.setdefault(
            "revisions", {s.spec: s.revision for s in self.remote.values() if s.source != "copy"}
        )
        done, skipped = state["units_done"], 0
        for i in range(len(self.sources)):
            count = self._count(i)
            if count is None or self._base + count > done:
                break
            self.ranges[i] = (self._base, self._base + count)
            self._base += count
            skipped += self._size(i)
            self._input = i + 1
        self._within = done - self._base
        for i in range(self._input):
            self._check_unchanged(i)
        return skipped

    def fetch(self) -> None:
        """Start fetching the Hub files from the current one on (after the worker processes are
        forked: a fork never copies the fetch thread's locks)."""
        if self.cache is not None:
            self.cache.start(self._input)

    def next(self, block: bool, idle: Callable[[], None]) -> Unit | None:
        """The next unit; None when it needs a file not fetched yet and `block` is False; END when
        every unit was given. `idle()` runs before waiting for a file."""
        while self._input < len(self.sources):
            units = self._units_of(self._input, block, idle)
            if units is None:
                return None
            if self._within < len(units):
                self._within += 1
                return units[self._within - 1]
            self._base += len(units)
            self._input, self._within = self._input + 1, 0
        return END

    def release_committed(self, done: int) -> None:
        """Remove the cached files whose units are all committed (`done` units)."""
        if self.cache is None:
            return
        for i, (_, end) in list(self.ranges.items()):
            if end <= done and isinstance(self.sources[i], RemoteFile):
                self.cache.release(i)

    def take_found(self) -> list[tuple[int, Problem]]:
        found, self.found = self.found, []
        return found

    def _units_of(self, i: int, block: bool, idle: Callable[[], None]) -> list[Unit] | None:
        if i in self.units:
            self.ranges.setdefault(i, (self._base, self._base + len(self.units[i])))
            return self.units[i]
        cache = self._cache()
        if not block and not cache.ready(i):
            return None
        path = cache.wait(i, idle)
        planned, early = inputs.plan([path], self.text_field)
        size = self._size(i)
        weights = [max(u.size, 1) for u in planned]
        shares = [size * sum(weights[: k + 1]) // sum(weights) for k in range(len(weights))]
        sizes = [b - a for a, b in zip([0, *shares[:-1]], shares)]
        self.units[i] = [dataclasses.replace(u, file=i, size=s) for u, s in zip(planned, sizes, strict=True)]
        if str(i) not in self.file_units:  # counted once, not again by a run that resumes inside it
            self.file_units[str(i)] = len(planned)
            self.found += [(i, problem) for _, problem in early]
        self._stamp(i, cache.stamps.get(i))
        self.ranges[i] = (self._base, self._base + len(planned))
        return self.units[i]

    def _stamp(self, i: int, stamp: list | None) -> None:
        """Record a mirror file's stamp as fetched now; refuse one whose bytes differ from the bytes
        an interrupted run read (it resumes inside this file)."""
        if stamp is None:
            return
        recorded = self.file_stamps.get(str(i))
        if recorded is not None and recorded[1] != stamp[1]:
            raise UserError(_changed(self.sources[i]))
        self.file_stamps[str(i)] = stamp

    def _check_unchanged(self, i: int) -> None:
        """A mirror file an interrupted run read whole must hold the same bytes now."""
        source, recorded = self.sources[i], self.file_stamps.get(str(i))
        if not isinstance(source, RemoteFile) or recorded is None:
            return
        mtime = os.stat(source.where).st_mtime_ns
        if mtime == recorded[0]:
            return
        if sha256_file(Path(source.where)) != recorded[1]:
            raise UserError(_changed(source))
        print(
            f"{source.name}: modified time changed, same bytes as the interrupted run read: resuming",
            file=sys.stderr,
        )
        recorded[0] = mtime

    def _count(self, i: int) -> int | None:
        if i in self.units:
            return len(self.units[i])
        return self.file_units.get(str(i))

    def _size(self, i: int) -> int:
        source = self.sources[i]
        if isinstance(source, RemoteFile):
            return source.size
        return sum(u.size for u in self.units[i])

    def _cache(self) -> Cache:
        assert self.cache is not None, "Hub inputs come with a cache"
        return self.cache


def recorded_revisions(state_path: Path) -> dict[str, str]:
    """The commit each Hub input was read at by the interrupted preparation whose state is at
    `state_path` (none when there is no readable state)."""
    try:
        revisions = json.loads(state_path.read_text()).get("revisions", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return revisions if isinstance(revisions, dict) else {}


def _changed(source: Source) -> str:
    """The refusal for a mirror file whose bytes changed after an interrupted run read them."""
    assert isinstance(source, RemoteFile)
    return (
        f"{source.name}: {source.where} holds other bytes than when the interrupted run read it: "
        "restore that version to resume, or pass --overwrite to start over"
    )
