"""What the trainer reads: endless training micro-batches and per-source validation batches.

    sources = {"slimpajama": ("data/slimpajama/out", 0.693584),
               "starcoder": ("data/starcoder/out", 0.306416)}
    train = build_train_dataset(sources, seq_len=2048, global_batch_size=1024,
                                micro_batch_size=8, seed=42, rank=r, world_size=W,
                                start_sample=global_step * 1024)
    loader = DataLoader(train, batch_size=None, num_workers=2)   # yields (input_ids, labels)
    val = build_val_datasets(sources, seq_len=2048, micro_batch_size=8, rank=r, world_size=W)
    fingerprint = data_fingerprint(sources)   # store in checkpoints; compare on resume

A source is `(path, weight)` or any object with `.path` and `.weight`; a path may be given
alone for validation. Batches are `(input_ids, labels)`, int64 tensors [micro_batch, seq_len]
with labels = input_ids shifted by one. The order is `pretrain.data.order`'s: a pure function
of (seed, global sample index), so `start_sample = global_step * global_batch_size` resumes
exactly, on any number of ranks with the same global batch. Use `batch_size=None` in the
DataLoader: the datasets batch themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.data.mixture import Mixture, SourceMixture
from pretrain.data.order import BatchLayout, SampleOrder
from pretrain.data.ramp import RampedMixture
from pretrain.data.shards import Manifest, load_manifest
from pretrain.data.skips import SkipList
from pretrain.data.tokens import TokenStream
from pretrain.data.verify import check_tokenizer
from pretrain.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
CHUNK = 64  # micro-batches whose sample order is computed in one vectorized call
VAL_SEED = 0  # validation order is fixed, independent of the training seed


def _spec(source: Any) -> tuple[str, float]:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), 1.0
    if hasattr(source, "path"):
        return os.fspath(source.path), float(source.weight)
    path, weight = source
    return os.fspath(path), float(weight)


def open_sources(sources: Mapping[str, Any]) -> dict[str, Manifest]:
    """Load every source's manifest; refuse an empty set, mixed tokenizers, or a `tokenizer.json` that
    is not the one the manifest records (`pretrain.data.verify.check_tokenizer`)."""
    if not sources:
        raise UserError("no data sources given")
    manifests = {name: load_manifest(_spec(s)[0]) for name, s in sources.items()}
    for manifest in manifests.values():
        check_tokenizer(manifest)
    (first, m0), *rest = manifests.items()
    for name, m in rest:
        if m.tokenizer_fingerprint != m0.tokenizer_fingerprint:
            raise UserError(
                f"sources {first!r} ({m0.root}) and {name!r} ({m.root}) were tokenized with different "
                f"tokenizers (fingerprints {m0.tokenizer_fingerprint[:16]} vs {m.tokenizer_fingerprint[:16]}): "
                "prepare them with the same tokenizer.json"
            )
    return manifests


def data_fingerprint(sources: Mapping[str, Any]) -> str:
    """Hash of names, weights, tokenizer and every source's content: changes iff the data does."""
    manifests = open_sources(sources)
    entries = {
        name: [_spec(s)[1], manifests[name].tokenizer_fingerprint, manifests[name].fingerprint]
        for name, s in sources.items()
    }
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _read_windows(streams: list[TokenStream], source: np.ndarray, window: np.ndarray, seq_len: int) -> Batch:
    rows = np.empty((len(window), seq_len + 1), dtype=np.int64)
    for row, s, w in zip(rows, source.tolist(), window.tolist(), strict=True):
        streams[s].read(w * seq_len, row)
    tokens = torch.from_numpy(rows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainDataset(IterableDataset):
    """Endless micro-batches for one rank, starting at a global sample index."""

    def __init__(
        self,
        streams: dict[str, TokenStream],
        order: SampleOrder,
        layout: BatchLayout,
        seq_len: int,
        start_sample: int,
        skips: SkipList | None = None,
    ) -> None:
        self.streams = list(streams.values())
        self.order = order
        self.layout = layout
        self.seq_len = seq_len
        self.skips = skips or SkipList()
        self.first = layout.first_micro_batch(start_sample)

    def micro_batch_samples(self, micro_batches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, window ids), each [len(micro_batches), micro_batch_size], for this rank."""
        indices = self.skips.index(self.layout.sample_indices(micro_batches))
        source, window = self.order.locate(indices.ravel())
        return source.reshape(indices.shape), window.reshape(indices.shape)

    def epochs(self, num_samples: int) -> dict[str, float]:
        """Fractional epochs per source after `num_samples` samples of the stream (for logging)."""
        return self.order.epochs(int(self.skips.index(num_samples)))

    def origins(self, first: int, stop: int) -> list[dict[str, Any]]:
        """Where the samples at stream positions [first, stop) come from: global index, source,
        shard file (relative to its dataset) and the token offset of the window in that shard."""
        indices = self.skips.index(np.arange(first, stop))
        sources, windows = self.order.locate(indices)
        found = []
        for index, s, w in zip(indices.tolist(), sources.tolist(), windows.tolist(), strict=True):
            stream = self.streams[s]
            shard, offset = stream.locate(w * self.seq_len)
            found.append({"sample": index, "source": self.order.names[s], "shard": shard, "offset": offset})
        return found

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker()
        q = self.first + worker
        while True:
            sources, windows = self.micro_batch_samples(q + num_workers * np.arange(CHUNK))
            for source, window in zip(sources, windows, strict=True):
                yield _read_windows(self.streams, source, window, self.seq_len)
            q += num_workers * CHUNK


def build_train_dataset(
    sources: Mapping[str, Any],
    *,
    seq_len: int,
    global_batch_size: int,
    micro_batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_sample: int = 0,
    ramp: Mapping[str, Any] | None = None,
    skips: SkipList | None = None,
) -> TrainDataset:
    """The training stream of rank `rank`: a weighted mixture of the sources' train splits.

    `ramp = {"source": name, "start_share": s0, "samples": R}` ramps that source's share
    linearly from s0 to its weight's share over the first R global samples (`pretrain.data.ramp`).
    `skips`: global sample ranges the stream steps over (`pretrain.data.skips`).
    """
    manifests = open_sources(sources)
    streams = {name: TokenStream(m, "train") for name, m in manifests.items()}
    windows = {name: s.num_windows(seq_len) for name, s in streams.items()}
    for name, n in windows.items():
        if n == 0:
            raise UserError(
                f"source {name!r} ({manifests[name].root}): its train split has {len(streams[name])} tokens, "
                f"not enough for one window of seq_len + 1 = {seq_len + 1}"
            )
    weights = [_spec(s)[1] for s in sources.values()]
    try:
        mixture: SourceMixture = Mixture(weights)
        if ramp is not None:
            if ramp["source"] not in streams:
                raise UserError(
                    f"data.ramp.source {ramp['source']!r} is not one of the sources {list(streams)}"
                )
            ramped = list(streams).index(ramp["source"])
            mixture = RampedMixture(weights, ramped, ramp["start_share"], ramp["samples"])
        order = SampleOrder(list(streams), list(windows.values()), mixture, seed)
        layout = BatchLayout(global_batch_size, micro_batch_size, rank, world_size)
        return TrainDataset(streams, order, layout, seq_len, start_sample, skips)
    except ValueError as err:
        raise UserError(str(err)) from None


class ValDataset(IterableDataset):
    """A source's validation windows in a fixed order, this rank's share, micro-batched."""

    def __init__(
        self, stream: TokenStream, order: SampleOrder, layout: BatchLayout, seq_len: int, n: int
    ) -> None:
        self.stream = stream
        self.order = order
        self.layout = layout
        self.seq_len = seq_len
        self.num_micro_batches = n

    def __len__(self) -> int:
        return self.num_micro_batches

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker()
        for q in range(worker, self.num_micro_batches, num_workers):
            indices = self.layout.sample_indices(np.array([q]))[0]
            source, window = self.order.locate(indices)
            yield _read_windows([self.stream], source, window, self.seq_len)


def build_val_datasets(
    sources: Mapping[str, Any],
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
) -> dict[str, ValDataset]:
    """Per source with a non-empty validation split: its windows in a fixed (seeded) order.

    All ranks get the same number of micro-batches (the windows are cut to a multiple of
    world_size * micro_batch_size, then to `max_samples`), and together they read each of
    the first N windows of the fixed order exactly once, so any prefix is a uniform sample.
    """
    out = {}
    layout = BatchLayout(world_size * micro_batch_size, micro_batch_size, rank, world_size)
    for name, manifest in open_sources(sources).items():
        stream = TokenStream(manifest, "val")
        windows = stream.num_windows(seq_len)
        if max_samples is not None:
            windows = min(windows, max_samples)
        steps = windows // (world_size * micro_batch_size)
        if len(stream) and not steps:  # an empty split (--val-fraction 0) is simply not validated
            batch = world_size * micro_batch_size
            raise UserError(
                f"validation of {name!r} ({manifest.root}): its validation split holds {len(stream):,} tokens "
                f"({stream.num_windows(seq_len)} window(s) of seq_len + 1 = {seq_len + 1}), fewer than the {batch} "
                f"windows of one validation batch over {world_size} rank(s)"
                + (
                    f", or data.val_tokens caps it at {max_samples} window(s)"
                    if max_samples is not None
                    else ""
                )
                + ": prepare it with a larger --val-fraction, lower data.micro_batch_size, or raise data.val_tokens"
            )
        if steps:
            order = SampleOrder([name], [stream.num_windows(seq_len)], Mixture([1]), VAL_SEED)
            out[name] = ValDataset(stream, order, layout, seq_len, steps)
    return out
