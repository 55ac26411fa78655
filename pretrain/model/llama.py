"""The Llama decoder, top to bottom: RMSNorm, RoPE, grouped-query attention, SwiGLU (or sparse MoE).

Architecture (Touvron et al. 2023; TinyLlama, Zhang et al. 2024): token embedding -> n_layers x
[x + Attention(RMSNorm(x)); x + FeedForward(RMSNorm(x))] -> RMSNorm -> LM head. No biases anywhere.
The LM head is untied from the embedding unless `tie_embeddings` is set.

Layout conventions (what `pretrain.model.hf` converts):
- `attn.qkv` is one fused projection whose output rows are [q heads | k heads | v heads].
- `gate_up` is one fused projection whose output rows are [gate | up]; the MLP is down(silu(gate) * up).
- RoPE rotates the two halves of each head (dimension i pairs with i + head_dim/2, the
  "rotate_half" layout of Hugging Face), not interleaved neighbours as in Meta's original code.

Initialization (TinyLlama's rule, `init_weights`): every weight matrix and the embedding are drawn
from N(0, sqrt(2 / (5 d))), except the two projections that write into the residual stream (the
attention output projection and the MLP down projection, experts' included), which use
N(0, 1 / (sqrt(d) * n_layers)). RMSNorm weights start at 1. For the 1.1B: 0.0140 and 0.0010.

Sparse MoE (Mixtral, Jiang et al. 2024): a linear router scores the experts, each token goes to
its top-k, weighted by a softmax over the selected logits. The load-balancing loss (Switch
Transformer, Fedus et al. 2022) is n_experts * sum_e f_e * p_e, with f_e the fraction of token
assignments routed to expert e and p_e its mean router probability: 1.0 when perfectly balanced.
It is returned to the caller, averaged over layers, to be weighted into the training loss.

Decoding (`pretrain generate`) passes a `KVCache`: each forward pass appends its tokens' keys and
values to the cache, attends over everything cached so far, and takes its RoPE positions from the
cache, so a prompt is read once and every new token costs one position. Training never passes one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.model.attention import AttentionFn, get_attention, masked_attention
from pretrain.model.config import LlamaConfig
from pretrain.model.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_cache(seq_len: int, head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin of every (position, frequency), stacked: shape (2, seq_len, head_dim), float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the positions in rope (2, T, D), or (2, B, T, D) for per-row
    positions: pairs are (i, i + D/2)."""
    cos, sin = rope[0][..., None, :], rope[1][..., None, :]
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x_float * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of the tokens decoded so far, one `LayerCache` per layer, `max_len` slots per row.

    Rows may be left-padded to a common prompt length: the first `pad[b]` slots of row b hold
    padding that no other token attends to, and row b's positions (hence its RoPE angles) count
    from its first real token, so each row computes what it would alone. `reserve(n)` claims the
    next n slots for a forward pass and builds its mask: a token attends to the real tokens up to
    and including itself (a padding token only to itself, so that no attention row is empty).
    """

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int,
        max_len: int,
        pad: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_len > config.max_seq_len:
            raise ValueError(f"KV cache of {max_len} slots exceeds max_seq_len {config.max_seq_len}")
        shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.layers = [
            LayerCache(
                self,
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(config.n_layers)
        ]
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.max_len = max_len
        self.start = self.length = 0  # the current forward pass fills slots [start, length)
        self.mask = torch.ones(batch_size, 1, 0, 0, dtype=torch.bool, device=device)

    def reserve(self, n: int) -> torch.Tensor:
        """Claim the next `n` slots for one forward pass; returns their positions (B, n)."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} + {n} tokens > {self.max_len} slots")
        self.start, self.length = self.length, self.length + n
        slots = torch.arange(self.start, self.length, device=self.pad.device)
        keys = torch.arange(self.length, device=self.pad.device)
        causal = keys[None, :] <= slots[:, None]  # (n, S)
        real = keys[None, None, :] >= self.pad[:, None, None]  # (B, 1, S)
        itself = keys[None, :] == slots[:, None]
        self.mask = ((causal & real) | itself)[:, None]  # (B, 1, n, S)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)


