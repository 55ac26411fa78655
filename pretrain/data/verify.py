"""Is a prepared dataset still what `prepare` wrote? Checksums and token ids, shard by shard.

A byte flipped in place leaves a shard's size unchanged, so the size check of `load_manifest`
misses it. `verify_shard` reads a shard once, hashing it (the manifest records every shard's
sha256) and checking that every token id is below the tokenizer's vocabulary size; a mismatch
stops with one line naming the shard (and the position of a bad id).

How much of the data is checked, and when:
- `pretrain data verify DIR`: every shard, with progress (run it after copying a dataset);
- every launch of `pretrain fit`: rank 0 checks `data.verify_shards` random shards of each source
  (2 by default), so a run that is requeued many times covers more and more of its data;
- every token training reads is checked against the vocabulary as it is read
  (`pretrain.data.tokens.TokenStream`): a damaged id stops the run naming the shard and position,
  instead of an `IndexError` deep in the model at the same step on every resume.
Cost: `benchmarks/verify_shards.py` (the numbers are in docs/performance.md).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable, Sequence

import numpy as np

from pretrain.data.shards import SPLITS, Manifest, Shard
from pretrain.errors import UserError
from pretrain.progress import progress

BLOCK = 1 << 24  # bytes read at a time (a multiple of every token size)


def verify_shard(manifest: Manifest, shard: Shard) -> None:
    """Check `shard`'s sha256 against the manifest and its token ids against the vocabulary."""
    dtype, vocab = manifest.dtype, manifest.vocab_size
    digest = hashlib.sha256()
    position = 0
    with open(shard.path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
            tokens = np.frombuffer(block, dtype=dtype)
            if len(tokens) and int(tokens.max()) >= vocab:
                bad = int(np.argmax(tokens >= vocab))
                raise UserError(
                    f"{shard.path}: token id {int(tokens[bad])} at position {position + bad} is outside the "
                    f"tokenizer's vocabulary of {vocab:,}: the shard is damaged; prepare {manifest.root} again"
                )
            position += len(tokens)
    if shard.sha256 is not None and digest.hexdigest() != shard.sha256:
        raise UserError(
            f"{shard.path}: its content changed since it was prepared (sha256 {digest.hexdigest()[:16]} instead "
            f"of {shard.sha256[:16]}, the manifest's): the data is damaged or was edited; prepare "
            f"{manifest.root} again"
        )


def all_shards(manifest: Manifest) -> list[Shard]:
    return [shard for split in SPLITS for shard in manifest.shards(split)]


def verify(manifests: Iterable[Manifest], sample: int | None = None, show_progress: bool = True) -> str:
    """Verify every shard (`sample` None) or `sample` random shards of each dataset; returns a summary."""
    began = time.perf_counter()
    chosen: list[tuple[Manifest, Shard]] = []
    for manifest in manifests:
        shards: Sequence[Shard] = all_shards(manifest)
        if sample is not None:
            shards = random.sample(list(shards), min(sample, len(shards)))
        chosen += [(manifest, shard) for shard in shards]
    size = sum(shard.tokens * manifest.dtype.itemsize for manifest, shard in chosen)
    items = progress(chosen, "verifying shards", "shard") if show_progress else chosen
    for manifest, shard in items:
        verify_shard(manifest, shard)
    seconds = time.perf_counter() - began
    return f"verified {len(chosen)} shard(s), {size / 1e9:.2f} GB, in {seconds:.1f} s: checksums and token ids match"
