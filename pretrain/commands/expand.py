"""LLaMA Pro block expansion: insert copies of transformer blocks whose attention output and MLP
down projections are zero, so the deeper model computes exactly the same function.

Writes a model checkpoint that records which blocks are new (train them alone with
model.trainable_blocks: new).
"""

from __future__ import annotations

import argparse

from pretrain.errors import UserError

HELP = "LLaMA Pro block expansion: insert zero-output copies of blocks (same function, more layers)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="CKPT_OR_HF_DIR", help="a checkpoint of ours or a local HF directory"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="model checkpoint file to write")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--every", type=int, metavar="K", help="insert a copy after every K-th block")
    where.add_argument(
        "--positions", metavar="I,J,...", help="insert a copy after each of these blocks (0-based indices)"
    )


def run(args: argparse.Namespace) -> int:
    from pretrain.model.checkpoint import check_model_output, save_model_checkpoint
    from pretrain.model.expand import expand_checkpoint

    positions = None
    if args.positions is not None:
        try:
            positions = [int(p) for p in args.positions.split(",")]
        except ValueError:
            raise UserError(
                f"--positions {args.positions!r}: expected comma-separated block indices"
            ) from None
    check_model_output(args.output, [args.source])
    checkpoint = expand_checkpoint(args.source, args.every, positions)
    out = save_model_checkpoint(args.output, checkpoint)
    record = checkpoint.meta["expansion"]
    print(
        f"{checkpoint.meta['source']['n_layers']} -> {checkpoint.config.n_layers} layers; new blocks "
        f"{record['new_layers']} (copies of {record['copied_from']}); wrote {out}"
    )
    print(
        f"train them alone with model.model_overrides.n_layers: {checkpoint.config.n_layers}, "
        "model.init_from: OUT and model.trainable_blocks: new"
    )
    return 0
