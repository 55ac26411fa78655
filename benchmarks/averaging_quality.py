"""Measurement: validation loss of a run's last checkpoint vs the LaWA average of its last K
checkpoints vs the EMA weights it holds.

Reads the run's recipe (the newest `RUN_DIR/logs/version_*/config.yaml` that `pretrain fit`
writes) for its validation data, then evaluates each set of weights on the same validation
windows as training's validation (up to `data.val_tokens` per source), token-weighted, in fp32.
The LaWA average takes the latest K checkpoints at multiples of S steps (`pretrain average --last K
--every S`); the EMA row needs a run trained with the `pretrain.train.callbacks.ema.EMA` callback. To keep
enough checkpoints, train with e.g. `--checkpoint.every_n_steps 10 --checkpoint.pin_every_n_steps 10`.

Run: python benchmarks/averaging_quality.py RUN_DIR [--last 5] [--every S] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.data.loader import build_val_datasets
from pretrain.model import Llama
from pretrain.model.attention import document_ids
from pretrain.model.average import average_checkpoints
from pretrain.model.checkpoint import ModelCheckpoint
from pretrain.run_dir import RunDir, list_checkpoints
from pretrain.train.evaluation import evaluate


def run_recipe(run_dir: Path) -> dict:
    """The resolved recipe of the run's latest launch."""
    recipe = RunDir(run_dir).latest_config()
    if not recipe:
        raise SystemExit(
            f"{run_dir}/logs/version_*/config.yaml not found: is {run_dir} a `pretrain fit` run?"
        )
    return recipe


def validation_loss(checkpoint: ModelCheckpoint, recipe: dict, device: torch.device) -> dict[str, float]:
    """Token-weighted validation loss per source, through the trainer's own evaluation
    (`pretrain.train.evaluation.evaluate`, as `PretrainModule` validates)."""
    data, model_args = recipe["data"], recipe["model"]
    model = Llama(checkpoint.config)
    model.load_state_dict(checkpoint.state_dict)
    model.to(device).eval()
    seq_len = data["seq_len"]
    datasets = build_val_datasets(
        {name: (s["path"], s.get("weight", 1.0)) for name, s in data["sources"].items()},
        seq_len=seq_len,
        micro_batch_size=data["micro_batch_size"],
        max_samples=data["val_tokens"] // seq_len if data.get("val_tokens") else None,
    )
    eos_id = checkpoint.meta.get("eos_id")

    def summed_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        doc_ids = document_ids(inputs, eos_id) if model_args.get("document_masking") else None
        logits = model(inputs, doc_ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    return {source: float(loss) for source, loss in evaluate(summed_loss, datasets, device).items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--last", type=int, default=5, help="LaWA: how many checkpoints to average")
    parser.add_argument("--every", type=int, help="LaWA: checkpoints at multiples of S steps (default: any)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    recipe = run_recipe(args.run_dir)
    device = torch.device(args.device)
    last_step, last = list_checkpoints(args.run_dir / "checkpoints")[-1]
    chosen = RunDir(args.run_dir).lawa_checkpoints(args.last, args.every)
    steps = [int(p.name.split("-")[1].split(".")[0]) for p in chosen]
    rows = [
        (f"last checkpoint (step {last_step})", average_checkpoints([last])),
        (f"LaWA: last {len(chosen)} (steps {', '.join(map(str, steps))})", average_checkpoints(chosen)),
    ]
    ema_callback = next(
        (c for c in recipe["trainer"].get("callbacks") or [] if c["class_path"].endswith(".EMA")), None
    )
    if ema_callback is not None:
        decay = ema_callback.get("init_args", {}).get("decay", "default")
        rows.append((f"EMA at step {last_step} (decay {decay})", average_checkpoints([last], ema=True)))
    else:
        print("no EMA row: the run was not trained with the pretrain.train.callbacks.ema.EMA callback")
    results = [(label, validation_loss(checkpoint, recipe, device)) for label, checkpoint in rows]
    sources = list(results[0][1])
    width = max(len(label) for label, _ in results)
    print(f"{'weights':<{width}}  " + "  ".join(f"{s + ' loss':>14} {'ppl':>8}" for s in sources))
    for label, losses in results:
        cells = "  ".join(f"{losses[s]:>14.4f} {math.exp(losses[s]):>8.2f}" for s in sources)
        print(f"{label:<{width}}  {cells}")


if __name__ == "__main__":
    main()
