"""Train a tokenizer, turn raw text into token shards, describe a prepared dataset.

pretrain data train-tokenizer --input GLOB... --vocab-size N --output tokenizer.json
pretrain data prepare --input GLOB... --tokenizer tokenizer.json --output DIR [--num-proc N] ...
pretrain data info DIR
pretrain data show DIR --shard train/shard_00003.bin --offset K [--tokens N]
"""

from __future__ import annotations

import argparse

from pretrain.data.prepare.settings import PrepareOptions, Settings
from pretrain.errors import UserError

HELP = "train a tokenizer, prepare token shards, inspect a dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    hub_input = (
        "input files, folders or globs, or Hub datasets: hf://OWNER/NAME[@REV][?config=C&split=S&files=GLOB] "
        "(or hf:///local/mirror; a literal @ # ? %% is written %%40 %%23 %%3F %%25)"
    )
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with EOS/BOS/PAD tokens")
    p.add_argument("--input", nargs="+", required=True, metavar="GLOB", help=hub_input)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="where to write tokenizer.json")
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    _cache_arguments(p)
    p.set_defaults(handler=_train_tokenizer)

    d = Settings()
    p = sub.add_parser("prepare", help="tokenize raw text into token shards (parallel, resumable)")
    p.add_argument("--input", nargs="+", required=True, metavar="GLOB", help=hub_input)
    p.add_argument(
        "--tokenizer",
        required=True,
        help="a tokenizer.json, a folder holding one, or a Hub model repo OWNER/NAME[@REV] (or hf://OWNER/NAME[@REV])",
    )
    p.add_argument("--output", required=True, help="dataset directory to write")
    p.add_argument(
        "--text-field", default=d.text_field, help=f"field holding the text (default: {d.text_field})"
    )
    p.add_argument("--num-proc", type=int, default=None, help="worker processes (default: all CPUs)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"share of documents, chosen by a hash of their text, for validation (default: {d.val_fraction})",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=d.shard_tokens,
        help=f"start a new shard before a document that would overflow this (default: {d.shard_tokens:,})",
    )
    p.add_argument("--bos", action="store_true", help="also start every document with BOS")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="leave out records whose (dotted) KEY equals VALUE, e.g. meta.redpajama_set_name=RedPajamaGithub",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad record instead of skipping it"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset or unfinished run in --output")
    p.add_argument(
        "--dtype", choices=["auto", "uint16", "uint32"], default="auto", help="token dtype (default: auto)"
    )
    p.add_argument("--eos-token", help="end-of-document token (default: found by name)")
    p.add_argument("--bos-token", help="beginning-of-document token (default: found by name)")
    _cache_arguments(p)
    p.set_defaults(handler=_prepare)

    p = sub.add_parser("verify", help="check a prepared dataset's shards: checksums and token ids")
    p.add_argument(
        "dirs", nargs="+", metavar="DIR", help="dataset directories written by `pretrain data prepare`"
    )
    p.add_argument("--sample", type=int, metavar="N", help="check N random shards per dataset (default: all)")
    p.set_defaults(handler=_verify)

    p = sub.add_parser("info", help="print a prepared dataset's manifest in human form")
    p.add_argument("dir", help="a dataset directory written by `pretrain data prepare`")
    p.set_defaults(handler=_info)

    p = sub.add_parser(
        "show", help="print the text at a shard position (e.g. a bad step's samples from incidents.jsonl)"
    )
    p.add_argument("dir", help="a dataset directory written by `pretrain data prepare`")
    p.add_argument(
        "--shard", required=True, help="a shard file as the manifest names it, e.g. train/shard_00003.bin"
    )
    p.add_argument("--offset", type=int, required=True, help="token offset in that shard")
    p.add_argument(
        "--tokens", type=int, default=65, help="how many tokens to decode (default 65: seq_len + 1 of tiny)"
    )
    p.set_defaults(handler=_show)


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", help="where Hub files wait while they are used (default: beside the output)"
    )
    p.add_argument(
        "--cache-max", default="20GB", help="the most the Hub file cache may hold at once (default: 20GB)"
    )  # = pretrain.data.prepare.settings.DEFAULT_CACHE_BYTES


def run(args: argparse.Namespace) -> int:
    return args.handler(args)


def _train_tokenizer(args: argparse.Namespace) -> int:
    from pretrain.data.prepare.hub import parse_size
    from pretrain.data.prepare.train_tokenizer import train_tokenizer

    info = train_tokenizer(
        args.input, args.vocab_size, args.output, args.text_field, args.cache_dir, parse_size(args.cache_max)
    )
    print(
        f"wrote {info.path}: vocab {info.vocab_size:,}, eos {info.eos_id}, bos {info.bos_id}, pad {info.pad_id}, "
        f"fingerprint {info.fingerprint[:16]}"
    )
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pretrain.data.prepare.hub import parse_size
    from pretrain.data.prepare.pipeline import prepare

    settings = Settings(args.text_field, args.val_fraction, args.shard_tokens, args.bos, tuple(args.exclude))
    prepare(
        args.input,
        args.tokenizer,
        args.output,
        settings,
        options=PrepareOptions(
            num_proc=args.num_proc,
            strict=args.strict,
            overwrite=args.overwrite,
            dtype=args.dtype,
            eos_token=args.eos_token,
            bos_token=args.bos_token,
            cache_dir=args.cache_dir,
            cache_max=parse_size(args.cache_max),
        ),
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pretrain.data.shards import load_manifest
    from pretrain.data.verify import verify

    if args.sample is not None and args.sample < 1:
        raise UserError(f"--sample must be at least 1, got {args.sample}")
    print(verify([load_manifest(d) for d in args.dirs], args.sample))
    return 0


def _info(args: argparse.Namespace) -> int:
    from pretrain.data.shards import describe, load_manifest

    print(describe(load_manifest(args.dir)))
    return 0


def _show(args: argparse.Namespace) -> int:
    from pretrain.data.shards import load_manifest, read_tokens
    from pretrain.data.tokenizer import load_tokenizer

    manifest = load_manifest(args.dir)
    tokens = read_tokens(manifest, args.shard, args.offset, args.tokens)
    tokenizer = load_tokenizer(manifest.tokenizer_path).tokenizer
    print(f"{manifest.root / args.shard} tokens [{args.offset:,}, {args.offset + len(tokens):,}):")
    print(tokenizer.decode(tokens.tolist(), skip_special_tokens=False))
    return 0
