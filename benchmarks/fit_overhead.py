"""Lightning + logging overhead: `pretrain fit` vs a bare PyTorch loop, interleaved, same everything.

Both train the same `Llama` class on the same data stream (`build_train_dataset`, same seed and
batch geometry), with fused AdamW, the same loss chunking (`auto_chunk_tokens`), LR schedule and
gradient clipping; the bare loop has no Lightning, no logging and no callbacks. Rounds alternate
(bare, fit, [fit with compile,] bare, ...) so machine noise hits all alike; each round times
steady-state optimizer steps after `--warmup` steps. `--compile` adds `pretrain fit --model.compile
true` to each round (its compile happens in the warmup steps).

    python benchmarks/fit_overhead.py [--config configs/tiny.yaml] [--rounds 3] [--steps 20] [--compile]

Prints tokens/s per round and the ratios to the bare loop (target for fit / bare: >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from pretrain.data.loader import build_train_dataset
from pretrain.model import Llama, get_preset
from pretrain.model.loss import auto_chunk_tokens
from pretrain.train.fit import FitCLI
from pretrain.train.schedules import WarmupCosine


class StepTimer(L.Callback):
    """Wall-clock time at every optimizer-step boundary."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.times.append(time.perf_counter())


def rate(times: list[float], warmup: int, tokens_per_step: int) -> float:
    steady = times[warmup:]
    return (len(steady) - 1) * tokens_per_step / (steady[-1] - steady[0])


def bare_round(recipe: dict, steps: int, warmup: int) -> float:
    model_cfg, data_cfg = recipe["model"], recipe["data"]
    config = get_preset(model_cfg["model"]).replace(**(model_cfg.get("model_overrides") or {}))
    torch.manual_seed(model_cfg.get("seed", 1337))
    model = Llama(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "tok_embeddings" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": model_cfg.get("weight_decay", 0.1)},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=1.0,
        betas=tuple(model_cfg.get("betas", (0.9, 0.95))),
        fused=True,
    )
    schedule = WarmupCosine(**recipe["model"]["lr_schedule"]["init_args"])
    seq_len, micro = data_cfg["seq_len"], data_cfg["micro_batch_size"]
    global_batch = data_cfg["global_batch_tokens"] // seq_len
    accumulation = global_batch // micro
    sources = {name: (s["path"], s["weight"]) for name, s in data_cfg["sources"].items()}
    dataset = build_train_dataset(
        sources,
        seq_len=seq_len,
        global_batch_size=global_batch,
        micro_batch_size=micro,
        seed=data_cfg.get("seed", 42),
    )
    batches = iter(DataLoader(dataset, batch_size=None, num_workers=data_cfg.get("num_workers", 0)))
    clip = recipe["trainer"].get("gradient_clip_val")
    chunk = auto_chunk_tokens(micro * seq_len, config.vocab_size)
    times = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step, steps)
        for _ in range(accumulation):
            inputs, targets = next(batches)
            loss = model(inputs, targets=targets, loss_chunk_tokens=chunk).loss / accumulation
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return rate(times, warmup, data_cfg["global_batch_tokens"])


def fit_round(config_path: str, steps: int, warmup: int, tokens_per_step: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--config", config_path, "--run_dir", run_dir, "--resume", "none", "--max_tokens", "null"]
        args += [
            "--trainer.max_steps",
            str(steps),
            "--validate_every_steps",
            "null",
            "--trainer.limit_val_batches",
            "0",
        ]
        args += ["--checkpoint.every_n_steps", "null", "--checkpoint.save_on_train_end", "false"]
        args += ["--trainer.enable_model_summary", "false", *extra]
        cli = FitCLI(args)
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return rate(timer.times, warmup, tokens_per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also `pretrain fit --model.compile true`")
    args = parser.parse_args()
    with open(args.config) as f:
        recipe = yaml.safe_load(f)
    tokens_per_step = recipe["data"]["global_batch_tokens"]
    kinds = {"pretrain fit": []} | (
        {"pretrain fit, compile": ["--model.compile", "true"]} if args.compile else {}
    )
    rates: dict[str, list[float]] = {"bare": []} | {kind: [] for kind in kinds}
    for round_index in range(args.rounds):
        rates["bare"].append(bare_round(recipe, args.steps, args.warmup))
        for kind, extra in kinds.items():
            rates[kind].append(fit_round(args.config, args.steps, args.warmup, tokens_per_step, extra))
        line = ", ".join(f"{kind} {values[-1]:,.0f}" for kind, values in rates.items())
        print(f"round {round_index} (tokens/s): {line}", flush=True)
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads, {args.config}"
    )
    bare = statistics.median(rates["bare"])
    for kind, values in rates.items():
        paired = [fit / base for fit, base in zip(values, rates["bare"])]
        print(
            f"{kind}: median {statistics.median(values):,.0f} tokens/s, / bare: median {statistics.median(values) / bare:.3f}"
            f" (per round {min(paired):.3f}-{max(paired):.3f})"
        )


if __name__ == "__main__":
    main()
