"""Convert a checkpoint to a Hugging Face LlamaForCausalLM / MixtralForCausalLM directory.

Writes config.json, generation_config.json and model.safetensors (+ tokenizer.json and
tokenizer_config.json) for transformers. CHECKPOINT is any form `pretrain.model.checkpoint` reads;
a plain state-dict file needs --preset. Clients see the special tokens as training did
(`pretrain.model.hf`): `bos_token` is the token before every document (BOS if the data was
prepared with --bos, else EOS) and the tokenizer adds BOS to a text only in the first case.
Checkpoints written before this convention stored the tokenizer's BOS even for data without one,
and export as if the data had BOS.
"""

from __future__ import annotations

import argparse

HELP = "convert a checkpoint to a Hugging Face LlamaForCausalLM / MixtralForCausalLM directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a pretrain checkpoint (or plain state dict with --preset)"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--preset", help="model preset, needed only for a plain state-dict file")


def run(args: argparse.Namespace) -> int:
    from pretrain.model.checkpoint import load_model_checkpoint
    from pretrain.model.hf import save_hf

    checkpoint = load_model_checkpoint(args.checkpoint, preset=args.preset)
    meta = checkpoint.meta
    out = save_hf(
        args.out_dir,
        checkpoint.state_dict,
        checkpoint.config,
        checkpoint.tokenizer_json,
        bos_id=meta.get("bos_id"),
        eos_id=meta.get("eos_id"),
    )
    tokenizer_note = "with tokenizer" if checkpoint.tokenizer_json else "no tokenizer in the checkpoint"
    print(f"wrote {out}/config.json, generation_config.json and model.safetensors ({tokenizer_note})")
    return 0
