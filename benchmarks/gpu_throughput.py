"""Training throughput of the real `pretrain fit` path per configuration: tokens/s, MFU, peak memory.

Each configuration is a set of recipe overrides applied on top of a base recipe and run through
`FitCLI` (the LightningModule, strategy, optimizer and data loader users get) for `--steps`
optimizer steps; the first `--warmup` steps (compilation, allocator warm-up) are not timed.
Configurations vary the attention backend (SDPA's own choice, SDPA pinned to its flash or cuDNN
kernel, flash-attn, xformers), torch.compile, activation checkpointing (none / selective / full),
micro-batch size, cross-entropy (plain vs chunked) and the strategy (single device vs FSDP2 on one
device). The global batch is `--accumulate` micro-batches, so a step is short whatever the
recipe. A configuration that cannot run (a backend not installed, out of memory) is reported with
its reason instead of a number.

    # on a GPU: the TinyLlama 1.1B recipe at seq 2048 (data: a prepared dataset, vocab <= 32000)
    python benchmarks/gpu_throughput.py --config configs/tinyllama-1.1b.yaml --data DIR --json results.json
    # on a CPU: the tiny preset end to end
    python benchmarks/gpu_throughput.py --config configs/tiny.yaml --data data/pystdlib/out --cpu

MFU = tokens/s x FLOPs/token / (devices x dense bf16 peak), FLOPs/token from
`pretrain.model.flops` (6 N + 12 L d T); on a CPU only tokens/s is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from typing import Any

import lightning as L
import torch
import yaml

from pretrain.model.flops import flops_per_token
from pretrain.train.callbacks.monitor import peak_flops
from pretrain.train.fit import FitCLI


def config(name: str, backend: str = "sdpa", micro_batch: int = 8, **overrides: Any) -> dict[str, Any]:
    """One benchmark configuration: recipe overrides (dotted keys) plus its display name. The
    cross-entropy is plain unless the configuration chunks it (`fit`'s default is "auto")."""
    return {
        "name": name,
        "model.attention_backend": backend,
        "data.micro_batch_size": micro_batch,
        "model.loss_chunk_tokens": None,
        **overrides,
    }


CHUNKED = {"model.loss_chunk_tokens": 8192}
AUTO_CHUNKED = {"model.loss_chunk_tokens": "auto"}  # 256 tokens at a vocabulary of 32000
COMPILED = {"model.compile": True}
# One factor at a time around "sdpa, compile, mb 8, chunked CE", then the promising combinations.
GPU_CONFIGS: list[dict[str, Any]] = [
    config("sdpa, eager, mb 4", micro_batch=4),
    config("sdpa, eager, mb 8", micro_batch=8),
    config("sdpa, eager, mb 8, chunked CE", **CHUNKED),
    config("sdpa, compile, mb 8", **COMPILED),
    config("sdpa, compile, mb 8, chunked CE", **COMPILED, **CHUNKED),
    config("sdpa, eager, mb 8, auto CE", **AUTO_CHUNKED),
    config("sdpa, compile, mb 8, auto CE", **COMPILED, **AUTO_CHUNKED),
    config("sdpa-flash, compile, mb 8, chunked CE", backend="sdpa-flash", **COMPILED, **CHUNKED),
    config("sdpa-cudnn, compile, mb 8, chunked CE", backend="sdpa-cudnn", **COMPILED, **CHUNKED),
    config("flash, compile, mb 8, chunked CE", backend="flash", **COMPILED, **CHUNKED),
    config("xformers, compile, mb 8, chunked CE", backend="xformers", **COMPILED, **CHUNKED),
    config("sdpa, compile, mb 12, chunked CE", micro_batch=12, **COMPILED, **CHUNKED),
    config("sdpa, compile, mb 16, chunked CE", micro_batch=16, **COMPILED, **CHUNKED),
    config(
        "sdpa, compile, mb 16, chunked CE, sel. AC",
        micro_batch=16,
        **COMPILED,
        **CHUNKED,
        **{"model.activation_checkpointing": "selective"},
    ),
    config(
        "sdpa, compile, mb 32, chunked CE, full AC",
        micro_batch=32,
        **COMPILED,
        **CHUNKED,
        **{"model.activation_checkpointing": "full"},
    ),
    config("sdpa, compile, mb 8, chunked CE, fsdp2", **COMPILED, **CHUNKED, **{"trainer.strategy": "fsdp2"}),
    # The cost of an EMA of the weights updated every step (kept on the CPU, or on the GPU).
    *(
        config(
            f"sdpa, compile, mb 8, chunked CE, EMA on {where}",
            **COMPILED,
            **CHUNKED,
            **{
                "trainer.callbacks+": {
                    "class_path": "pretrain.train.callbacks.ema.EMA",
                    "init_args": {"on_cpu": where == "CPU"},
                }
            },
        )
        for where in ("CPU", "GPU")
    ),
]
CPU_CONFIGS: list[dict[str, Any]] = [
    config("sdpa, eager, mb 8", micro_batch=8),
    config("sdpa, eager, mb 16", micro_batch=16),
    config("sdpa, eager, mb 16, chunked CE", micro_batch=16, **{"model.loss_chunk_tokens": 1024}),
    config("sdpa, eager, mb 16, sel. AC", micro_batch=16, **{"model.activation_checkpointing": "selective"}),
    config("sdpa, eager, mb 16, full AC", micro_batch=16, **{"model.activation_checkpointing": "full"}),
    config("sdpa, eager, mb 16, fsdp2", micro_batch=16, **{"trainer.strategy": "fsdp2"}),
]


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())


