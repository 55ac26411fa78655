"""Which source each global sample comes from: exact shares over every window of samples.

Weights are turned into exact integer counts c_s per period of D = sum(c_s) samples (exact
for rational weights with a common denominator <= 2^20, e.g. 0.693584:0.306416 has D =
62500; others are rounded to multiples of 2^-20). Within a period, sample slots are assigned
by earliest-deadline-first over per-source unit jobs: source s's k-th sample may take slot
n (1-based) only if k <= w_s*n + d (release ceil((k-d)/w_s)), and must have taken one by the
first slot with w_s*n - d > k - 1 (deadline floor((k-1+d)/w_s) + 1), with d = 1 - 1/(2K-2)
for K sources.
Tijdeman (1980, "The chairman assignment problem") proved such an assignment exists for any
weights, and EDF finds one whenever one exists (unit jobs, integer release times), so for
every prefix of n samples each source's count is within d of w_s*n. Consequences:

* two sources (the TinyLlama mix, new data + replay): any window of N consecutive samples
  holds within 1 of w_s*N samples of each source (d = 1/2);
* K >= 3 sources: within 1 over every prefix and within 2 - 1/(K-1) over any window.
  "Within 1 over every window" cannot be promised for K >= 3: for shares 0.45:0.35:0.20
  no sequence longer than 10 samples has it (exhaustive search).

A source's own counter (its k) is what walks through its epochs, so each source cycles
through its windows independently of the others. The rule depends only on the weights, so
the assignment is a pure function of the global sample index. Time-varying shares (a later
ramp) can implement the same `assign` interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from math import lcm
from typing import Protocol

import numpy as np

MAX_PERIOD = 2**20


def integer_shares(weights: Sequence[float]) -> list[int]:
    """Per-period sample counts for `weights` (positive, any scale)."""
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {list(weights)}")
    exact = [Fraction(str(w)) for w in weights]
    shares = [w / sum(exact) for w in exact]
    period = lcm(*(s.denominator for s in shares))
    if period <= MAX_PERIOD:
        return [int(s * period) for s in shares]
    # Largest remainder at denominator MAX_PERIOD.
    raw = [s * MAX_PERIOD for s in shares]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    for i in by_remainder[: MAX_PERIOD - sum(counts)]:
        counts[i] += 1
    if 0 in counts:
        raise ValueError(f"mixture weights {list(weights)}: a share below 2^-20 is not supported")
    return counts


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def edf_schedule(counts: Sequence[int]) -> np.ndarray:
    """Source of each slot of one period, by earliest deadline first (see the module docstring)."""
    k_sources, period = len(counts), sum(counts)
    if k_sources == 1:
        return np.zeros(period, dtype=np.uint8)
    num, den = 2 * k_sources - 3, 2 * k_sources - 2  # d = num / den

    def window(s: int, k: int) -> tuple[int, int]:
        release = _ceil_div((k * den - num) * period, counts[s] * den)
        deadline = ((k - 1) * den + num) * period // (counts[s] * den) + 1
        return release, deadline

    jobs = [window(s, 1) for s in range(k_sources)]
    taken = [0] * k_sources
    out = np.empty(period, dtype=np.uint8)
    for n in range(1, period + 1):
        deadline, s = min((d, s) for s, (r, d) in enumerate(jobs) if r <= n)
        assert deadline >= n, "EDF missed a deadline: Tijdeman's bound violated"
        out[n - 1] = s
        taken[s] += 1
        jobs[s] = window(s, taken[s] + 1)
    return out


class SourceMixture(Protocol):
    """What `SampleOrder` needs of a mixture: `Mixture`, `pretrain.data.ramp.RampedMixture`."""

    def assign(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def consumed(self, num_samples: int) -> np.ndarray: ...


class Mixture:
    """Deterministic assignment of global sample indices to sources with exact shares."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.counts = np.array(integer_shares(weights), dtype=np.int64)
        self.period = int(self.counts.sum())
        self.slot_source = edf_schedule(self.counts.tolist())
        # For each slot: how many earlier slots of the period belong to the same source.
        self.slot_rank = np.empty(self.period, dtype=np.int64)
        for s in range(len(self.counts)):
            where = np.flatnonzero(self.slot_source == s)
            self.slot_rank[where] = np.arange(len(where))

    def assign(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, per-source sample counter) for each global sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        cycle, slot = np.divmod(indices, self.period)
        source = self.slot_source[slot].astype(np.int64)
        return source, cycle * self.counts[source] + self.slot_rank[slot]

    def consumed(self, num_samples: int) -> np.ndarray:
        """How many samples each source has given after `num_samples` global samples."""
        cycle, rest = divmod(num_samples, self.period)
        head = np.bincount(self.slot_source[:rest], minlength=len(self.counts))
        return cycle * self.counts + head
