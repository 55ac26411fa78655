"""Benchmark: `prepare` throughput vs raw `Tokenizer.encode_batch` on the pystdlib corpus.

Both tokenize the same documents with the same tokenizer on the same cores, in one run,
alternating (best of --repeats each). The baseline is the bare library call on documents
already in memory, using all cores (the `tokenizers` thread pool); `prepare` includes
everything: reading and parsing the JSON lines, splitting, tokenizing in --num-proc worker
processes, and writing fsynced shards and the manifest. Target: ratio >= 0.9.

Run: python benchmarks/data_prepare.py [--work DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from pretrain.data.prepare.pipeline import prepare
from pretrain.data.prepare.settings import PrepareOptions, Settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pretrain-bench-prepare")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    corpus_dir = args.work / "pystdlib"
    if not (corpus_dir / "manifest.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "data/pystdlib/prepare.py"), "--out", str(corpus_dir)], check=True
        )
    corpus, tokenizer = args.work / "pystdlib-raw" / "corpus.jsonl", corpus_dir / "tokenizer.json"
    docs = [json.loads(line)["text"] for line in corpus.open()]
    tok = Tokenizer.from_file(str(tokenizer))
    mb = corpus.stat().st_size / 1e6

    raw, fast, full = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        encodings = tok.encode_batch(docs, add_special_tokens=False)
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        tok.encode_batch_fast(docs, add_special_tokens=False)
        fast.append(time.perf_counter() - t)
        t = time.perf_counter()
        manifest = prepare(
            [str(corpus)],
            tokenizer,
            args.work / "out",
            Settings(val_fraction=0.03),
            options=PrepareOptions(num_proc=cores, overwrite=True, show_progress=False),
        )
        full.append(time.perf_counter() - t)
    tokens = sum(len(e.ids) for e in encodings)
    written = manifest.tokens("train") + manifest.tokens("val")
    assert written == tokens + len(docs), (
        "prepare wrote other tokens than encode_batch produced (+1 EOS per doc)"
    )
    print(f"corpus: {len(docs):,} documents, {mb:.1f} MB, {tokens:,} tokens; {cores} cores")
    for name, times in [("encode_batch", raw), ("encode_batch_fast", fast), ("prepare", full)]:
        best = min(times)
        print(f"{name:<18} {best:6.2f} s  {tokens / best / 1e6:6.2f} M tokens/s  {mb / best:6.2f} MB/s")
    print(f"ratio prepare / encode_batch:      {min(raw) / min(full):.2f}  (target >= 0.9)")
    print(f"ratio prepare / encode_batch_fast: {min(fast) / min(full):.2f}")


if __name__ == "__main__":
    main()
