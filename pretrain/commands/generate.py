"""Sample text with a KV cache, all prompts in one batch; optionally proxy-tuned
(logits = M_large + alpha * (M_expert - M_base)). See `pretrain.model.generate`.

Prints each prompt followed by its completion.
"""

from __future__ import annotations

import argparse

from pretrain.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


HELP = "sample text from a checkpoint or HF directory (KV cache, batched; optional proxy tuning)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="CKPT_OR_HF_DIR", help="a pretrain checkpoint or a Hugging Face model directory"
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for a batch of prompts)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to add per prompt (default 64)"
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="default 0.8; 0 = greedy")
    parser.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of probability >= P")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32)")
    parser.add_argument("--proxy-expert", metavar="SMALL_TUNED", help="proxy tuning: the small tuned model")
    parser.add_argument("--proxy-base", metavar="SMALL_BASE", help="proxy tuning: the small untuned model")
    parser.add_argument(
        "--proxy-alpha", type=float, default=1.0, help="weight of the (expert - base) logits (default 1.0)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from pretrain.model.generate import (
        Sampling,
        check_same_tokenizer,
        encode_prompt,
        generate,
        load_generation_model,
    )

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if (args.proxy_expert is None) != (args.proxy_base is None):
        raise UserError("proxy tuning needs both --proxy-expert and --proxy-base")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    large = load_generation_model(args.model, device, dtype)
    models = [(large.model, 1.0)]
    if args.proxy_expert is not None:
        expert = load_generation_model(args.proxy_expert, device, dtype)
        base = load_generation_model(args.proxy_base, device, dtype)
        check_same_tokenizer([large, expert, base])
        models += [(expert.model, args.proxy_alpha), (base.model, -args.proxy_alpha)]
    prompts = [encode_prompt(large, text) for text in args.prompt]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    completions = generate(models, prompts, args.max_new_tokens, sampling, large.eos_ids, generator)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if len(prompts) > 1:
            print(f"--- [{i}] ---")
        print(large.tokenizer.decode(prompt + completion, skip_special_tokens=True))
    return 0
