"""Prepare SlimPajama-627B, TinyLlama's natural-language data, from a local download.

Expected layout (the Hugging Face release cerebras/SlimPajama-627B, downloaded as is):

    ROOT/train/chunk1/example_train_0.jsonl.zst ... ROOT/train/chunk10/...
    each line: {"text": "...", "meta": {"redpajama_set_name": "RedPajamaC4"}}

Like TinyLlama, the RedPajamaGithub subset is left out (StarCoderData covers code);
--keep-github keeps it. Validation documents are carved from the same files by text hash.

Run: python data/slimpajama/prepare.py --root ROOT --tokenizer tokenizer.json [--out DIR]
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
    parser.add_argument("--root", type=Path, required=True, help="the downloaded SlimPajama-627B folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json (TinyLlama: Llama-2's)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="default: %(default)s")
    parser.add_argument("--val-fraction", type=float, default=0.0005)
    parser.add_argument("--num-proc", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--keep-github", action="store_true", help="keep the RedPajamaGithub subset")
    args = parser.parse_args()
    exclude = () if args.keep_github else ("meta.redpajama_set_name=RedPajamaGithub",)
    settings = Settings(text_field="text", val_fraction=args.val_fraction, exclude=exclude)
    prepare([str(args.root / "train" / "**" / "*.jsonl.zst")], args.tokenizer, args.out, settings,
            num_proc=args.num_proc)  # fmt: skip


if __name__ == "__main__":
    main()
