"""Continual-pretraining demonstration on CPU: forgetting of corpus A vs adaptation to corpus B.

Corpus A is the pystdlib code corpus (`data/pystdlib`); corpus B is English prose found on this
machine at run time (the README/NEWS/copyright/documentation files under /usr/share/doc),
tokenized with A's tokenizer. The `tiny` preset is pretrained on A, then continued on B under:

  1. no re-warm, no replay      constant LR at stage A's final LR
  2. re-warm + re-decay         linear warmup (1% of the stage) to A's peak, cosine to 0.1x peak
  3. re-warm + 5% replay        as 2, with 5% of samples from A
  4. re-warm + 25% replay       as 2, with 25% of samples from A
  5. infinite schedule          A trained with warmup -> cooldown -> constant; B continues the
                                constant phase (branch_from, no re-warm) and anneals over its last 20%
  6. LLaMA Pro expansion        stage A's cosine model with a zero-output copy after every 2nd block
                                (`pretrain expand --every 2`: 4 -> 6 layers); only the 2 new blocks
                                train (trainable_blocks: new), with arm 2's schedule, no replay

Every arm trains the same number of stage-B steps (replay arms draw their share of those samples
from A; arm 5, a branch, reads B from its inherited data position). The final checkpoint of each
arm is evaluated on the validation splits of A and B (same windows for all). Writes a markdown report and a plot:

    python experiments/continual_pretraining.py [--out docs/continual-pretraining] [--steps-a 60] [--steps-b 30]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pretrain.data.loader import build_val_datasets
from pretrain.model import Llama
from pretrain.model.checkpoint import load_model_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PEAK, FLOOR = 3e-3, 3e-4
BATCH_TOKENS, SEQ_LEN = 8192, 256


def english_documents(limit_bytes: int) -> list[str]:
    """Prose documentation installed on this machine (decompressed), up to `limit_bytes`."""
    docs, total = [], 0
    for path in sorted(Path("/usr/share/doc").rglob("*")):
        name = path.name.lower()
        if (
            not path.is_file()
            or "changelog" in name
            or path.suffix in (".html", ".htm", ".png", ".svg", ".py", ".c")
        ):
            continue
        if not (
            name.startswith(("readme", "news", "copyright", "faq", "authors", "todo", "thanks"))
            or name.endswith((".md", ".md.gz", ".txt", ".txt.gz", ".rst", ".rst.gz"))
        ):
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, gzip.BadGzipFile):
            continue
        if len(text) > 200:
            docs.append(text)
            total += len(text)
        if total >= limit_bytes:
            break
    return docs


def pretrain(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pretrain.cli", *args], check=True, stderr=subprocess.DEVNULL)


def fit(out: Path, name: str, sources: dict, schedule: dict, steps: int, **extra) -> Path:
    """Train one stage with the tiny recipe; returns its final checkpoint."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config.update(
        run_dir=str(out / "runs" / name), max_tokens=steps * BATCH_TOKENS, validate_every_steps=steps
    )
    config["model"]["lr_schedule"] = schedule
    config["data"]["sources"] = sources
    config["checkpoint"] = {"every_n_steps": steps, "keep_last": 1}
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    final = out / "runs" / name / "checkpoints" / f"step-{config['max_tokens'] // BATCH_TOKENS:08d}.ckpt"
    if final.exists():  # already trained by an earlier invocation
        return final
    recipe = out / "recipes" / f"{name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(config))
    began = time.time()
    pretrain("fit", "--config", str(recipe))
    print(f"  {name}: {time.time() - began:.0f} s", flush=True)
    return final


