"""A seeded pseudo-random permutation of range(n), computed pointwise in O(1) memory.

Each epoch of each source shuffles hundreds of millions of windows. Materializing
`np.random.permutation(n)` would cost 8 bytes per window per epoch in every DataLoader worker
of every rank (4 GB for TinyLlama's ~5e8 windows) and seconds to build at each epoch start and
each resume. Instead, position p maps to window `perm(p)` through a 4-round balanced Feistel
network over the smallest even-width bit domain >= n (a bijection on [0, 2^bits)),
restricted to [0, n) by cycle walking (re-apply until the value falls below n; also a
bijection, and the domain is < 4n so this takes few rounds). The round function is the
splitmix64 finalizer keyed per round; four rounds of a good mixer decorrelate neighbouring
positions, which is all a data order needs. Any position is computed independently, so a
resumed run jumps straight to sample k.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """Bijection of range(n) determined by `key` (any string, e.g. "seed/source/epoch")."""

    def __init__(self, n: int, key: str) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        digest = hashlib.blake2b(key.encode(), digest_size=8 * ROUNDS).digest()
        self.keys = np.frombuffer(digest, dtype="<u8").copy()

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Map positions in [0, n) to their permuted values (int64 array of the same shape)."""
        y = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = y >= self.n
        while outside.any():
            y[outside] = self._feistel(y[outside])
            outside = y >= self.n
        return y.astype(np.int64)
