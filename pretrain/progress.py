"""Progress bars for long work (conversion, preparation), on stderr so stdout stays parseable."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a progress bar (rate and ETA) on stderr."""
    yield from tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=0.5)
