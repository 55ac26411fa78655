"""One split of a prepared dataset as a single memory-mapped token stream, read in windows.

The shards of a split are concatenated in order; window w is tokens
[w*seq_len, w*seq_len + seq_len + 1), so consecutive windows share one token and every token
after the first is a prediction target exactly once per epoch. Windows cross document and
shard boundaries freely (documents are separated by EOS); only the last incomplete window is
dropped. Shards are mapped lazily, so each DataLoader worker maps only what it reads.
"""

from __future__ import annotations

import mmap
import resource
from bisect import bisect_right

import numpy as np

from pretrain.data.shards import Manifest
from pretrain.errors import UserError


def _allow_open_files(n: int) -> None:
    """Each mapped shard holds a file descriptor: raise the soft limit if `n` would not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 256 and soft != hard:
        wanted = n + 256 if hard == resource.RLIM_INFINITY else min(hard, n + 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class TokenStream:
    """The concatenated tokens of one split of a dataset."""

    def __init__(self, manifest: Manifest, split: str) -> None:
        shards = manifest.shards(split)
        self.paths = [s.path for s in shards]
        self.dtype = manifest.dtype
        self.vocab_size = manifest.vocab_size
        self.root = manifest.root
        self.starts = np.cumsum([0] + [s.tokens for s in shards]).tolist()
        self._arrays: list[np.ndarray | None] = [None] * len(shards)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": [None] * len(self.paths)}

    def num_windows(self, seq_len: int) -> int:
        return max(0, (len(self) - 1) // seq_len)

    def _shard(self, i: int) -> np.ndarray:
        array = self._arrays[i]
        if array is None:
            _allow_open_files(len(self.paths))
            with open(self.paths[i], "rb") as f:
                array = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=self.dtype)
            self._arrays[i] = array
        return array

    def _refuse(self, i: int, offset: int, piece: np.ndarray) -> None:
        bad = int(np.argmax(piece >= self.vocab_size))
        raise UserError(
            f"{self.paths[i]}: token id {int(piece[bad])} at position {offset + bad} is outside the tokenizer's "
            f"vocabulary of {self.vocab_size:,}: the shard is damaged; check it with `pretrain data verify "
            f"{self.root}` and prepare the dataset again"
        )

    def locate(self, position: int) -> tuple[str, int]:
        """The shard file (relative to the dataset folder) holding token `position` of the stream,
        and the position's offset in that shard (what `pretrain data show` takes)."""
        i = bisect_right(self.starts, position) - 1
        return str(self.paths[i].relative_to(self.root)), position - self.starts[i]

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with tokens [start, start + len(out)) of the stream."""
        i = bisect_right(self.starts, start) - 1
        done = 0
        while done < len(out):
            offset = start + done - self.starts[i]
            piece = self._shard(i)[offset : offset + len(out) - done]
            if len(piece) and int(piece.max()) >= self.vocab_size:  # one max per window: cheap
                self._refuse(i, offset, piece)
            out[done : done + len(piece)] = piece
            done += len(piece)
            i += 1
