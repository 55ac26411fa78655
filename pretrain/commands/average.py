"""Average the weights of checkpoints of one architecture and tokenizer into a model checkpoint
usable by export-hf, generate and init_from (`pretrain.model.average`).

`CKPT CKPT ... -o OUT` averages the named checkpoints (a model soup; uniform unless --weights);
`--last K [--every S] RUN_DIR -o OUT` is LaWA: the latest K checkpoints of a run at multiples of
S steps. `--ema` averages (or,
with one checkpoint, extracts) the EMA weights the checkpoints hold.
"""

from __future__ import annotations

import argparse

from pretrain.errors import UserError

HELP = "average checkpoints (LaWA along a run, soups across runs) or extract EMA weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="checkpoints to average (with --last: one RUN_DIR)"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="model checkpoint file to write")
    parser.add_argument("--weights", help="comma-separated weights, one per checkpoint (normalized to sum 1)")
    parser.add_argument(
        "--last", type=int, metavar="K", help="LaWA: average the latest K checkpoints of RUN_DIR"
    )
    parser.add_argument(
        "--every", type=int, metavar="S", help="LaWA: only checkpoints at multiples of S steps"
    )
    parser.add_argument("--ema", action="store_true", help="average the EMA weights the checkpoints hold")


def run(args: argparse.Namespace) -> int:
    from pretrain.model.average import average_checkpoints
    from pretrain.model.checkpoint import check_model_output, save_model_checkpoint
    from pretrain.run_dir import RunDir

    if args.last is None and args.every is not None:
        raise UserError("--every goes with --last K RUN_DIR")
    if args.last is not None:
        if len(args.checkpoints) != 1:
            raise UserError(
                "--last K takes one RUN_DIR (or checkpoints directory), not a list of checkpoints"
            )
        if args.weights is not None:
            raise UserError("--weights goes with a list of checkpoints, not with --last (LaWA is uniform)")
        paths = RunDir(args.checkpoints[0]).lawa_checkpoints(args.last, args.every)
    else:
        paths = args.checkpoints
    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
    check_model_output(args.output, paths)
    checkpoint = average_checkpoints(paths, weights, ema=args.ema)
    out = save_model_checkpoint(args.output, checkpoint)
    kind = "EMA weights of" if args.ema else "weights of"
    print(f"averaged the {kind} {len(paths)} checkpoint(s):")
    for entry in checkpoint.meta["source"]["checkpoints"]:
        print(f"  {entry['weight']:.4f}  {entry['path']}")
    print(f"wrote {out}")
    return 0
