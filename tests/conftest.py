"""Shared test helpers.

`require(module)` imports an optional component a test needs. Locally a missing component
skips the test; in CI (`PRETRAIN_REQUIRE_ALL=1`, set by `.ci/run`) it fails it, so a
broken install can never hide behind a skip. Only tests that truly need a GPU may skip in CI.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ALL = os.environ.get("PRETRAIN_REQUIRE_ALL") == "1"


def require(module: str) -> ModuleType:
    """Import `module` or skip (locally) / fail (in CI) the calling test."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if REQUIRE_ALL:
            pytest.fail(f"required component {module!r} is missing in CI: {err}")
        pytest.skip(f"{module} not installed: {err}")


def require_gpu() -> None:
    """Skip unless a CUDA GPU is present (allowed to skip in CI: CI has no GPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
