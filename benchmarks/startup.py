"""Start-up of `pretrain fit`: spawn to the first optimizer step, against importing torch alone.

Each round spawns, in turn: `python -c "import torch"`, `python -c "import lightning"` and
`pretrain fit` on the recipe; for `fit`, the time from spawn to the first logged training step (its
row in metrics.csv, flushed every step), after which the process is killed. With `--compile`, each
round also launches `fit --model.compile true` twice on one fresh compile cache (a first launch,
then a relaunch that loads the compiled graphs, as a requeue does). Prints the median and the
spread (min-max) over the rounds.

    python data/pystdlib/prepare.py
    python benchmarks/startup.py [--config configs/tiny.yaml] [--rounds 5] [--compile]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRETRAIN = str(Path(sys.executable).with_name("pretrain"))


def import_time(module: str) -> float:
    """Seconds to spawn a Python that imports `module` and exits."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def first_step_logged(run_dir: Path) -> bool:
    for metrics in run_dir.glob("logs/version_*/metrics.csv"):
        try:
            with open(metrics) as f:
                if any(row.get("train/loss") for row in csv.DictReader(f)):
                    return True
        except (OSError, csv.Error):  # being written
            pass
    return False


def spawn_to_first_step(config: str, overrides: list[str], timeout: float = 600) -> float:
    """Seconds from spawning `pretrain fit` to its first logged step (then the launch is killed)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [
            PRETRAIN,
            "fit",
            "--config",
            config,
            "--run_dir",
            str(run_dir),
            "--trainer.log_every_n_steps",
            "1",
        ]
        start = time.perf_counter()
        process = subprocess.Popen(
            args + overrides, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            while not first_step_logged(run_dir):
                if process.poll() is not None:
                    raise SystemExit(f"pretrain fit exited early: {process.stderr.read().decode()[-2000:]}")
                if time.perf_counter() - start > timeout:
                    raise SystemExit("pretrain fit: no step logged in time")
                time.sleep(0.01)
            return time.perf_counter() - start
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            process.stderr.close()


def summary(name: str, values: list[float]) -> str:
    return f"{name:<40} median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--data", default="data/pystdlib/out", help="the recipe's token data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also first launch vs relaunch with compile")
    args = parser.parse_args()
    data = ["--data.sources", json.dumps({"bench": {"path": args.data, "weight": 1.0}})]
    results: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        measured = {
            "import torch": import_time("torch"),
            "import lightning": import_time("lightning"),
            "pretrain fit: spawn to first step": spawn_to_first_step(args.config, data),
        }
        if args.compile:
            with tempfile.TemporaryDirectory() as cache:
                compiled = data + ["--model.compile", "true", "--model.compile_cache", cache]
                measured["fit, compile: first launch"] = spawn_to_first_step(args.config, compiled)
                measured["fit, compile: relaunch (cache)"] = spawn_to_first_step(args.config, compiled)
        for name, seconds in measured.items():
            results.setdefault(name, []).append(seconds)
        print(f"round {round_index}: " + ", ".join(f"{k} {v:.2f} s" for k, v in measured.items()), flush=True)
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {args.config}, {args.rounds} rounds"
    )
    for name, values in results.items():
        print(summary(name, values))


if __name__ == "__main__":
    main()
