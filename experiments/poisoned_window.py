"""Self-healing demonstration on CPU: a poisoned window of data, with and without rollback.

The pystdlib corpus (`data/pystdlib`) is copied and the windows the `tiny` recipe reads at
steps [--poison-at, --poison-at + --poison-steps) are overwritten with uniformly random tokens
(no model can do better than chance on them). Three runs of the same recipe, same seed:

  clean       the unpoisoned corpus
  rollback    the poisoned corpus with the default guard: the window is detected, rolled back
              and stepped over (incidents.jsonl names its samples)
  unguarded   the poisoned corpus with only non-finite steps skipped (`--model.spike_threshold null`):
              training goes through the window

Writes the loss curves (training and validation) and a results table:

    python experiments/poisoned_window.py [--out docs/divergence] [--steps 200] [--poison-at 120]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pretrain.data.loader import build_train_dataset  # noqa: E402
from pretrain.data.shards import content_fingerprint, load_manifest, sha256_file  # noqa: E402
from pretrain.data.tokens import TokenStream  # noqa: E402
from pretrain.files import write_json_atomic  # noqa: E402
from pretrain.run_dir import RunDir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(Path(sys.executable).with_name("pretrain"))
CLEAN = ROOT / "data" / "pystdlib" / "out"
SEQ_LEN, BATCH, SEED = 256, 32, 42  # configs/tiny.yaml: 8,192 tokens a step, the data module's seed


def poison(out: Path, first_step: int, steps: int) -> int:
    """Copy the clean corpus to `out` with the windows of the given steps made uniformly random;
    how many samples were poisoned."""
    shutil.copytree(CLEAN, out)
    manifest = load_manifest(out)
    order = build_train_dataset(
        {"pystdlib": str(out)}, seq_len=SEQ_LEN, global_batch_size=BATCH, micro_batch_size=16, seed=SEED
    )
    samples = order.origins(first_step * BATCH, (first_step + steps) * BATCH)
    stream = TokenStream(manifest, "train")
    names = [str(path.relative_to(out)) for path in stream.paths]
    rng = np.random.default_rng(0)
    shards: dict[str, np.ndarray] = {}
    for sample in samples:
        start = stream.starts[names.index(sample["shard"])] + sample["offset"]
        for position in range(start, start + SEQ_LEN + 1):
            shard, offset = stream.locate(position)
            tokens = shards.setdefault(shard, np.fromfile(out / shard, dtype=manifest.dtype))
            tokens[offset] = rng.integers(0, manifest.vocab_size)
    data = json.loads((out / "manifest.json").read_text())
    for shard, tokens in shards.items():
        tokens.tofile(out / shard)
        digest = sha256_file(out / shard)
        sidecar = (out / shard).with_suffix(".json")
        write_json_atomic(sidecar, json.loads(sidecar.read_text()) | {"sha256": digest})
        for entry in data["splits"]["train"]["shards"]:
            if entry["file"] == shard:
                entry["sha256"] = digest
    splits = {name: split["shards"] for name, split in data["splits"].items()}
    data["content_fingerprint"] = content_fingerprint(splits, data["tokenizer"]["fingerprint"], data["dtype"])
    write_json_atomic(out / "manifest.json", data)
    return len(samples)


def fit(run_dir: Path, data: Path, steps: int, *args: str) -> None:
    command = [PRETRAIN, "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(run_dir)]
    command += ["--max_tokens", str(steps * SEQ_LEN * BATCH), "--validate_every_steps", "20"]
    command += ["--checkpoint.every_n_steps", "20", "--trainer.log_every_n_steps", "1"]
    command += ["--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
    command += ["--data.sources", json.dumps({"pystdlib": {"path": str(data), "weight": 1.0}}), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{run_dir.name}: pretrain fit failed:\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "divergence")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/poisoned-window"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--poison-at", type=int, default=120)
    parser.add_argument("--poison-steps", type=int, default=10)
    args = parser.parse_args()
    if not (CLEAN / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "data" / "pystdlib" / "prepare.py")], check=True)
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    poisoned = args.scratch / "poisoned-data"
    count = poison(poisoned, args.poison_at, args.poison_steps)
    runs = {
        "clean": (CLEAN, []),
        "rollback": (poisoned, []),
        "unguarded": (poisoned, ["--model.spike_threshold", "null"]),
    }
    results = {}
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, (data, extra)) in enumerate(runs.items()):
        fit(args.scratch / name, data, args.steps, *extra)
        run = RunDir(args.scratch / name)
        log = run.read_logs()
        train, val = log.series["train/loss"], log.series["val/pystdlib/loss"]
        train_ax.plot(train.steps, train.values, color=f"C{i}", lw=1, label=name)
        val_ax.plot(val.steps, val.values, color=f"C{i}", marker="o", ms=3, label=name)
        incidents = run.incidents()
        for incident in incidents:
            first, last = incident["steps"]
            train_ax.axvspan(first, last + 1, color=f"C{i}", alpha=0.15)
        results[name] = {
            "final_val_loss": round(float(val.values[-1]), 4),
            "peak_train_loss_after_the_window": round(
                float(train.values[(train.steps >= args.poison_at + args.poison_steps)].max()), 4
            ),
            "incidents": [
                {k: e[k] for k in ("action", "steps", "skip", "skip_steps", "why")} for e in incidents
            ],
        }
    for ax, title in ((train_ax, "training loss"), (val_ax, "validation loss (pystdlib)")):
        ax.axvspan(args.poison_at, args.poison_at + args.poison_steps, color="red", alpha=0.08)
        ax.set(title=f"{title}; red: the poisoned window's steps", xlabel="step", ylabel="loss")
        ax.legend()
        ax.grid(alpha=0.3)
    args.out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out / "poisoned-window.png", dpi=110)
    summary = {
        "poisoned_samples": count,
        "poisoned_steps": [args.poison_at, args.poison_at + args.poison_steps - 1],
        "steps": args.steps,
        "runs": results,
    }
    (args.out / "poisoned-window.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
