"""Prepare the embedded default corpus: the running Python's own standard library source.

Every `.py` file of the interpreter's standard library (sysconfig's "stdlib" path, without
site-packages) is one document, read with its declared source encoding; nothing from outside
the machine is used. Writes the raw corpus beside --out (default: data/pystdlib/out), since a
dataset folder never holds its own inputs:

    out-raw/corpus.jsonl          one {"text", "path"} record per file
    out/tokenizer.json            a byte-level BPE trained on the corpus (vocab 8192)
    out/manifest.json, train/, val/   the token shards (`pretrain data info data/pystdlib/out`)

Run: python data/pystdlib/prepare.py [--out DIR] [--num-proc N] [--force]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tokenize
from pathlib import Path

from pretrain.data.prepare.pipeline import prepare
from pretrain.data.prepare.settings import PrepareOptions, Settings
from pretrain.data.shards import MANIFEST, describe, load_manifest
from pretrain.data.tokenizer import train_bpe

HERE = Path(__file__).resolve().parent


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def write_corpus(path: Path) -> list[str]:
    """One JSON line per readable stdlib file; files with a broken encoding declaration are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    with open(path, "w", encoding="utf-8") as out:
        for file in stdlib_files():
            try:
                with tokenize.open(file) as f:
                    text = f.read()
            except (SyntaxError, UnicodeDecodeError):  # deliberately broken test files
                continue
            if text:
                texts.append(text)
                out.write(json.dumps({"text": text, "path": str(file.relative_to(root))}) + "\n")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "out", help="output directory (default: %(default)s)"
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--val-fraction", type=float, default=0.03)
    parser.add_argument("--shard-tokens", type=int, default=2**22, help="small, so that reads cross shards")
    parser.add_argument("--num-proc", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--force", action="store_true", help="prepare again even if --out holds a dataset")
    args = parser.parse_args()

    if (args.out / MANIFEST).exists() and not args.force:
        print(describe(load_manifest(args.out)))
        print(f"already prepared; pass --force to redo ({args.out})")
        return
    raw = args.out.with_name(args.out.name + "-raw")
    raw.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = raw / "corpus.jsonl", args.out / "tokenizer.json"
    texts = write_corpus(corpus)
    print(f"corpus: {len(texts):,} files of {sysconfig.get_paths()['stdlib']} -> {corpus}")
    train_bpe(texts, args.vocab_size).save(str(tokenizer))
    print(f"tokenizer: byte-level BPE, vocab {args.vocab_size:,} -> {tokenizer}")
    settings = Settings(val_fraction=args.val_fraction, shard_tokens=args.shard_tokens)
    prepare(
        [str(corpus)],
        tokenizer,
        args.out,
        settings,
        options=PrepareOptions(num_proc=args.num_proc, overwrite=True),
    )


if __name__ == "__main__":
    main()
