"""Convert a local Hugging Face Llama/Mixtral directory (config.json + safetensors) into a model file.

pretrain import-hf HF_DIR OUT
"""

from __future__ import annotations

import argparse

HELP = "make a pretrain checkpoint from a local Hugging Face Llama/Mixtral directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="HF_DIR")
    parser.add_argument("out", metavar="OUT", help="checkpoint file to write")


def run(args: argparse.Namespace) -> int:
    from pretrain.errors import UserError
    from pretrain.model.checkpoint import (
        check_model_output,
        is_hf_dir,
        load_model_checkpoint,
        save_model_checkpoint,
    )
    from pretrain.model.flops import count_parameters

    if not is_hf_dir(args.hf_dir):
        raise UserError(
            f"{args.hf_dir} is not a Hugging Face model directory: {args.hf_dir}/config.json is missing"
        )
    check_model_output(args.out, [args.hf_dir])
    checkpoint = load_model_checkpoint(args.hf_dir)
    out = save_model_checkpoint(args.out, checkpoint)
    print(f"wrote {out} ({count_parameters(checkpoint.config).total:,} parameters)")
    return 0
