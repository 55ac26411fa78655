"""Parameter counts, training FLOPs per token, and a training-memory estimate for a `LlamaConfig`.

FLOPs per token (forward + backward), the PaLM convention (Chowdhery et al. 2022, appendix B)
that TinyLlama and Megatron MFU figures use:

    flops_per_token = 6 * N_active + 12 * n_layers * dim * seq_len

N_active counts the weights that take part in matrix multiplies for one token: every linear
layer and the LM head, not the embedding lookup or norm gains; in a sparse MoE only top_k of
the n_experts experts. The second term is attention's QK^T and AV products (2 matmuls x 2 FLOPs
x 3 for forward+backward), not halved for the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.config import LlamaConfig


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int  # input embedding (also the LM head when tied)
    lm_head: int  # 0 when tied to the embedding
    norms: int
    per_layer_attention: int
    per_layer_mlp: int  # all experts for a MoE
    per_layer_mlp_active: int  # the top_k experts a token uses, plus the router
    n_layers: int

    @property
    def active_matmul(self) -> int:
        """Weights multiplied per token: attention + active MLP per layer, and the LM head."""
        head = self.lm_head or self.embedding
        return self.n_layers * (self.per_layer_attention + self.per_layer_mlp_active) + head


def count_parameters(c: LlamaConfig) -> ParameterCounts:
    attention = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
    expert = 3 * c.dim * c.mlp_hidden
    if c.is_moe:
        router = c.dim * c.n_experts
        mlp, mlp_active = c.n_experts * expert + router, c.moe_top_k * expert + router
    else:
        mlp = mlp_active = expert
    embedding = c.vocab_size * c.dim
    lm_head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    norms = (2 * c.n_layers + 1) * c.dim
    total = embedding + lm_head + norms + c.n_layers * (attention + mlp)
    return ParameterCounts(total, embedding, lm_head, norms, attention, mlp, mlp_active, c.n_layers)


def flops_per_token(c: LlamaConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (module docstring); `seq_len` defaults to the context length."""
    seq_len = seq_len or c.max_seq_len
    return 6 * count_parameters(c).active_matmul + 12 * c.n_layers * c.dim * seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    states_bytes: int  # fp32 weights + fp32 grads + AdamW's two fp32 moments, per device
    activations_bytes_per_sequence: int  # bf16 activations kept for backward, no recomputation


def training_memory(c: LlamaConfig, seq_len: int | None = None, shards: int = 1) -> MemoryEstimate:
    """Rough training memory with AdamW under bf16-mixed precision (fp32 master weights).

    States: 16 bytes per parameter (4 weight + 4 grad + 8 AdamW), divided over `shards` FSDP ranks.
    Activations per sequence: 34 * seq_len * dim bytes per layer (Korthikanti et al. 2022, with a
    fused attention kernel that stores no T x T scores) plus the fp32 logits and their gradient
    (8 * seq_len * vocab bytes). An estimate for planning micro-batch sizes, not a measurement.
    """
    seq_len = seq_len or c.max_seq_len
    states = 16 * count_parameters(c).total // shards
    activations = 34 * seq_len * c.dim * c.n_layers + 8 * seq_len * c.vocab_size
    return MemoryEstimate(states, activations)
