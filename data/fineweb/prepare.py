"""Prepare FineWeb (or FineWeb-Edu) from a local download.

Expected layout (the Hugging Face releases HuggingFaceFW/fineweb and fineweb-edu):

    ROOT/data/CC-MAIN-2024-10/000_00000.parquet ...   one folder per crawl dump
    ROOT/sample/10BT/000_00000.parquet ...            the sampled subsets
    columns: text, id, dump, url, date, file_path, language, language_score, token_count

--subset picks the folder under ROOT to read (default: sample/10BT; "data" reads every dump).
Validation documents are carved by text hash.

Run: python data/fineweb/prepare.py --root ROOT --tokenizer tokenizer.json [--subset sample/10BT]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.data.prepare import prepare
from pretrain.data.settings import Settings

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="the downloaded fineweb folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer.json")
    parser.add_argument("--subset", default="sample/10BT", help="folder under ROOT (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="default: %(default)s")
    parser.add_argument("--val-fraction", type=float, default=0.0005)
    parser.add_argument("--num-proc", type=int, default=None, help="default: all CPUs")
    args = parser.parse_args()
    settings = Settings(text_field="text", val_fraction=args.val_fraction)
    prepare([str(args.root / args.subset / "**" / "*.parquet")], args.tokenizer, args.out, settings,
            num_proc=args.num_proc)  # fmt: skip


if __name__ == "__main__":
    main()
