"""Shared fixtures (helpers live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import STEPS, recipe, run, train_losses

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


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted single-process run."""
    tmp = tmp_path_factory.mktemp("reference")
    run(["fit", "--config", str(recipe(tmp, tiny_dataset, tmp / "ref"))])
    losses = train_losses(tmp / "ref")
    assert sorted(losses) == list(range(STEPS))
    assert losses[STEPS - 1] < losses[0] - 0.3  # it learns
    return losses


@pytest.fixture(autouse=True)
def lightning_logs_to_this_tests_stderr():
    """Lightning's log handlers keep the stderr they saw at import: under pytest's capture that is an
    earlier test's, closed by now. Point them at this test's."""
    import logging
    import sys

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream
    yield
