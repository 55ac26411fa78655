"""Measurement: memory of `pretrain average` over K training checkpoints vs one model's size.

Writes K training checkpoints in the layout `pretrain fit` saves (weights under `state_dict`,
AdamW's two moments under `optimizer_states`, the `pretrain` entry) for a preset with random
weights, runs `pretrain average` on them in a subprocess, and samples its /proc status every
10 ms: the peak of anonymous memory (what can run a machine out of memory) and of resident file
pages (the memory-mapped checkpoints, which the kernel can drop at any time).

    python benchmarks/averaging_memory.py [--preset llama-120m] [--k 5] [--dir /tmp/avg-mem]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.model import Llama, get_preset


def write_checkpoints(directory: Path, preset: str, k: int) -> tuple[int, int]:
    """K fake training checkpoints; returns (model bytes in fp32, one checkpoint's file bytes)."""
    config = get_preset(preset)
    model = Llama(config)
    state = model.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    for i in range(k):
        with torch.no_grad():
            weights = {f"model.{name}": t + 0.01 * i for name, t in state.items()}
        moments = {
            j: {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
            for j, t in enumerate(state.values())
        }
        payload = {
            "state_dict": weights,
            "optimizer_states": [{"state": moments, "param_groups": []}],
            "global_step": 100 * (i + 1),
            "pretrain": {"model_config": config.to_dict(), "tokenizer": None, "global_step": 100 * (i + 1)},
        }
        torch.save(payload, directory / f"step-{100 * (i + 1):08d}.ckpt")
    return model_bytes, (directory / "step-00000100.ckpt").stat().st_size


def peak_memory(command: list[str]) -> tuple[int, int, float]:
    """Run `command`; peak RssAnon and RssFile in bytes (sampled every 10 ms) and the wall time."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_file = 0
    while process.poll() is None:
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
            )
            peak_anon = max(peak_anon, int(fields["RssAnon"].split()[0]) * 1024)
            peak_file = max(peak_file, int(fields["RssFile"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.01)
    if process.returncode != 0:
        sys.exit(f"pretrain average failed: {process.stderr.read().decode()[-2000:]}")
    return peak_anon, peak_file, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-120m")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/pretrain-averaging-memory")
    args = parser.parse_args()
    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    try:
        model_bytes, file_bytes = write_checkpoints(directory, args.preset, args.k)
        paths = sorted(str(p) for p in directory.glob("step-*.ckpt"))
        pretrain = str(Path(sys.executable).with_name("pretrain"))
        baseline, _, _ = peak_memory([sys.executable, "-c", "import torch, pretrain.model.average"])
        anon, file, seconds = peak_memory([pretrain, "average", *paths, "-o", str(directory / "avg.pt")])
        gib = 2**30
        print(
            f"{args.k} checkpoints of {args.preset}: model {model_bytes / gib:.2f} GiB in fp32, "
            f"each file {file_bytes / gib:.2f} GiB (weights + AdamW moments); {seconds:.1f} s"
        )
        print(
            f"peak anonymous memory {anon / gib:.2f} GiB = {anon / model_bytes:.2f} x one model "
            f"(the Python + torch process alone: {baseline / gib:.2f} GiB)"
        )
        print(f"peak resident file pages (memory-mapped checkpoints) {file / gib:.2f} GiB")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