def run_config(
    base: str, data: str, config: dict[str, Any], steps: int, warmup: int, accumulate: int
) -> dict[str, Any]:
    overrides = {k: v for k, v in config.items() if k != "name"}
    seq_len = overrides.get("data.seq_len") or yaml.safe_load(open(base))["data"]["seq_len"]
    overrides["data.global_batch_tokens"] = overrides["data.micro_batch_size"] * seq_len * accumulate
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--config", base, "--run_dir", run_dir, "--resume", "none", "--max_tokens", "null"]
        args += [
            "--trainer.max_steps",
            str(steps),
            "--validate_every_steps",
            "null",
            "--trainer.limit_val_batches",
            "0",
        ]
        args += ["--checkpoint.every_n_steps", "null", "--checkpoint.save_on_train_end", "false"]
        args += [
            "--trainer.enable_model_summary",
            "false",
            "--trainer.num_nodes",
            "1",
            "--trainer.devices",
            "1",
        ]
        args += ["--data.sources", json.dumps({"bench": {"path": data, "weight": 1.0}})]
        args += ["--trainer.strategy", "auto", "--model.sharding", "full"]  # one device unless a config says
        for key, value in overrides.items():
            args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        cli = FitCLI(args)
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        tokens_per_step = cli.datamodule.global_batch_tokens
        steady = timer.times[warmup:]
        tokens_per_sec = (len(steady) - 1) * tokens_per_step / (steady[-1] - steady[0])
        flops = flops_per_token(cli.model.config, cli.datamodule.seq_len)
        peak = peak_flops(cli.model.device)
        result = {"name": config["name"], "tokens_per_sec": tokens_per_sec, "flops_per_token": flops}
        result["mfu"] = tokens_per_sec * flops / peak if peak else None
        if torch.cuda.is_available():
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tinyllama-1.1b.yaml")
    parser.add_argument("--data", required=True, help="a prepared dataset directory")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--accumulate", type=int, default=2, help="micro-batches per optimizer step (sets the global batch)"
    )
    parser.add_argument("--cpu", action="store_true", help="use the CPU configurations")
    parser.add_argument("--only", nargs="*", help="names of configurations to run")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    configs = CPU_CONFIGS if args.cpu else GPU_CONFIGS
    if args.only:
        configs = [c for c in configs if c["name"] in args.only]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    header = f"{device}; torch {torch.__version__}; lightning {L.__version__}; {date.today()}; {args.config}"
    results = []
    for config in configs:
        try:
            results.append(
                run_config(args.config, args.data, config, args.steps, args.warmup, args.accumulate)
            )
        except Exception as err:  # report and go on: one unavailable kernel must not hide the others
            results.append({"name": config["name"], "error": f"{type(err).__name__}: {err}"[:200]})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(header)
    print(f"{'configuration':<34} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<34} unavailable: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        print(f"{r['name']:<34} {r['tokens_per_sec']:>12,.0f} {mfu:>7} {memory:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "header": header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
