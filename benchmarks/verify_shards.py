"""Benchmark: what checking shards costs (`pretrain.data.verify`, docs/performance.md).

Prints, in one run:
- full verification (`pretrain data verify DIR`: sha256 + token-id range of every shard) of the
  pystdlib dataset and of a synthetic dataset of `--synthetic-gb` GB (uint16 tokens, 1 GB shards,
  written first to `--scratch`), as seconds and GB/s;
- the sampled check every `pretrain fit` launch runs (`data.verify_shards`: 2 shards per source);
- the read-time vocabulary check: loader tokens/s with it, and with it removed, same windows.

Run: python benchmarks/verify_shards.py [--synthetic-gb 10] [--scratch /tmp/verify-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pretrain.data import tokens as tokens_module
from pretrain.data.loader import build_train_dataset
from pretrain.data.shards import FORMAT, content_fingerprint, load_manifest
from pretrain.data.verify import verify
from pretrain.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
SHARD_TOKENS = 500_000_000  # 1 GB of uint16


def synthetic(root: Path, gigabytes: float) -> Path:
    """A dataset of random uint16 tokens below 32,000, in 1 GB shards, with true checksums."""
    if (root / "manifest.json").exists():
        return root
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, left = [], int(gigabytes * 1e9 / 2)
    while left > 0:
        n = min(SHARD_TOKENS, left)
        name = f"train/shard_{len(shards):05d}.bin"
        digest = hashlib.sha256()
        with open(root / name, "wb") as f:
            for start in range(0, n, 50_000_000):
                block = rng.integers(0, 32_000, min(50_000_000, n - start), dtype="<u2").tobytes()
                digest.update(block)
                f.write(block)
        shards.append({"file": name, "tokens": n, "documents": 1, "sha256": digest.hexdigest()})
        left -= n
    splits = {"train": shards, "val": []}
    manifest = {
        "format": FORMAT,
        "dtype": "uint16",
        "tokenizer": {"fingerprint": "synthetic", "vocab_size": 32_000, "eos_id": 0, "bos_id": None},
        "settings": {"text_field": "text", "val_fraction": 0.0, "shard_tokens": SHARD_TOKENS, "bos": False},
        "inputs": [],
        "splits": {
            s: {"documents": len(v), "tokens": sum(e["tokens"] for e in v), "shards": v}
            for s, v in splits.items()
        },
        "skipped": {"total": 0, "by_reason": {}, "examples": []},
        "content_fingerprint": content_fingerprint(splits, "synthetic", "uint16"),
    }
    write_json_atomic(root / "manifest.json", manifest)
    return root


def timed_verify(root: Path, sample: int | None) -> None:
    manifest = load_manifest(root)
    size = (
        sum(s.tokens for split in ("train", "val") for s in manifest.shards(split)) * manifest.dtype.itemsize
    )
    began = time.perf_counter()
    summary = verify([manifest], sample, show_progress=False)
    seconds = time.perf_counter() - began
    what = "all shards" if sample is None else f"{sample} random shard(s)"
    print(f"{root.name:>12}  {what:<18} {summary}  ({size / 1e9:.2f} GB dataset, {seconds:.2f} s)")


def loader_rate(data: Path, batches: int) -> float:
    dataset = build_train_dataset(
        {"d": (data, 1.0)}, seq_len=2048, global_batch_size=8, micro_batch_size=8, seed=0
    )
    it = iter(dataset)
    for _ in range(200):  # fault the pages in
        next(it)
    began = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * 8 * 2048 / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data/pystdlib/out")
    parser.add_argument("--synthetic-gb", type=float, default=10.0)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/verify-bench"))
    parser.add_argument("--batches", type=int, default=5000)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic dataset for another run")
    args = parser.parse_args()
    if not (args.data / "manifest.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "data/pystdlib/prepare.py"), "--out", str(args.data)], check=True
        )
    big = synthetic(args.scratch / "synthetic", args.synthetic_gb)
    for root in (args.data, big):
        timed_verify(root, None)
        timed_verify(root, 2)
    checked = loader_rate(args.data, args.batches)
    unchecked_read = tokens_module.TokenStream.read

    def read_without_check(self, start, out):  # the loop of TokenStream.read, minus the vocabulary check
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < len(out):
            offset = start + done - self.starts[i]
            piece = self._shard(i)[offset : offset + len(out) - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            i += 1

    tokens_module.TokenStream.read = read_without_check
    unchecked = loader_rate(args.data, args.batches)
    tokens_module.TokenStream.read = unchecked_read
    print(
        f"loader tokens/s: with the vocabulary check {checked:,.0f}, without {unchecked:,.0f} (ratio {checked / unchecked:.3f})"
    )
    if not args.keep:
        shutil.rmtree(args.scratch / "synthetic")


if __name__ == "__main__":
    main()
