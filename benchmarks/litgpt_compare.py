"""`pretrain fit` against litgpt's own `litgpt pretrain`, same model shape and batches, interleaved.

The shape (issue 22): the `tiny` preset with 8 heads, 4 KV heads, MLP 704, vocabulary 8192, seq 256,
8 sequences per optimizer step (one micro-batch), fp32, constant LR, one process. litgpt runs from
its own virtual environment (`.venv-litgpt/`, git-ignored), made on first use: `torch==2.13.0`
first, then `litgpt` and `litdata` (its token-set reader; not the `[extra]` set, whose resolution pip
backtracks through for a long time) with torch pinned by a constraint so that pip never pulls another torch.

Data: the same tokens. The recipe's token shards are copied into a litdata-optimized token set
(`litdata.optimize`, what litgpt's `LitData` module reads), so both train on the pystdlib tokens;
the order of the sequences differs (each tool shuffles its own way), which throughput does not see.
What else differs: litgpt compiles its model (`torch.compile` in `litgpt pretrain`, always), uses
its own chunked cross-entropy and AdamW settings; `pretrain fit` runs with its defaults unless
`--fit-args` adds some (e.g. `--model.compile true`).

Each round runs litgpt, then `pretrain fit` (then litgpt first in the next round, alternating), and
times steady-state optimizer steps after `--warmup` steps: litgpt by the arrival of its per-step
log lines (`--train.log_interval 1`), `fit` by a callback at every step end, both wall clock.

    python data/pystdlib/prepare.py
    python benchmarks/litgpt_compare.py [--rounds 5] [--steps 30] [--warmup 5] [--fit-args "..."]

Prints tokens/s of each per round, the paired ratio fit / litgpt per round, and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from fit_overhead import fit_round  # beside this file

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-litgpt"
LITGPT_VERSION = "0.5.13"
TORCH_VERSION = "2.13.0"
SEQ_LEN, BATCH, VOCAB = 256, 8, 8192
LITGPT_CONFIG = {  # the tiny preset, at the shape above, in litgpt's terms
    "name": "pretrain-tiny",
    "block_size": SEQ_LEN,
    "vocab_size": VOCAB,
    "padded_vocab_size": VOCAB,
    "n_layer": 4,
    "n_embd": 256,
    "n_head": 8,
    "n_query_groups": 4,
    "head_size": 32,
    "intermediate_size": 704,
    "rotary_percentage": 1.0,
    "parallel_residual": False,
    "bias": False,
    "norm_class_name": "RMSNorm",
    "norm_eps": 1e-5,
    "mlp_class_name": "LLaMAMLP",
    "rope_base": 10000,
}
STEP_LINE = re.compile(r"\bstep (\d+)\b")


def litgpt_python() -> Path:
    """The Python of `.venv-litgpt/`, made on first use (module docstring)."""
    python = VENV / "bin" / "python"
    if not (VENV / "bin" / "litgpt").exists():
        print(f"installing litgpt {LITGPT_VERSION} into {VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
            constraints.write(f"torch=={TORCH_VERSION}\n")
            constraints.flush()
            subprocess.run(pip + ["-c", constraints.name, f"litgpt=={LITGPT_VERSION}", "litdata"], check=True)
        # PyPI's torchvision (pulled by litdata) does not import beside the local CPU torch build
        # ("operator torchvision::nms does not exist"), and litgpt pretrain does not need it.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)
    return python


OPTIMIZE = """
import sys
import numpy as np
import torch
from litdata import optimize
from litdata.streaming.item_loader import TokensLoader

def shard_tokens(path):
    yield torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))

if __name__ == "__main__":
    optimize(fn=shard_tokens, inputs=sys.argv[2:], output_dir=sys.argv[1], chunk_size=(2049 * 1024),
             item_loader=TokensLoader(), num_workers=1)
