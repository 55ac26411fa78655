"""The data order: a pure function from global sample index to (source, window).

    global sample i --Mixture--> (source s, k = s's own sample counter)
    k --> epoch e = k // n_s, position p = k % n_s --Permutation(seed, s, e)--> window
    window w of source s = tokens [w*seq_len, w*seq_len + seq_len + 1) of its train split

Each source walks its own epochs (a small replay source simply cycles, each pass in a fresh
order), and nothing depends on how samples are spread over devices or workers.

How samples reach devices: optimizer step t consumes global samples [t*B, (t+1)*B). Rank r
of W takes the contiguous slice [t*B + r*B/W, t*B + (r+1)*B/W), cut into micro-batches of m
in order (gradient accumulation). A rank's micro-batches are numbered q = 0, 1, ... from the
run's start; DataLoader worker j of J yields q = j, j+J, j+2J, ..., and the DataLoader
collects workers round-robin, so the rank sees q in order for any worker count. Resume at
global sample k (a multiple of B) starts at q = (k/B)*(B/(W*m)); with the same B the global
order is identical whatever W is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pretrain.data.mixture import SourceMixture
from pretrain.data.permutation import Permutation


class SampleOrder:
    """Global sample index -> (source id, window id) for sources of `windows[s]` windows each.

    `mixture` is anything with `assign(indices) -> (source, counter)` and `consumed(n)`, like
    `Mixture` (fixed shares); a schedule of shares can slot in the same way.
    """

    def __init__(
        self, names: Sequence[str], windows: Sequence[int], mixture: SourceMixture, seed: int
    ) -> None:
        self.names = list(names)
        self.windows = np.array(windows, dtype=np.int64)
        self.mixture = mixture
        self.seed = seed

    def permutation(self, source: int, epoch: int) -> Permutation:
        """The order of source `source`'s windows in its epoch `epoch`."""
        return Permutation(int(self.windows[source]), f"{self.seed}/{self.names[source]}/{epoch}")

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source id, window id) of each global sample index."""
        source, counter = self.mixture.assign(indices)
        epoch, position = np.divmod(counter, self.windows[source])
        window = np.empty_like(position)
        for s in np.unique(source):
            for e in np.unique(epoch[source == s]):
                here = (source == s) & (epoch == e)
                window[here] = self.permutation(int(s), int(e))(position[here])
        return source, window

    def epochs(self, num_samples: int) -> dict[str, float]:
        """Fractional epochs each source has completed after `num_samples` global samples."""
        consumed = self.mixture.consumed(num_samples)
        return {name: float(c / n) for name, c, n in zip(self.names, consumed, self.windows, strict=True)}


class BatchLayout:
    """Which global samples rank `rank` reads in its q-th micro-batch."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int) -> None:
        # The reader's own invariant, for callers outside `pretrain fit`: a run's geometry is checked
        # (with the user's field names) by `pretrain.recipe.BatchGeometry` before a layout is built.
        if min(global_batch_size, micro_batch_size, world_size) < 1 or global_batch_size % (
            world_size * micro_batch_size
        ):
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of world size {world_size} "
                f"x micro batch {micro_batch_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.per_rank = per_rank = global_batch_size // world_size
        self.accumulation = per_rank // micro_batch_size
        self.rank = rank

    def first_micro_batch(self, start_sample: int) -> int:
        """The rank-local micro-batch counter at global sample `start_sample` (a step boundary)."""
        if start_sample % self.global_batch_size:
            raise ValueError(
                f"start sample {start_sample} is not a multiple of the global batch {self.global_batch_size}"
            )
        return start_sample // self.global_batch_size * self.accumulation

    def sample_indices(self, micro_batches: np.ndarray) -> np.ndarray:
        """Global sample indices, shape [len(micro_batches), micro_batch_size]."""
        step, inner = np.divmod(np.asarray(micro_batches, dtype=np.int64), self.accumulation)
        first = step * self.global_batch_size + self.rank * self.per_rank + inner * self.micro_batch_size
        return first[:, None] + np.arange(self.micro_batch_size)
