"""Shared test helpers (fixtures live in conftest.py).

- `require(module)` imports an optional component a test needs. Locally a missing component
  skips the test; in CI (`PRETRAIN_REQUIRE_ALL=1`, set by `.ci/run`) it fails it, so a broken
  install can never hide behind a skip. Only tests that truly need a GPU may skip in CI.
- `recipe`, `run`, `train_losses`, `run_and_kill_after_checkpoint` (`run_and_kill_when`): a tiny CPU recipe and the
  real `pretrain` command in a subprocess, for training tests.
- `write_dataset`: synthetic datasets whose tokens name their own position (data order tests):
  a dataset's train stream is `offset + arange(n)` (uint32), so a window's first token tells
  which window it is and which source it came from.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml

from pretrain.data.shards import FORMAT, content_fingerprint
from pretrain.files import write_json_atomic

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


PRETRAIN = str(Path(sys.executable).with_name("pretrain"))
STEPS = 12
MODEL = {
    "vocab_size": 512,
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "mlp_hidden": 128,
    "max_seq_len": 64,
}


def recipe(tmp_path: Path, dataset: Path, run_dir: Path, **changes) -> Path:
    """A tiny CPU recipe: 16 sequences x 64 tokens per step, 12 steps, checkpoint every 4."""
    config = {
        "run_dir": str(run_dir),
        "validate_every_steps": 4,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "precision": "32-true",
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
        },
        "model": {
            "model": "tiny",
            "model_overrides": MODEL,
            "lr_schedule": {
                "class_path": "pretrain.train.schedules.WarmupCosine",
                "init_args": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
            },
        },
        "data": {
            "sources": {"stdlib": {"path": str(dataset), "weight": 1.0}},
            "seq_len": 64,
            "global_batch_tokens": 1024,
            "micro_batch_size": 8,
            "num_workers": 0,
            "val_tokens": 4096,
        },
        "checkpoint": {"every_n_steps": 4, "keep_last": 2},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss over all launches of a run (a later launch overrides re-done steps)."""
    losses: dict[int, float] = {}
    versions = sorted((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        if not (version / "metrics.csv").exists():  # a launch that failed before its first step
            continue
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([PRETRAIN, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged_steps(run_dir: Path) -> int:
    try:
        return len(train_losses(run_dir))
    except (OSError, ValueError, KeyError):  # the first rows are being written
        return 0


def run_and_kill_after_checkpoint(args: list[str], checkpoint: Path, timeout: float = 240) -> None:
    """Start `pretrain ...`; SIGKILL its whole process group once `checkpoint` is published and
    the log holds every step up to it (a hard kill may lose the one log row being written)."""
    step = int(checkpoint.name.split("-")[1].split(".")[0])
    run_and_kill_when(
        args,
        lambda: checkpoint.exists() and logged_steps(checkpoint.parent.parent) >= step,
        checkpoint.name,
        timeout,
    )


def run_and_kill_when(args: list[str], ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """Start `pretrain ...` and SIGKILL its whole process group as soon as `ready()` holds."""
    process = subprocess.Popen(
        [PRETRAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"training exited before {what}: {process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def write_dataset(
    root: Path,
    shard_sizes: list[int],
    offset: int = 0,
    val_sizes: tuple[int, ...] = (),
    tokenizer: str = "synthetic",
) -> Path:
    """A dataset in the shard format with train tokens offset + 0, 1, 2, ... split over shards."""
    splits: dict[str, list[dict]] = {}
    start = offset
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        (root / split).mkdir(parents=True, exist_ok=True)
        splits[split] = []
        for i, n in enumerate(sizes):
            name = f"{split}/shard_{i:05d}.bin"
            (root / name).write_bytes(np.arange(start, start + n, dtype="<u4").tobytes())
            splits[split].append({"file": name, "tokens": n, "documents": 1, "sha256": f"{start}+{n}"})
            start += n
    manifest = {
        "format": FORMAT,
        "dtype": "uint32",
        "tokenizer": {
            "fingerprint": tokenizer,
            "vocab_size": 2**32,
            "eos_id": 0,
            "bos_id": None,
            "pad_id": None,
        },
        "settings": {
            "text_field": "text",
            "val_fraction": 0.0,
            "shard_tokens": max(shard_sizes),
            "bos": False,
        },
        "inputs": [],
        "splits": {
            s: {"documents": len(v), "tokens": sum(e["tokens"] for e in v), "shards": v}
            for s, v in splits.items()
        },
        "skipped": {"total": 0, "by_reason": {}, "examples": []},
        "content_fingerprint": content_fingerprint(splits, tokenizer, "uint32"),
    }
    write_json_atomic(root / "manifest.json", manifest)
    return root


def units_done(out: Path) -> int:
    """Work units a running `prepare` into `out` has committed (0 before its first commit)."""
    try:
        return json.loads((out / ".prepare" / "state.json").read_text())["units_done"]
    except (OSError, ValueError):
        return 0
