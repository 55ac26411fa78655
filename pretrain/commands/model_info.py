"""Print parameter counts, training FLOPs per token and a training-memory estimate of a preset.

pretrain model-info NAME [--seq-len N] [--micro-batch B] [--shards S]
"""

from __future__ import annotations

import argparse
import json

from pretrain.model.config import PRESETS

HELP = "parameters, FLOPs per token and training memory of a model preset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"model preset: {', '.join(PRESETS)}")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the preset's context)")
    parser.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per device for the activation estimate"
    )
    parser.add_argument(
        "--shards", type=int, default=1, help="FSDP ranks the weights/grads/optimizer are sharded over"
    )


def run(args: argparse.Namespace) -> int:
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
