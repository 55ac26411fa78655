"""Text generation with a KV cache, batched, optionally steered by proxy tuning (`pretrain generate`).

- Tokenizer: the one stored in the checkpoint (or `tokenizer.json` of the HF directory), encoding
  as Hugging Face clients of the export do (`pretrain.model.hf.client_tokenizer_json`): BOS first
  only when training put BOS before every document (a Llama tokenizer; data prepared with
  --bos). An empty prompt starts from that BOS, or else from EOS, the token that precedes every
  document in packed training data.
- Batching: all prompts decode together. Shorter prompts are left-padded; the KV cache masks the
  padding and counts each row's positions from its own first token, so a prompt decodes to the
  same tokens alone or in a batch (`pretrain.model.llama.KVCache`). The prompt is read in one
  forward pass, then each step feeds one token per row.
- Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / T), keeping only the
  `top_k` most likely tokens, then the smallest set whose probability reaches `top_p`. A row stops
  at EOS; decoding stops when every row has, or after `max_new_tokens`.
- Proxy tuning (Liu et al. 2024): each step's logits are M_large + alpha * (M_expert - M_base),
  from three models with their own caches. The three must share one tokenizer (compared by
  fingerprint); logits are combined over the smallest vocabulary of the three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from tokenizers import Tokenizer

from pretrain.data.tokenizer import EOS_NAMES, fingerprint
from pretrain.errors import UserError
from pretrain.model import Llama, LlamaConfig
from pretrain.model.checkpoint import load_model_checkpoint
from pretrain.model.hf import client_tokenizer_json, document_prefix_id
from pretrain.model.llama import KVCache, rope_cache


@dataclass
class GenerationModel:
    """A model ready for decoding, with the tokenizer and special tokens its checkpoint names."""

    model: Llama
    tokenizer: Tokenizer
    fingerprint: str
    eos_ids: set[int]
    bos_id: int | None
    path: str
    tokens_seen: int | None = None  # training tokens behind the weights, where the checkpoint says


@dataclass(frozen=True)
class Sampling:
    """How `next_tokens` picks a token: greedy at temperature 0, else filtered sampling."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def load_generation_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ema: bool = False,
) -> GenerationModel:
    """Load any form `pretrain.model.checkpoint` reads (an HF directory too; `ema`: the EMA copy)."""
    checkpoint = load_model_checkpoint(path, ema=ema)
    config, state, tokenizer_json = checkpoint.config, checkpoint.state_dict, checkpoint.tokenizer_json
    eos, bos = checkpoint.meta.get("eos_id"), checkpoint.meta.get("bos_id")
    if tokenizer_json is None:
        raise UserError(
            f"{path} holds no tokenizer; generation needs one (a checkpoint written by `pretrain fit`, "
            "or a Hugging Face directory with tokenizer.json)"
        )
    tokenizer = Tokenizer.from_str(client_tokenizer_json(tokenizer_json, bos))  # encodes as HF clients do
    if eos is None:
        eos = next((i for n in EOS_NAMES if (i := tokenizer.token_to_id(n)) is not None), None)
    eos_ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    model = _build(config, state, torch.device(device), dtype)
    tokens = checkpoint.meta.get("tokens_seen")
    return GenerationModel(model, tokenizer, fingerprint(tokenizer), eos_ids, bos, str(path), tokens)


def _build(
    config: LlamaConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Llama:
    """The model with `state` loaded, on `device` in `dtype`, without a random initialization first."""
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty made two tensors of the one tied weight
        model.lm_head.weight = model.tok_embeddings.weight
    model.load_state_dict(state)
    model.rope.copy_(rope_cache(config.max_seq_len, config.head_dim, config.rope_base, device=device))
    return model.to(dtype).eval()


def next_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of `logits` (B, V) by the rule of the module docstring."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        more_likely_mass = probs.cumsum(dim=-1) - probs  # 0 for the top token: it always stays
        sorted_logits = sorted_logits.masked_fill(more_likely_mass >= sampling.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def combine_logits(weights: Sequence[float], logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i weights[i] * logits[i]; for proxy tuning [1, alpha, -alpha] as large + alpha * (expert -
    base), the difference first, so that an expert equal to its base gives the large model exactly."""
    if len(logits) == 3 and weights[2] == -weights[1]:
        return weights[0] * logits[0] + weights[1] * (logits[1] - logits[2])
    # A tensor for any non-empty `logits` (sum's start value, 0, only types the empty case).
    return cast(torch.Tensor, sum(weight * out for weight, out in zip(weights, logits, strict=True)))


@torch.no_grad()
def generate(
    models: Sequence[tuple[Llama, float]],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
    all_done: Callable[[bool], bool] = bool,
) -> list[list[int]]:
    """The new tokens of each prompt (ending with EOS where one was produced).

    Each step's logits are sum_i weight_i * logits of models[i]: [(model, 1.0)] decodes one model,
    [(large, 1), (expert, alpha), (base, -alpha)] is proxy tuning. `all_done(this batch is done)`
    decides when to stop early (several processes decoding one sharded model stop together).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    context = min(model.config.max_seq_len for model, _ in models)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise UserError(
            f"the longest prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {context} tokens"
        )
    first = models[0][0]
    device = first.rope.device
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.tensor(list(prompt), device=device)
    vocab = min(model.config.vocab_size for model, _ in models)
    caches = [
        KVCache(model.config, len(prompts), longest + max_new_tokens, pad, device, model.lm_head.weight.dtype)
        for model, _ in models
    ]

    weights = [weight for _, weight in models]

    def step_logits(inputs: torch.Tensor) -> torch.Tensor:
        outs = [
            model(inputs, cache=cache).logits[:, -1, :vocab].float()
            for (model, _), cache in zip(models, caches)
        ]
        return combine_logits(weights, outs)

    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    logits = step_logits(tokens)
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, generator)
        new.append(chosen)
        done |= torch.isin(chosen, eos)
        if all_done(bool(done.all())) or step == max_new_tokens - 1:
            break
        logits = step_logits(chosen[:, None])
    out = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    return [_until_eos(row, eos_ids) for row in out]


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def encode_prompt(loaded: GenerationModel, text: str) -> list[int]:
    """Token ids of a prompt (module docstring: post-processor, empty prompt)."""
    ids = loaded.tokenizer.encode(text).ids
    if ids:
        return ids
    if not loaded.eos_ids and loaded.bos_id is None:
        raise UserError(
            "the prompt is empty and the tokenizer has neither a BOS nor an EOS token to start from"
        )
    return [document_prefix_id(loaded.bos_id, min(loaded.eos_ids, default=-1))]


def check_same_tokenizer(models: Sequence[GenerationModel]) -> None:
    """Proxy tuning adds logits token by token: every model must use the same tokenizer."""
    first = models[0]
    for other in models[1:]:
        if other.fingerprint != first.fingerprint:
            raise UserError(
                f"proxy tuning needs one shared tokenizer, but {other.path} (tokenizer {other.fingerprint[:12]}) "
                f"and {first.path} (tokenizer {first.fingerprint[:12]}) differ"
            )