class LayerCache:
    """One layer's cached keys and values (B, max_len, H_kv, D), post-RoPE."""

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.cache, self.keys, self.values = cache, keys, values

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this pass's k, v in the reserved slots; q attends over all cached slots."""
        start, end = self.cache.start, self.cache.length
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        return masked_attention(q, self.keys[:, :end], self.values[:, :end], self.cache.mask)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, attend: AttentionFn) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_dim = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.dim, qkv_dim, bias=False)
        self.out_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.attend = attend

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        doc_ids: torch.Tensor | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(batch, seq_len, self.n_heads, self.head_dim), rope)
        k = apply_rope(k.view(batch, seq_len, self.n_kv_heads, self.head_dim), rope)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim)
        out = self.attend(q, k, v, doc_ids) if cache is None else cache.attend(q, k, v)
        return self.out_proj(out.reshape(batch, seq_len, q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts with top-k routing; returns (output, load-balancing loss)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.top_k, self.capacity_factor = config.moe_top_k, config.moe_capacity_factor
        self.router = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.dim, config.mlp_hidden) for _ in range(config.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, n_experts = x.shape[0], len(self.experts)
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        top_weights = (top_probs / top_probs.sum(dim=-1, keepdim=True)).to(x.dtype)

        capacity = n_tokens * self.top_k
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / n_experts)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            # Every expert runs (maybe on zero tokens) so that all parameters always get a gradient.
            token_idx, slot = torch.where(top_experts == e)
            token_idx, slot = token_idx[:capacity], slot[:capacity]  # first come, first served
            expert_out = expert(x[token_idx]) * top_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, expert_out)

        assigned_fraction = F.one_hot(top_experts, n_experts).float().sum(dim=(0, 1)) / (
            n_tokens * self.top_k
        )
        aux_loss = n_experts * (assigned_fraction * probs.mean(dim=0)).sum()
        return out.view(shape), aux_loss


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, attend: AttentionFn) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, attend)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config) if config.is_moe else MLP(config.dim, config.mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        doc_ids: torch.Tensor | None,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), rope, doc_ids, cache)
        if isinstance(self.mlp, MoE):
            mlp_out, aux_loss = self.mlp(self.mlp_norm(x))
        else:
            mlp_out, aux_loss = self.mlp(self.mlp_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + mlp_out, aux_loss


class LlamaOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab); None when the loss was computed in chunks
    aux_loss: torch.Tensor  # scalar: MoE load-balancing loss averaged over layers (0 for dense models)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy, when targets were given


class Llama(nn.Module):
    """The decoder of `config`; `attention_backend` is the attention kernel this instance runs
    (`pretrain.model.attention.BACKENDS`), an execution choice, not part of the architecture."""

    rope: torch.Tensor  # a non-persistent buffer (registered in __init__)

    def __init__(self, config: LlamaConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        attend = get_attention(attention_backend)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, attend) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.register_buffer("rope", torch.empty(2, config.max_seq_len, config.head_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize parameters by TinyLlama's rule (module docstring) and recompute the RoPE table.

        Call after `to_empty()` when the model was built on the meta device."""
        c = self.config
        self.rope.copy_(rope_cache(c.max_seq_len, c.head_dim, c.rope_base, device=self.rope.device))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual = name.endswith(("attn.out_proj", ".down"))
                nn.init.normal_(module.weight, mean=0.0, std=c.residual_init_std if residual else c.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        loss_chunk_tokens: int | None = None,
    ) -> LlamaOutput:
        """tokens (B, T) -> logits (B, T, vocab); `doc_ids` (B, T) enables per-document attention.

        With `targets` (B, T), also the mean cross-entropy; with `loss_chunk_tokens` as well, the
        loss is computed that many tokens at a time and the logits are never built (returned as
        None; `pretrain.model.loss`). With a `cache`, `tokens` continue the cached sequences."""
        seq_len = tokens.shape[1]
        if cache is None:
            if seq_len > self.config.max_seq_len:
                raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.config.max_seq_len}")
            rope = self.rope[:, :seq_len]
        elif doc_ids is not None:
            raise ValueError("document masking is not supported with a KV cache")
        else:
            rope = self.rope[:, cache.reserve(seq_len)]
        x = self.tok_embeddings(tokens)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            x, block_aux = block(x, rope, doc_ids, None if cache is None else cache.layers[i])
            aux_loss = aux_loss + block_aux
        x = self.norm(x)
        aux_loss = aux_loss / len(self.layers)
        if targets is not None and loss_chunk_tokens is not None:
            loss: torch.Tensor | None = linear_cross_entropy(
                x.flatten(0, 1), self.lm_head.weight, targets.flatten(), loss_chunk_tokens
            )
            return LlamaOutput(None, aux_loss, loss)
        logits = self.lm_head(x)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return LlamaOutput(logits, aux_loss, loss)

    def num_parameters(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
