"""`SkipList`: global sample ranges a run has stepped over, as part of its data order.

The training stream reads global sample indices in order (`pretrain.data.order`). After a
divergence is rolled back (`pretrain.train.module`), the samples read from the checkpoint it
returned to up to the end of the bad streak (plus a margin) are excluded for good: the stream's
position p (optimizer step x global batch + offset) then maps to the p-th global index that lies
in no skipped range. Ranges are kept in that index space, as half-open [start, stop), merged and
sorted, so a skip list is a short list that every later launch, requeue, other GPU count or
branch applies the same way, and a position before the first range maps to itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class SkipList:
    """Sorted, disjoint [start, stop) ranges of global sample indices that the stream steps over."""

    def __init__(self, ranges: Iterable[Sequence[int]] = ()) -> None:
        self.ranges: list[tuple[int, int]] = []
        for start, stop in ranges:
            self._insert(int(start), int(stop))

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkipList) and self.ranges == other.ranges

    def __repr__(self) -> str:
        return f"SkipList({self.ranges})"

    def _insert(self, start: int, stop: int) -> None:
        if not 0 <= start < stop:
            raise ValueError(f"a skipped range needs 0 <= start < stop, got [{start}, {stop})")
        self.ranges = _union([*self.ranges, (start, stop)])

    def union(self, other: SkipList) -> SkipList:
        return SkipList([*self.ranges, *other.ranges])

    def index(self, positions: np.ndarray | int) -> np.ndarray:
        """The global sample index read at each stream position."""
        mapped = np.array(positions, dtype=np.int64, copy=True)
        for start, stop in self.ranges:  # ascending: each range shifts every index at or after it
            mapped[mapped >= start] += stop - start
        return mapped

    def skip_positions(self, first: int, last: int) -> tuple[int, int]:
        """The global index range [start, stop) read at stream positions [first, last): what a
        rollback from position `last` back to `first` adds to the list."""
        start, stop = self.index(np.array([first, last - 1]))
        return int(start), int(stop) + 1

    def skipped_before(self, index: int) -> int:
        """How many global indices below `index` the list skips."""
        return sum(min(stop, index) - start for start, stop in self.ranges if start < index)

    def to_json(self) -> list[list[int]]:
        return [[a, b] for a, b in self.ranges]


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
