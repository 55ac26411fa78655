"""The Llama model (dense or sparse MoE), its presets, attention backends, and HF conversion.

Names are imported lazily (PEP 562), so importing `pretrain.model.config` (the CLI does, for
`pretrain --help`) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "PRESETS": "pretrain.model.config",
    "LlamaConfig": "pretrain.model.config",
    "get_preset": "pretrain.model.config",
    "Llama": "pretrain.model.llama",
    "LlamaOutput": "pretrain.model.llama",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
