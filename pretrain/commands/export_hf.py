"""Convert a checkpoint to a Hugging Face LlamaForCausalLM / MixtralForCausalLM directory.

Writes config.json + model.safetensors (+ tokenizer files) for transformers. CHECKPOINT is any
form `pretrain.model.checkpoint` reads; a plain state-dict file needs --preset.
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
    print(f"wrote {out}/config.json and {out}/model.safetensors ({tokenizer_note})")
    return 0
