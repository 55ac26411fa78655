"""Benchmark: training loader throughput (tokens/s) in one process, micro-batches of 8 x 2049.

Reads the pystdlib dataset (prepared if missing) through `build_train_dataset` exactly as
training does: mixture, per-epoch Feistel permutation, memory-mapped windows across shards,
int64 (input_ids, labels) tensors. Run twice over the same windows: the first pass may fault
pages in from disk, the second measures the loader itself. Target: >= 100M tokens/s.

Run: python benchmarks/data_loader.py [--data DIR] [--batches 20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from pretrain.data.loader import build_train_dataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data/pystdlib/out")
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    if not (args.data / "manifest.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "data/pystdlib/prepare.py"), "--out", str(args.data)], check=True
        )
    sources = {"pystdlib": (args.data, 1.0), "replay": (args.data, 0.05)}  # a two-source mixture
    dataset = build_train_dataset(
        sources,
        seq_len=args.seq_len,
        global_batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
        seed=1,
    )
    tokens_per_batch = args.micro_batch * (args.seq_len + 1)
    for label in ("cold", "warm"):
        batches = iter(dataset)
        t = time.perf_counter()
        for _ in range(args.batches):
            input_ids, labels = next(batches)
        seconds = time.perf_counter() - t
        assert input_ids.shape == labels.shape == (args.micro_batch, args.seq_len)
        rate = args.batches * tokens_per_batch / seconds
        print(
            f"{label}: {args.batches:,} batches of {args.micro_batch} x {args.seq_len + 1} in {seconds:.2f} s: "
            f"{rate / 1e6:,.0f}M tokens/s ({args.batches / seconds:,.0f} batches/s)"
        )
    print("target >= 100M tokens/s")


if __name__ == "__main__":
    main()
