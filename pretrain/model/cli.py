"""`pretrain model-info`, `pretrain export-hf`, `pretrain import-hf` and `pretrain expand`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pretrain.model.config import PRESETS


def register(subcommands: Any) -> None:
    info = subcommands.add_parser(
        "model-info",
        help="parameters, FLOPs per token and training memory of a model preset",
        description="Print parameter counts, training FLOPs per token and a training-memory estimate.",
    )
    info.add_argument("name", metavar="NAME", help=f"model preset: {', '.join(PRESETS)}")
    info.add_argument("--seq-len", type=int, help="sequence length (default: the preset's context)")
    info.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per device for the activation estimate"
    )
    info.add_argument(
        "--shards", type=int, default=1, help="FSDP ranks the weights/grads/optimizer are sharded over"
    )
    info.set_defaults(run=_model_info)

    export = subcommands.add_parser(
        "export-hf",
        help="convert a checkpoint to a Hugging Face LlamaForCausalLM / MixtralForCausalLM directory",
        description="Write config.json + model.safetensors (+ tokenizer files) for transformers.",
    )
    export.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a pretrain model checkpoint (or plain state dict with --preset)",
    )
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--preset", help="model preset, needed only for a plain state-dict file")
    export.set_defaults(run=_export_hf)

    imp = subcommands.add_parser(
        "import-hf",
        help="make a pretrain checkpoint from a local Hugging Face Llama/Mixtral directory",
        description="Convert a local HF model directory (config.json + safetensors) into a pretrain checkpoint.",
    )
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("out", metavar="OUT", help="checkpoint file to write")
    imp.set_defaults(run=_import_hf)
    _register_expand(subcommands)


def _model_info(args: argparse.Namespace) -> int:
    from pretrain.model.config import get_preset
    from pretrain.model.flops import count_parameters, flops_per_token, training_memory

    config = get_preset(args.name)
    seq_len = args.seq_len or config.max_seq_len
    counts = count_parameters(config)
    flops = flops_per_token(config, seq_len)
    memory = training_memory(config, seq_len, args.shards)
    activations = memory.activations_bytes_per_sequence * args.micro_batch
    gib = 1024**3
    per_layer = counts.per_layer_attention + counts.per_layer_mlp
    rows = [
        ("preset", args.name),
        ("config", json.dumps(config.to_dict())),
        ("parameters", f"{counts.total:,} ({counts.total / 1e9:.3f} B)"),
        ("  embedding", f"{counts.embedding:,}"),
        ("  lm head", f"{counts.lm_head:,}" + (" (tied to the embedding)" if config.tie_embeddings else "")),
        (
            f"  per layer (x{config.n_layers})",
            f"{per_layer:,} (attention {counts.per_layer_attention:,} + mlp {counts.per_layer_mlp:,})",
        ),
        ("  norms", f"{counts.norms:,}"),
        ("active matmul params", f"{counts.active_matmul:,} per token"),
        (
            f"FLOPs per token (seq {seq_len})",
            f"{flops / 1e9:.3f} GFLOP = 6 * {counts.active_matmul:,} + 12 * {config.n_layers} * {config.dim} * {seq_len}",
        ),
        (
            f"training memory / device (AdamW, bf16-mixed, {args.shards} shard(s))",
            f"{(memory.states_bytes + activations) / gib:.2f} GiB = states {memory.states_bytes / gib:.2f} GiB "
            f"(16 B/param) + activations {activations / gib:.2f} GiB ({args.micro_batch} x {seq_len} tokens)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
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


def _import_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.model.checkpoint import ModelCheckpoint, save_model_checkpoint
    from pretrain.model.flops import count_parameters
    from pretrain.model.hf import load_hf

    config, state, tokenizer_json = load_hf(args.hf_dir)
    hf_config = json.loads((Path(args.hf_dir) / "config.json").read_text())
    meta = {
        "source": {"kind": "huggingface", "path": str(Path(args.hf_dir).resolve())},
        "bos_id": hf_config.get("bos_token_id"),
        "eos_id": hf_config.get("eos_token_id"),
    }
    out = save_model_checkpoint(args.out, ModelCheckpoint(config, state, tokenizer_json, meta))
    print(f"wrote {out} ({count_parameters(config).total:,} parameters)")
    return 0


def _register_expand(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "expand",
        help="LLaMA Pro block expansion: insert zero-output copies of blocks (same function, more layers)",
        description="Insert copies of transformer blocks whose attention output and MLP down projections "
        "are zero, so the deeper model computes exactly the same function; writes a model checkpoint "
        "that records which blocks are new (train them alone with model.trainable_blocks: new).",
    )
    parser.add_argument(
        "source", metavar="CKPT_OR_HF_DIR", help="a checkpoint of ours or a local HF directory"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="model checkpoint file to write")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--every", type=int, metavar="K", help="insert a copy after every K-th block")
    where.add_argument(
        "--positions", metavar="I,J,...", help="insert a copy after each of these blocks (0-based indices)"
    )
    parser.set_defaults(run=_expand)


def _expand(args: argparse.Namespace) -> int:
    from pretrain.errors import UserError
    from pretrain.model.checkpoint import save_model_checkpoint
    from pretrain.model.expand import expand_checkpoint

    positions = None
    if args.positions is not None:
        try:
            positions = [int(p) for p in args.positions.split(",")]
        except ValueError:
            raise UserError(
                f"--positions {args.positions!r}: expected comma-separated block indices"
            ) from None
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
