"""Helpers for the data tests: synthetic datasets whose tokens name their own position.

A synthetic dataset's train stream is `offset + arange(n)` (uint32), so a window's first
token tells which window it is and which source it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.data.shards import FORMAT, content_fingerprint, write_json_atomic


def write_dataset(
    root: Path,
    shard_sizes: list[int],
    offset: int = 0,
    val_sizes: tuple[int, ...] = (),
    tokenizer: str = "synthetic",
) -> Path:
    """A dataset in the shard format with train tokens offset + 0, 1, 2, ... split over shards."""
    splits: dict[str, list[dict]] = {}
    start = offset
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        (root / split).mkdir(parents=True, exist_ok=True)
        splits[split] = []
        for i, n in enumerate(sizes):
            name = f"{split}/shard_{i:05d}.bin"
            (root / name).write_bytes(np.arange(start, start + n, dtype="<u4").tobytes())
            splits[split].append({"file": name, "tokens": n, "documents": 1, "sha256": f"{start}+{n}"})
            start += n
    manifest = {
        "format": FORMAT,
        "dtype": "uint32",
        "tokenizer": {
            "fingerprint": tokenizer,
            "vocab_size": 2**32,
            "eos_id": 0,
            "bos_id": None,
            "pad_id": None,
        },
        "settings": {
            "text_field": "text",
            "val_fraction": 0.0,
            "shard_tokens": max(shard_sizes),
            "bos": False,
        },
        "inputs": [],
        "splits": {
            s: {"documents": len(v), "tokens": sum(e["tokens"] for e in v), "shards": v}
            for s, v in splits.items()
        },
        "skipped": {"total": 0, "by_reason": {}, "examples": []},
        "content_fingerprint": content_fingerprint(splits, tokenizer, "uint32"),
    }
    write_json_atomic(root / "manifest.json", manifest)
    return root
