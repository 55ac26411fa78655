"""Benchmark: the spike guard's false positives and its detection delay (`pretrain.train.spike_guard`).

Prints, in one run on the pystdlib corpus with the `tiny` recipe (configs/tiny.yaml):
- an ordinary run of `--steps` optimizer steps (warmup + cosine): steps skipped, gradient-norm
  outliers kept, rollbacks; and how many steps the previous rule (a z-score above 6 on the loss
  *or* the gradient norm against the mean and standard deviation of the last 100 good steps)
  would have skipped on the same logged losses and gradient norms;
- a continual stage on another corpus (C headers from /usr/include, tokenized with the
  pystdlib tokenizer) resumed from the ordinary run with `--data.allow_data_change true` for
  `--continual-steps` steps: the same counts, and the previous rule's verdict on its first steps
  against the history saved in the checkpoint it starts from;
- the learning rate raised x1000 at the middle checkpoint of the ordinary run: the steps until
  the guard's first skipped step and until its divergence verdict.

Run: python benchmarks/spike_guard.py [--steps 600] [--continual-steps 150] [--scratch /tmp/guard-bench]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pretrain.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(Path(sys.executable).with_name("pretrain"))
DATA = ROOT / "data" / "pystdlib" / "out"
TOKENS_PER_STEP = 8192  # configs/tiny.yaml


def fit(run_dir: Path, *args: str) -> str:
    """`pretrain fit` on the tiny recipe; its stderr."""
    command = [PRETRAIN, "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(run_dir)]
    command += ["--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode not in (0, 3):
        sys.exit(f"pretrain fit failed:\n{result.stderr[-3000:]}")
    return result.stderr


def logged(run_dir: Path, name: str) -> dict[int, float]:
    series = RunDir(run_dir).read_logs().series.get(name)
    return {} if series is None else dict(zip(series.steps.tolist(), series.values.tolist(), strict=True))


def previous_rule(history: list[tuple[float, float]], steps: list[tuple[float, float]]) -> list[int]:
    """Indices of `steps` (loss, grad norm) the previous guard skipped: z > 6 on either, against the
    mean and standard deviation of the last 100 good steps, once 10 are known."""
    window = list(history)[-100:]
    skipped = []
    for i, (loss, norm) in enumerate(steps):
        bad = False
        if len(window) >= 10:
            for column, value in ((0, loss), (1, norm)):
                values = np.array([entry[column] for entry in window])
                if values.std() > 1e-12 and (value - values.mean()) / values.std() > 6:
                    bad = True
        if bad:
            skipped.append(i)
        else:
            window = (window + [(loss, norm)])[-100:]
    return skipped


def counts(stderr: str, run_dir: Path) -> str:
    skipped = stderr.count(": skipped, ")
    rollbacks = stderr.count("rolled back to")
    outliers = max(logged(run_dir, "train/grad_norm_outliers").values(), default=0)
    return f"{skipped} skipped, {int(outliers)} gradient-norm outliers kept, {rollbacks} rollbacks"


def c_headers(scratch: Path) -> Path:
    """The C headers of this machine as a dataset with the pystdlib tokenizer."""
    out = scratch / "c-headers"
    if (out / "manifest.json").exists():
        return out
    raw = scratch / "c-headers.jsonl"
    with open(raw, "w") as f:
        for path in sorted(glob.glob("/usr/include/**/*.h", recursive=True))[:4000]:
            text = Path(path).read_text(errors="replace")
            if text.strip():
                f.write(json.dumps({"text": text}) + "\n")
    subprocess.run(
        [PRETRAIN, "data", "prepare", "--input", str(raw), "--tokenizer", str(DATA / "tokenizer.json")]
        + ["--output", str(out), "--val-fraction", "0.02", "--num-proc", "2"],
        check=True,
        capture_output=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--continual-steps", type=int, default=150)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/guard-bench"))
    args = parser.parse_args()
    if not (DATA / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "data" / "pystdlib" / "prepare.py")], check=True)
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    every = args.steps // 2

    normal = args.scratch / "normal"
    stderr = fit(
        normal,
        "--max_tokens",
        str(args.steps * TOKENS_PER_STEP),
        "--checkpoint.every_n_steps",
        str(every),
        "--checkpoint.keep_last",
        "3",
    )
    losses, norms = logged(normal, "train/loss"), logged(normal, "train/grad_norm")
    series = [(losses[s], norms[s]) for s in sorted(losses)]
    old = previous_rule([], series)
    print(f"ordinary run, {len(series)} steps: {counts(stderr, normal)}")
    print(f"  previous rule on the same steps: {len(old)} skipped ({len(old) / len(series):.2%}): {old}")

    stage = args.scratch / "continual"
    shutil.copytree(normal, stage)
    headers = c_headers(args.scratch)
    start = torch.load(stage / "checkpoints" / f"step-{args.steps:08d}.ckpt", weights_only=True)
    history = [tuple(entry) for entry in start["pretrain"]["spike_guard"]["history"]]
    stderr = fit(
        stage,
        "--max_tokens",
        str((args.steps + args.continual_steps) * TOKENS_PER_STEP),
        "--data.sources",
        json.dumps({"headers": {"path": str(headers), "weight": 1.0}}),
        "--data.allow_data_change",
        "true",
    )
    losses, norms = logged(stage, "train/loss"), logged(stage, "train/grad_norm")
    new_steps = [(losses[s], norms[s]) for s in sorted(losses) if s >= args.steps]
    old = previous_rule(history, new_steps)
    first_ten = all(i in old for i in range(10))
    print(f"continual stage on C headers, {len(new_steps)} steps: {counts(stderr, stage)}")
    print(
        f"  first loss {new_steps[0][0]:.3f} vs the saved history's mean {np.mean([h[0] for h in history]):.3f}; "
        f"previous rule: {len(old)} of {len(new_steps)} skipped"
        + (", the first 10 in a row: it would have stopped the stage at its 10th step" if first_ten else "")
    )

    jump = args.scratch / "lr-x1000"
    shutil.copytree(normal, jump)
    for later in (jump / "checkpoints").glob("step-*.ckpt"):
        if int(re.findall(r"\d+", later.name)[0]) > every:
            later.unlink()
    stderr = fit(
        jump,
        "--max_tokens",
        str(args.steps * TOKENS_PER_STEP),
        "--model.lr_schedule.init_args.max_lr",
        "3.0",
        "--model.on_divergence",
        "stop",
    )
    skipped = [int(m) for m in re.findall(r"spike guard: step (\d+): skipped", stderr)]
    verdict = re.search(r"divergence from step (\d+)", stderr)
    first_bad = skipped[0] - every if skipped else math.nan
    print(
        f"LR x1000 from step {every}: first skipped step after {first_bad} step(s); divergence verdict "
        f"{'after ' + str(len(skipped)) + ' skipped step(s)' if verdict else 'never'}"
    )


if __name__ == "__main__":
    main()
