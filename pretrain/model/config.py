"""Model configuration (`LlamaConfig`) and the named presets (`tiny`, `llama-120m`, `tinyllama-1.1b`, ...)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pretrain.errors import UserError

# Execution settings that checkpoints written before they left the architecture still carry.
LEGACY_RUNTIME_FIELDS = ("attention_backend",)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama decoder; `n_experts > 0` turns every feed-forward into a sparse MoE.

    Architecture only: how a run executes it (attention kernel, compile, activation
    checkpointing, loss chunking) is set per run (`PretrainModule`), never compared between
    checkpoints.
    """

    vocab_size: int = 32000
    dim: int = 2048
    n_layers: int = 22
    n_heads: int = 32
    n_kv_heads: int = 4
    mlp_hidden: int = 5632
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    # Sparse mixture of experts (Mixtral-style); 0 experts means a dense SwiGLU MLP.
    n_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float | None = None  # None: no capacity limit, no token is ever dropped

    def __post_init__(self) -> None:
        checks = [
            (self.dim % self.n_heads == 0, f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"),
            (
                self.n_heads % self.n_kv_heads == 0,
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})",
            ),
            ((self.dim // self.n_heads) % 2 == 0, "head dimension (dim / n_heads) must be even for RoPE"),
            (
                self.n_experts == 0 or 1 <= self.moe_top_k <= self.n_experts,
                "moe_top_k must be in [1, n_experts]",
            ),
            (
                self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
                "moe_capacity_factor must be positive (or null for no limit)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid model config: {message}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def init_std(self) -> float:
        """TinyLlama's std for embeddings and linear weights: sqrt(2 / (5 d))."""
        return math.sqrt(2.0 / (5.0 * self.dim))

    @property
    def residual_init_std(self) -> float:
        """TinyLlama's std for the projections that write into the residual stream: 1 / (sqrt(d) * n_layers)."""
        return 1.0 / (math.sqrt(self.dim) * self.n_layers)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in LEGACY_RUNTIME_FIELDS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"unknown model config field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)


PRESETS: dict[str, LlamaConfig] = {
    # CPU quickstart and tests: ~7M parameters, trains in minutes on 2 cores.
    "tiny": LlamaConfig(
        vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=768, max_seq_len=256
    ),
    # Sparse-MoE variant of `tiny`: 4 experts, top-2 routing.
    "tiny-moe": LlamaConfig(
        vocab_size=8192,
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=384,
        max_seq_len=256,
        n_experts=4,
        moe_top_k=2,
    ),
    # Single-GPU experiments: ~125M parameters with the Llama-2 vocabulary.
    "llama-120m": LlamaConfig(
        vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, mlp_hidden=2048, max_seq_len=2048
    ),
    # TinyLlama 1.1B (Zhang et al. 2024): exactly 1,100,048,384 parameters.
    "tinyllama-1.1b": LlamaConfig(
        vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, mlp_hidden=5632, max_seq_len=2048
    ),
}


def get_preset(name: str) -> LlamaConfig:
    """The preset called `name`, or a clear error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
