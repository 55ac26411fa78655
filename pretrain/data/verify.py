"""Is a prepared dataset still what `prepare` wrote? Its tokenizer, checksums and token ids.

A byte flipped in place leaves a shard's size unchanged, so the size check of `load_manifest`
misses it. `verify_shard` reads a shard once, hashing it (the manifest records every shard's
sha256) and checking that every token id is below the tokenizer's vocabulary size; a mismatch
stops with one line naming the shard (and the position of a bad id). `check_tokenizer` compares
the `tokenizer.json` beside the shards with the fingerprint the manifest records, so a tokenizer
swapped after preparation is never embedded in a run's checkpoints (a dataset without a
`tokenizer.json` passes: its checkpoints carry no tokenizer).

How much of the data is checked, and when:
- `pretrain data verify DIR`: the tokenizer and every shard, with progress (run it after copying
  a dataset);
- every launch of `pretrain fit`: the tokenizer of every source, and rank 0 checks
  `data.verify_shards` shards of each source (2 by default). The rule: the shards this run has
  checked the fewest times so far go first (ties in the order of their sha256, a fixed shuffle),
  counted by content (the manifest's sha256) in `RUN_DIR/verified-shards.json`. So N launches of
  one run check N x `verify_shards` distinct shards of a source until all are covered, and every
  shard is checked once before any is checked twice;
- every token training reads is checked against the vocabulary as it is read
  (`pretrain.data.tokens.TokenStream`): a damaged id stops the run naming the shard and position,
  instead of an `IndexError` deep in the model at the same step on every resume.
Cost: `benchmarks/verify_shards.py` (the numbers are in docs/performance.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pretrain.data.shards import MANIFEST, SPLITS, Manifest, Shard
from pretrain.errors import UserError
from pretrain.files import write_json_atomic
from pretrain.progress import progress

BLOCK = 1 << 24  # bytes read at a time (a multiple of every token size)


@functools.lru_cache(maxsize=8)
def _fingerprint_of(tokenizer_json: str) -> str:
    """The fingerprint of a tokenizer.json's text (cached by content: each launch asks several times).
    `tokenizers` is imported here only: reading shards without a tokenizer.json never needs it."""
    from tokenizers import Tokenizer

    from pretrain.data.tokenizer import fingerprint

    return fingerprint(Tokenizer.from_str(tokenizer_json))


def check_tokenizer(manifest: Manifest) -> str | None:
    """The `tokenizer.json` beside the shards (None if there is none), refused unless it is the one
    the manifest records."""
    path = manifest.tokenizer_path
    if not path.is_file():
        return None
    fix = f"put back the tokenizer.json {manifest.root} was prepared with, or prepare it again"
    try:
        text = path.read_text()
        actual = _fingerprint_of(text)
    except Exception as err:  # unreadable, not UTF-8, or rejected by the Rust parser (plain Exception)
        raise UserError(
            f"{path}: not a tokenizer.json the `tokenizers` library can load ({err}): {fix}"
        ) from None
    recorded = manifest.tokenizer_fingerprint
    if actual != recorded:
        raise UserError(
            f"{path}: not the tokenizer the shards were tokenized with (fingerprint {actual[:16]}, "
            f"{manifest.root / MANIFEST} records {recorded[:16]}): {fix}"
        )
    return text


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


def shard_key(manifest: Manifest, shard: Shard) -> str:
    """A shard's identity by content: its sha256 (else the dataset's fingerprint and the file's name)."""
    return shard.sha256 or f"{manifest.fingerprint}/{shard.path.relative_to(manifest.root)}"


class VerifiedShards:
    """How many times a run has checked each shard, by content, kept in a JSON file of the run.

    A file that cannot be read or is not of this shape is started again, saying so in one line:
    it only orders the checks, so nothing is lost but the order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts = self._read()

    def _read(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            counts = json.loads(self.path.read_bytes())["checked"]
            if isinstance(counts, dict) and all(
                isinstance(k, str) and type(n) is int for k, n in counts.items()
            ):
                return counts
            problem = "not a record of checked shards"
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        print(
            f"warning: {self.path}: {problem}: starting the record of checked shards again", file=sys.stderr
        )
        return {}

    def least_checked(self, manifest: Manifest, sample: int) -> list[Shard]:
        """The `sample` shards checked the fewest times so far, ties in a random order."""
        shards = all_shards(manifest)
        random.Random().shuffle(shards)  # its own generator: the run's seeded one would repeat the ties
        shards.sort(key=lambda shard: self.counts.get(shard_key(manifest, shard), 0))
        return shards[:sample]

    def add(self, manifest: Manifest, shard: Shard) -> None:
        key = shard_key(manifest, shard)
        self.counts[key] = self.counts.get(key, 0) + 1

    def covered(self, manifests: Iterable[Manifest]) -> tuple[int, int]:
        """(shards checked at least once, all shards) of these datasets."""
        keys = [shard_key(manifest, shard) for manifest in manifests for shard in all_shards(manifest)]
        return sum(key in self.counts for key in keys), len(keys)

    def save(self) -> None:
        write_json_atomic(self.path, {"checked": self.counts})


def _choose(manifest: Manifest, sample: int | None, record: VerifiedShards | None) -> list[Shard]:
    """Every shard (`sample` None), else `sample` of them: the least checked by this run, else random."""
    shards = all_shards(manifest)
    if sample is None:
        return shards
    if record is not None:
        return record.least_checked(manifest, sample)
    return random.sample(shards, min(sample, len(shards)))


def verify(
    manifests: Iterable[Manifest],
    sample: int | None = None,
    show_progress: bool = True,
    record: VerifiedShards | None = None,
) -> str:
    """Check each dataset's tokenizer and every shard (`sample` None) or `sample` shards of each
    (the least checked by the run that keeps `record`, else random ones); returns a summary."""
    began = time.perf_counter()
    manifests = list(manifests)
    chosen: list[tuple[Manifest, Shard]] = []
    for manifest in manifests:
        check_tokenizer(manifest)
        chosen += [(manifest, shard) for shard in _choose(manifest, sample, record)]
    size = sum(shard.tokens * manifest.dtype.itemsize for manifest, shard in chosen)
    items = progress(chosen, "verifying shards", "shard") if show_progress else chosen
    for manifest, shard in items:
        verify_shard(manifest, shard)
        if record is not None:
            record.add(manifest, shard)
    seconds = time.perf_counter() - began
    summary = f"verified {len(chosen)} shard(s), {size / 1e9:.2f} GB, in {seconds:.1f} s: checksums and token ids match"
    if record is None:
        return summary
    record.save()
    covered, total = record.covered(manifests)
    return (
        f"{summary}; they were the least checked of this run, which has now checked {covered} of "
        f"{total} shard(s) at least once ({record.path})"
    )
