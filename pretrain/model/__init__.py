"""The Llama model (dense or sparse MoE), its presets, attention backends, and HF conversion."""

from pretrain.model.config import PRESETS, LlamaConfig, get_preset
from pretrain.model.llama import Llama, LlamaOutput

__all__ = ["PRESETS", "Llama", "LlamaConfig", "LlamaOutput", "get_preset"]