@torch.no_grad()
def evaluate(checkpoint: Path, datasets: dict[str, Path], max_samples: int = 128) -> dict[str, float]:
    saved = load_model_checkpoint(checkpoint)
    model = Llama(saved.config).eval()
    model.load_state_dict(saved.state_dict)
    losses = {}
    for name, path in datasets.items():
        val = build_val_datasets({name: path}, seq_len=SEQ_LEN, micro_batch_size=16, max_samples=max_samples)[
            name
        ]
        total, count = 0.0, 0
        for inputs, targets in val:
            logits = model(inputs).logits
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
        losses[name] = total / count
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "continual-pretraining")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "continual-demo")
    parser.add_argument("--steps-a", type=int, default=60)
    parser.add_argument("--steps-b", type=int, default=30)
    args = parser.parse_args()
    work, steps_a, steps_b = args.work, args.steps_a, args.steps_b
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    print("corpus A: pystdlib", flush=True)
    subprocess.run(
        [sys.executable, str(ROOT / "data" / "pystdlib" / "prepare.py")],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    corpus_a = ROOT / "data" / "pystdlib" / "out"
    corpus_b = work / "prose"
    if not (corpus_b / "manifest.json").exists():
        docs = english_documents(limit_bytes=12_000_000)
        print(f"corpus B: {len(docs)} English documentation files from /usr/share/doc", flush=True)
        with open(work / "prose.jsonl", "w") as f:
            for text in docs:
                f.write(json.dumps({"text": text}) + "\n")
        pretrain(
            "data",
            "prepare",
            "--input",
            str(work / "prose.jsonl"),
            "--tokenizer",
            str(corpus_a / "tokenizer.json"),
            "--output",
            str(corpus_b),
            "--val-fraction",
            "0.02",
        )
    only_a = {"A": {"path": str(corpus_a), "weight": 1.0}}
    only_b = {"B": {"path": str(corpus_b), "weight": 1.0}}

    def with_replay(share: float) -> dict:
        return {
            "B": {"path": str(corpus_b), "weight": 1 - share},
            "A": {"path": str(corpus_a), "weight": share},
        }

    cosine = {
        "class_path": "pretrain.train.schedules.WarmupCosine",
        "init_args": {"max_lr": PEAK, "min_lr": FLOOR, "warmup_steps": max(1, steps_a // 20)},
    }
    infinite_args = {
        "max_lr": PEAK,
        "constant_lr": PEAK / 3,
        "warmup_steps": max(1, steps_a // 20),
        "cooldown_steps": steps_a // 3,
    }
    infinite = {"class_path": "pretrain.train.schedules.Infinite", "init_args": infinite_args}
    rewarm = {
        "class_path": "pretrain.train.schedules.WarmupCosine",
        "init_args": {"max_lr": PEAK, "min_lr": FLOOR, "warmup_steps": max(1, steps_b // 100)},
    }
    constant = {"class_path": "pretrain.train.schedules.Constant", "init_args": {"max_lr": FLOOR}}
    anneal = {
        "class_path": "pretrain.train.schedules.Infinite",
        "init_args": {**infinite_args, "anneal_steps": max(1, steps_b // 5), "min_lr": FLOOR},
    }

    print("stage A (two schedules)", flush=True)
    a_cosine = fit(work, "A-cosine", only_a, cosine, steps_a)
    a_infinite = fit(work, "A-infinite", only_a, infinite, steps_a)
    a_expanded = work / "A-cosine-expanded.pt"
    if not a_expanded.exists():
        pretrain("expand", str(a_cosine), "-o", str(a_expanded), "--every", "2")
    print("stage B arms", flush=True)
    arms = {
        "1. no re-warm, no replay": fit(
            work, "B1-constant", only_b, constant, steps_b, model__init_from=str(a_cosine)
        ),
        "2. re-warm + re-decay": fit(
            work, "B2-rewarm", only_b, rewarm, steps_b, model__init_from=str(a_cosine)
        ),
        "3. re-warm + 5% replay": fit(
            work, "B3-replay5", with_replay(0.05), rewarm, steps_b, model__init_from=str(a_cosine)
        ),
        "4. re-warm + 25% replay": fit(
            work, "B4-replay25", with_replay(0.25), rewarm, steps_b, model__init_from=str(a_cosine)
        ),
        "5. infinite: constant on B, anneal": fit(
            work,
            "B5-infinite",
            only_b,
            anneal,
            steps_a + steps_b,
            branch_from=str(a_infinite),
            data__allow_data_change=True,
        ),
        "6. LLaMA Pro expansion (new blocks only, no replay)": fit(
            work,
            "B6-llama-pro",
            only_b,
            rewarm,
            steps_b,
            model__init_from=str(a_expanded),
            model__model_overrides={"n_layers": 6},
            model__trainable_blocks="new",
        ),
    }
    datasets = {"A": corpus_a, "B": corpus_b}
    results = {
        "after stage A (cosine)": evaluate(a_cosine, datasets),
        "after stage A (infinite, constant)": evaluate(a_infinite, datasets),
    }
    results |= {name: evaluate(checkpoint, datasets) for name, checkpoint in arms.items()}
    write_report(args.out, results, steps_a, steps_b)


def write_report(out: Path, results: dict[str, dict[str, float]], steps_a: int, steps_b: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, losses in results.items():
        marker = "s" if name.startswith("after") else "o"
        ax.scatter(losses["A"], losses["B"], marker=marker, s=60)
        ax.annotate(name, (losses["A"], losses["B"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("validation loss on A (code) - lower = less forgetting")
    ax.set_ylabel("validation loss on B (prose) - lower = better adaptation")
    ax.set_title(f"tiny preset: {steps_a} steps on A, then {steps_b} steps on B (8,192 tokens/step)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "forgetting-vs-adaptation.png", dpi=120)
    rows = "\n".join(
        f"| {name} | {v['A']:.3f} | {math.exp(v['A']):.1f} | {v['B']:.3f} | {math.exp(v['B']):.1f} |"
        for name, v in results.items()
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(
        "| arm | val loss A | ppl A | val loss B | ppl B |\n|---|---|---|---|---|\n" + rows + "\n"
    )
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