"""


def litdata_tokens(python: Path, shards: list[Path], out: Path) -> None:
    """Our uint16 token shards as a litdata token set in `out`/train and `out`/val."""
    script = out / "optimize.py"  # a file: litdata's workers are spawned and re-import the main module
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(OPTIMIZE)
    for split in ("train", "val"):
        if not (out / split / "index.json").exists():
            subprocess.run([str(python), str(script), str(out / split), *map(str, shards)], check=True)


def litgpt_round(python: Path, data: Path, steps: int, warmup: int) -> float:
    """Steady-state tokens/s of one `litgpt pretrain` run (module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(python), "-m", "litgpt", "pretrain", LITGPT_CONFIG["name"]]  # a name is required; the
        args += ["--model_config", json.dumps(LITGPT_CONFIG)]  # config given beside it overrides it
        args += ["--out_dir", str(Path(tmp) / "out"), "--precision", "32-true", "--devices", "1"]
        args += ["--data", "LitData", "--data.data_path", str(data), "--data.num_workers", "1"]
        args += ["--data.split_names", json.dumps(["train", "val"])]
        args += ["--train.global_batch_size", str(BATCH), "--train.micro_batch_size", str(BATCH)]
        args += ["--train.max_seq_length", str(SEQ_LEN), "--train.max_tokens", str(steps * BATCH * SEQ_LEN)]
        args += [
            "--train.lr_warmup_steps",
            "0",
            "--train.log_interval",
            "1",
            "--train.save_interval",
            "100000",
        ]
        args += [
            "--eval.interval",
            "100000",
            "--eval.initial_validation",
            "false",
            "--eval.final_validation",
            "false",
        ]
        args += ["--optimizer", json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}})]
        args += ["--logger_name", "csv"]
        env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": ""}
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        times, tail = [], []
        assert process.stdout is not None
        for line in process.stdout:
            tail = (tail + [line])[-20:]
            if "iter time" in line and STEP_LINE.search(line):
                times.append(time.perf_counter())
        if process.wait() != 0 or len(times) <= warmup + 1:
            raise SystemExit("litgpt pretrain failed:\n" + "".join(tail))
    steady = times[warmup:]
    return (len(steady) - 1) * BATCH * SEQ_LEN / (steady[-1] - steady[0])


def fit_recipe(tmp: Path, data: Path, steps: int) -> Path:
    """`configs/tiny.yaml` at the comparison's shape, constant LR, no validation or checkpoints."""
    recipe = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    recipe["model"]["model_overrides"] = {"n_heads": 8, "n_kv_heads": 4, "mlp_hidden": 704}
    recipe["model"]["lr_schedule"] = {
        "class_path": "pretrain.train.schedules.WarmupCosine",
        "init_args": {"max_lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0},
    }
    recipe["data"] |= {"micro_batch_size": BATCH, "global_batch_tokens": BATCH * SEQ_LEN, "seq_len": SEQ_LEN}
    recipe["data"]["sources"] = {"pystdlib": {"path": str(data), "weight": 1.0}}
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/pystdlib/out", help="our token data (vocabulary 8192)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--fit-args", default="", help="extra `pretrain fit` arguments, e.g. --model.compile true"
    )
    args = parser.parse_args()
    python = litgpt_python()
    data = Path(args.data).resolve()
    shards = sorted((data / "train").glob("*.bin"))
    if not shards:
        raise SystemExit(f"{data}/train holds no token shards: run python data/pystdlib/prepare.py")
    if json.loads(shards[0].with_suffix(".json").read_text()).get("dtype") != "uint16":
        raise SystemExit(f"{data}: expected uint16 token shards (a vocabulary of {VOCAB})")
    work = Path(tempfile.mkdtemp(prefix="litgpt-compare-"))
    litdata_tokens(python, shards, work / "litdata")
    recipe = fit_recipe(work, data, args.steps)
    extra = shlex.split(args.fit_args)
    ratios, fits, litgpts = [], [], []
    for round_index in range(args.rounds):
        order = ("litgpt", "fit") if round_index % 2 == 0 else ("fit", "litgpt")
        rates = {}
        for tool in order:
            if tool == "litgpt":
                rates[tool] = litgpt_round(python, work / "litdata", args.steps, args.warmup)
            else:
                rates[tool] = fit_round(str(recipe), args.steps, args.warmup, BATCH * SEQ_LEN, extra)
        fits.append(rates["fit"])
        litgpts.append(rates["litgpt"])
        ratios.append(rates["fit"] / rates["litgpt"])
        print(
            f"round {round_index}: litgpt {rates['litgpt']:,.0f} tokens/s, pretrain fit {rates['fit']:,.0f} "
            f"tokens/s, fit / litgpt {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, fit args: {args.fit_args or '(defaults)'}"
    )
    print(
        f"median tokens/s: litgpt {statistics.median(litgpts):,.0f}, pretrain fit {statistics.median(fits):,.0f}; "
        f"fit / litgpt per round: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
