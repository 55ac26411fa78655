"""Prepare StarCoderData, TinyLlama's code data, straight from the Hub or from a copy.

By default the Hub repository bigcode/starcoderdata is read directly (`--hub`; it is gated:
accept its terms on the Hub and log in first), each file fetched when reached and removed once
tokenized. With --root, a local copy (the release downloaded as is) is read instead. The layout:

    ROOT/python/train-00000-of-00059.parquet ... ROOT/<language>/train-*.parquet
    columns: max_stars_repo_path, max_stars_repo_name, max_stars_count, id, content

Every language folder is read (TinyLlama used them all); --languages picks some. The source
code is in the `content` column. Validation documents are carved by text hash.

Run: python data/starcoder/prepare.py [--root ROOT] [--tokenizer TOKENIZER] [--out DIR] [--languages python ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.data.prepare.hub import parse_size
from pretrain.data.prepare.pipeline import prepare
from pretrain.data.prepare.settings import PrepareOptions, Settings

HERE = Path(__file__).resolve().parent
LLAMA2_TOKENIZER = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"  # the Llama-2 tokenizer, ungated


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, help="a downloaded copy (default: read the Hub repository)")
    parser.add_argument("--hub", default="hf://bigcode/starcoderdata", help="default: %(default)s")
    parser.add_argument("--tokenizer", default=LLAMA2_TOKENIZER, help="default: %(default)s (Llama-2's)")
    parser.add_argument("--cache-max", default="20GB", help="raw Hub files on disk at once (default: 20GB)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="default: %(default)s")
    parser.add_argument("--languages", nargs="+", default=["*"], help="language folders (default: all)")
    parser.add_argument("--val-fraction", type=float, default=0.0005)
    parser.add_argument("--num-proc", type=int, default=None, help="default: all CPUs")
    args = parser.parse_args()
    if args.root:
        patterns = [str(args.root / language / "*.parquet") for language in args.languages]
    else:
        patterns = [f"{args.hub}?files={language}/*.parquet" for language in args.languages]
    settings = Settings(text_field="content", val_fraction=args.val_fraction)
    prepare(
        patterns,
        args.tokenizer,
        args.out,
        settings,
        options=PrepareOptions(num_proc=args.num_proc, cache_max=parse_size(args.cache_max)),
    )


if __name__ == "__main__":
    main()
