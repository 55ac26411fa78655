"""Prepare StarCoderData, TinyLlama's code data, from a local download.

Expected layout (the Hugging Face release bigcode/starcoderdata, downloaded as is):

    ROOT/python/train-00000-of-00059.parquet ... ROOT/<language>/train-*.parquet
    columns: max_stars_repo_path, max_stars_repo_name, max_stars_count, id, content

Every language folder is read (TinyLlama used them all); --languages picks some. The source
code is in the `content` column. Validation documents are carved by text hash.

Run: python data/starcoder/prepare.py --root ROOT --tokenizer tokenizer.json [--out DIR]
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
    parser.add_argument("--root", type=Path, required=True, help="the downloaded starcoderdata folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json (TinyLlama: Llama-2's)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="default: %(default)s")
    parser.add_argument("--languages", nargs="+", default=["*"], help="language folders (default: all)")
    parser.add_argument("--val-fraction", type=float, default=0.0005)
    parser.add_argument("--num-proc", type=int, default=None, help="default: all CPUs")
    args = parser.parse_args()
    patterns = [str(args.root / language / "*.parquet") for language in args.languages]
    settings = Settings(text_field="content", val_fraction=args.val_fraction)
    prepare(patterns, args.tokenizer, args.out, settings, num_proc=args.num_proc)


if __name__ == "__main__":
    main()
