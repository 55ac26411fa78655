"""A mixture whose share of one source ramps linearly (TinyLlama v1.1's domain-data ramp).

Source `r`'s share of sample j is w(j) = start + (end - start) * min(j / R, 1): it moves from
`start` to `end` (its share in the recipe's weights) over the first R global samples, then
stays. With C(n) = sum_{j<n} w(j) (closed form: quadratic during the ramp, linear after), the
ramped source has taken k(n) = floor(C(n) + 1/2) of the first n samples, and sample n is its
iff k(n+1) > k(n). So over every prefix its count is within 1/2 of the target and over any
window of samples within 1. The other samples, r(n) = n - k(n) of them, go to the remaining
sources through the exact static `Mixture` of their weights. Everything is a closed-form
function of the global sample index: deterministic, vectorized, and exact on resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pretrain.data.mixture import Mixture


class RampedMixture:
    """`Mixture` interface (`assign`, `consumed`) with source `ramped`'s share ramping over `ramp_samples`."""

    def __init__(self, weights: Sequence[float], ramped: int, start_share: float, ramp_samples: int) -> None:
        if len(weights) < 2:
            raise ValueError("a share ramp needs at least two sources")
        if not 0.0 <= start_share < 1.0 or ramp_samples < 1:
            raise ValueError("ramp start share must be in [0, 1) and the ramp at least one sample long")
        self.end_share = float(weights[ramped]) / float(sum(weights))
        if not 0.0 < self.end_share < 1.0:
            raise ValueError("the ramped source's final share must be strictly between 0 and 1")
        self.ramped, self.start_share, self.ramp_samples = ramped, float(start_share), int(ramp_samples)
        self.others = [s for s in range(len(weights)) if s != ramped]
        self.rest = Mixture([weights[s] for s in self.others])
        self.num_sources = len(weights)

    def _target(self, n: np.ndarray) -> np.ndarray:
        """C(n): the ramped source's expected count among the first n samples."""
        n = n.astype(np.float64)
        r, p0, p1 = float(self.ramp_samples), self.start_share, self.end_share
        during = p0 * n + (p1 - p0) * n * (n - 1.0) / (2.0 * r)
        at_end = p0 * r + (p1 - p0) * (r - 1.0) / 2.0
        return np.where(n <= r, during, at_end + p1 * (n - r))

    def _taken(self, n: np.ndarray) -> np.ndarray:
        """k(n): how many of the first n samples the ramped source has had."""
        return np.floor(self._target(n) + 0.5).astype(np.int64)

    def assign(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, per-source sample counter) for each global sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        before, after = self._taken(indices), self._taken(indices + 1)
        is_ramped = after > before
        rest_source, rest_counter = self.rest.assign(indices - before)
        source = np.asarray(self.others, dtype=np.int64)[rest_source]
        source = np.where(is_ramped, self.ramped, source)
        counter = np.where(is_ramped, before, rest_counter)
        return source, counter

    def consumed(self, num_samples: int) -> np.ndarray:
        """How many samples each source has given after `num_samples` global samples."""
        taken = int(self._taken(np.array([num_samples]))[0])
        counts = np.zeros(self.num_sources, dtype=np.int64)
        counts[self.ramped] = taken
        counts[self.others] = self.rest.consumed(num_samples - taken)
        return counts
