"""Shared test helpers.

`require(module)` imports an optional component a test needs. Locally a missing component
skips the test; in CI (`PRETRAIN_REQUIRE_ALL=1`, set by `.ci/run`) it fails it, so a
broken install can never hide behind a skip. Only tests that truly need a GPU may skip in CI.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
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


STDLIB_FILES = 150  # documents in the small real-text corpus used by training tests


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset of real text (the first Python stdlib modules), 512-token BPE."""
    import glob
    import json
    import sysconfig

    from pretrain.cli import main

    root = tmp_path_factory.mktemp("tiny_dataset")
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:STDLIB_FILES]
    with open(root / "corpus.jsonl", "w") as f:
        for path in files:
            f.write(json.dumps({"text": Path(path).read_text(errors="replace")}) + "\n")
    corpus, tokenizer = str(root / "corpus.jsonl"), str(root / "tokenizer.json")
    assert (
        main(["data", "train-tokenizer", "--input", corpus, "--vocab-size", "512", "--output", tokenizer])
        == 0
    )
    out = root / "out"
    args = ["data", "prepare", "--input", corpus, "--tokenizer", tokenizer, "--output", str(out)]
    assert main(args + ["--val-fraction", "0.1", "--num-proc", "2"]) == 0
    return out


def bare_trainer(**kwargs):
    """A CPU Lightning Trainer with no logger, checkpointing, progress bar, summary or validation."""
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    return L.Trainer(**(defaults | kwargs))
