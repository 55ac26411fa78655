"""Prepare SlimPajama-627B, TinyLlama's natural-language data, straight from the Hub or from a copy.

By default the Hub repository cerebras/SlimPajama-627B is read directly (`--hub`): each file is
fetched when reached and removed once tokenized, so the disk holds at most --cache-max of raw
data. With --root, a local copy (the release downloaded as is) is read instead. The layout:

    ROOT/train/chunk1/example_train_0.jsonl.zst ... ROOT/train/chunk10/...
    each line: {"text": "...", "meta": {"redpajama_set_name": "RedPajamaC4"}}

Like TinyLlama, the RedPajamaGithub subset is left out (StarCoderData covers code);
--keep-github keeps it. Validation documents are carved from the same files by text hash.

Run: python data/slimpajama/prepare.py [--root ROOT] [--tokenizer TOKENIZER] [--out DIR]
(TOKENIZER: a tokenizer.json, a folder holding one, or a Hub repo; default: TinyLlama's Llama-2 tokenizer)
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
    parser.add_argument("--hub", default="hf://cerebras/SlimPajama-627B", help="default: %(default)s")
    parser.add_argument("--tokenizer", default=LLAMA2_TOKENIZER, help="default: %(default)s (Llama-2's)")
    parser.add_argument("--cache-max", default="20GB", help="raw Hub files on disk at once (default: 20GB)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="default: %(default)s")
    parser.add_argument("--val-fraction", type=float, default=0.0005)
    parser.add_argument("--num-proc", type=int, default=None, help="default: all CPUs")
    parser.add_argument("--keep-github", action="store_true", help="keep the RedPajamaGithub subset")
    args = parser.parse_args()
    exclude = () if args.keep_github else ("meta.redpajama_set_name=RedPajamaGithub",)
    settings = Settings(text_field="text", val_fraction=args.val_fraction, exclude=exclude)
    source = str(args.root / "train" / "**" / "*.jsonl.zst") if args.root else f"{args.hub}?split=train"
    prepare(
        [source],
        args.tokenizer,
        args.out,
        settings,
        options=PrepareOptions(num_proc=args.num_proc, cache_max=parse_size(args.cache_max)),
    )


if __name__ == "__main__":
    main()
