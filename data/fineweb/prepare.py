"""Prepare FineWeb-Edu (or FineWeb) straight from the Hub or from a copy.

By default the Hub repository HuggingFaceFW/fineweb-edu is read directly (`--hub`), config
`--config sample-10BT` (its README's configs: default = every dump, sample-10BT, sample-100BT,
sample-350BT, CC-MAIN-...), each file fetched when reached and removed once tokenized. With
--root, a local copy is read instead, --subset naming the folder. The layout:

    ROOT/data/CC-MAIN-2024-10/000_00000.parquet ...   one folder per crawl dump
    ROOT/sample/10BT/000_00000.parquet ...            the sampled subsets
    columns: text, id, dump, url, date, file_path, language, language_score, token_count

--subset picks the folder under ROOT to read (default: sample/10BT; "data" reads every dump).
Validation documents are carved by text hash.

Run: python data/fineweb/prepare.py --tokenizer TOKENIZER [--config sample-10BT] [--root ROOT [--subset sample/10BT]]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.data.prepare.hub import parse_size
from pretrain.data.prepare.pipeline import prepare
from pretrain.data.prepare.settings import PrepareOptions, Settings

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, help="a downloaded copy (default: read the Hub repository)")
    parser.add_argument("--hub", default="hf://HuggingFaceFW/fineweb-edu", help="default: %(default)s")
    parser.add_argument("--config", default="sample-10BT", help="Hub config (default: %(default)s)")
    parser.add_argument(
        "--tokenizer", required=True, help="a tokenizer.json, a folder holding one, or a Hub repo"
    )
    parser.add_argument(
        "--subset", default="sample/10BT", help="with --root: folder under ROOT (default: %(default)s)"
    )
    parser.add_argument("--cache-max", default="20GB", help="raw Hub files on disk at once (default: 20GB)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="default: %(default)s")
    parser.add_argument("--val-fraction", type=float, default=0.0005)
    parser.add_argument("--num-proc", type=int, default=None, help="default: all CPUs")
    args = parser.parse_args()
    settings = Settings(text_field="text", val_fraction=args.val_fraction)
    source = (
        str(args.root / args.subset / "**" / "*.parquet") if args.root else f"{args.hub}?config={args.config}"
    )
    prepare(
        [source],
        args.tokenizer,
        args.out,
        settings,
        options=PrepareOptions(num_proc=args.num_proc, cache_max=parse_size(args.cache_max)),
    )


if __name__ == "__main__":
    main()
