"""Benchmark: `prepare` tokens/s on Hub-style input vs the same files given as local paths.

The pystdlib corpus (prepared with data/pystdlib/prepare.py if missing) is written as a local
folder laid out as a Hub dataset repository: --files compressed JSON-lines files under
data/, a README with a config. The two inputs

    local:  DIR/data/*.jsonl.zst
    hub:    hf://DIR?config=default    (resolved by `datasets`, each file copied into the bounded
                                        cache when reached and removed once committed)

are prepared alternately (--repeats times each, same tokenizer, same --num-proc), and the output
shards are compared. This is the "already cached" case of the Hub path (no network): what it
measures is the cost of resolution, the cache and the per-file scheduling. Target: >= 0.9x.

Run: python benchmarks/hub_prepare.py [--work DIR] [--files 64] [--repeats 3] [--num-proc N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from pretrain.data.prepare.pipeline import prepare
from pretrain.data.prepare.settings import PrepareOptions, Settings

ROOT = Path(__file__).resolve().parents[1]
README = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.jsonl.zst\n---\n"


def make_repo(corpus: Path, repo: Path, files: int) -> None:
    """The corpus's documents dealt round-robin into `files` .jsonl.zst files."""
    lines = corpus.read_text().splitlines(keepends=True)
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(README)
    for i in range(files):
        data = "".join(lines[i::files]).encode()
        (repo / "data" / f"part-{i:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))


def shards(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("shard_*"))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pretrain-bench-hub")
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    corpus_dir = args.work / "pystdlib"
    if not (corpus_dir / "manifest.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "data/pystdlib/prepare.py"), "--out", str(corpus_dir)], check=True
        )
    tokenizer = corpus_dir / "tokenizer.json"
    repo = args.work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    make_repo(args.work / "pystdlib-raw" / "corpus.jsonl", repo, args.files)
    inputs = {"local": str(repo / "data" / "*.jsonl.zst"), "hub": f"hf://{repo}?config=default"}
    rates: dict[str, list[float]] = {name: [] for name in inputs}
    tokens = 0
    for _ in range(args.repeats):
        for name, pattern in inputs.items():
            out = args.work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            manifest = prepare(
                [pattern],
                tokenizer,
                out,
                Settings(),
                options=PrepareOptions(num_proc=args.num_proc, show_progress=False),
            )
            elapsed = time.perf_counter() - start
            tokens = manifest.tokens("train") + manifest.tokens("val")
            rates[name].append(tokens / elapsed)
            print(f"{name:6s} {tokens:,} tokens in {elapsed:5.2f} s: {tokens / elapsed / 1e6:5.2f}M tokens/s")
    same = shards(args.work / "out-local") == shards(args.work / "out-hub")
    local, hub = statistics.median(rates["local"]), statistics.median(rates["hub"])
    size = sum(p.stat().st_size for p in (repo / "data").iterdir())
    print(
        f"\n{args.files} files, {size / 1e6:.1f} MB compressed, {tokens:,} tokens, --num-proc {args.num_proc}"
    )
    print(f"local paths  {local / 1e6:6.2f}M tokens/s (median of {args.repeats})")
    print(f"hf:// input  {hub / 1e6:6.2f}M tokens/s")
    print(f"ratio        {hub / local:6.2f}x   identical shards: {same}")
    print(json.dumps({"local_tokens_per_s": local, "hub_tokens_per_s": hub, "ratio": hub / local}))


if __name__ == "__main__":
    main()
