"""Anneal probes demonstration on CPU: does a forecast from early probes predict the annealed loss?

The `tiny` preset with a warmup-stable-decay schedule (`WarmupStableDecay`, 20% 1-sqrt decay at
the end) on the pystdlib corpus, shortened to fit two shared CPU cores (sequences of 128 tokens,
8 a step). Checkpoints are pinned at the probe steps, all in the constant phase. Then:

  (a) the parent run trains in the background (resumed, or skipped when it has finished);
  (b) beside it, as soon as each probe step's checkpoint is published,
      `pretrain anneal PARENT --steps N --fraction F` decays a branch from it, and the parent's
      tokens/s beside a probe is compared with its tokens/s alone;
  (c) each probe's annealed loss is reported beside the stable-phase loss, and the forecast made
      from the probes before the last is compared with the last probe (error, inside the band?);
  (d) the parent's own decay at its planned end is the full run annealed: compared with the
      forecast from all probes.

Writes the plot (`pretrain plot` of the parent, probes and forecast drawn) and the numbers:

    python experiments/anneal_probes.py [--out docs/anneal-probes] [--scratch /tmp/anneal-probes]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pretrain import lease
from pretrain.anneal.forecast import NoForecast
from pretrain.anneal.report import anneal_view, fit, forecast_lines, table_lines, write_table
from pretrain.anneal.result import ProbeResult, read_results
from pretrain.plot import plot_runs
from pretrain.run_dir import RunDir
from pretrain.run_dir.goodput import ELAPSED

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(Path(sys.executable).with_name("pretrain"))
SEQ_LEN, BATCH = 128, 8  # 1,024 tokens a step
VAL = "val/pystdlib/loss"


def schedule() -> str:
    """The parent's WSD schedule: a 20% 1-sqrt decay at the end."""
    args = {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10, "decay_fraction": 0.2}
    return json.dumps({"class_path": "pretrain.train.schedules.WarmupStableDecay", "init_args": args})


def fit_command(run_dir: Path, data: Path, steps: int, every: int, lr_schedule: str) -> list[str]:
    command = [PRETRAIN, "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(run_dir)]
    command += ["--max_tokens", str(steps * SEQ_LEN * BATCH), "--data.seq_len", str(SEQ_LEN)]
    command += ["--data.global_batch_tokens", str(SEQ_LEN * BATCH), "--data.micro_batch_size", str(BATCH)]
    command += ["--data.val_tokens", "8192", "--validate_every_steps", str(every)]
    command += ["--checkpoint.every_n_steps", str(every), "--checkpoint.pin_every_n_steps", str(every)]
    command += ["--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false"]
    command += ["--data.num_workers", "0", "--model.lr_schedule", lr_schedule]
    return command + ["--data.sources", json.dumps({"pystdlib": {"path": str(data), "weight": 1.0}})]


def run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stderr[-3000:]}")


def finished(run_dir: Path) -> bool:
    summary = RunDir(run_dir).summary() if run_dir.is_dir() else None
    return summary is not None and bool(summary.max_steps) and summary.steps_done >= (summary.max_steps or 0)


def start_parent(command: list[str], log: Path) -> subprocess.Popen | None:
    """Start the parent run in the background (it resumes if interrupted); None if it has finished."""
    parent = Path(command[command.index("--run_dir") + 1])
    if finished(parent):
        return None
    owner = lease.read(RunDir(parent).lease_file)
    if owner is not None and lease.gone_because(owner, lease.this_process()) is None:
        print(f"the parent run is training already ({lease.describe_owner(owner)}): waiting for it")
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("a"))


def has_checkpoint(run_dir: Path, step: int) -> bool:
    return step in dict(RunDir(run_dir).list_checkpoints())


def wait_for(what: str, done: Callable[[], bool], parent: subprocess.Popen | None) -> None:
    """Poll until `done()`; stop if the parent run failed meanwhile."""
    while not done():
        if parent is not None and parent.poll() not in (None, 0):
            sys.exit(f"the parent run failed (exit {parent.returncode}) before {what}: see its log")
        time.sleep(10)


def last_val(run_dir: Path, at_step: int | None = None) -> float:
    """The run's last validation loss, or the last logged at or before log step `at_step`."""
    val = RunDir(run_dir).read_logs().series[VAL]
    values = val.values if at_step is None else val.values[val.steps <= at_step]
    return float(values[-1])


def probe(parent: Path, step: int, fraction: float) -> tuple[float, float]:
    """`nice pretrain anneal` of one step's checkpoint, beside the training parent (as the automatic
    probes callback runs it); its wall-clock window."""
    began = time.time()
    command = [PRETRAIN, "anneal", str(parent), "--steps", str(step), "--fraction", str(fraction)]
    run(["nice", "-n", "19", *command], f"probe {step}")  # as the automatic probes run: the parent first
    return began, time.time()


def overhead(
    parent: Path, started: float, windows: list[tuple[float, float]], every: int
) -> dict[str, object]:
    """The parent's tokens/s over its steps that ran beside a probe against those that ran alone.

    Step times come from the parent's `goodput/elapsed_s` column (seconds since its process start,
    which is `started`); steps that validate or checkpoint (and the one after) are left out."""
    series = RunDir(parent).read_logs().series[ELAPSED]
    ends = {int(step) + 1: started + float(value) for step, value in zip(series.steps, series.values)}
    beside: list[float] = []
    alone: list[float] = []
    for step, end in ends.items():
        if step - 1 not in ends or step % every in (0, 1):
            continue
        seconds = end - ends[step - 1]
        busy = any(lo <= end - seconds and end <= hi for lo, hi in windows)
        (beside if busy else alone).append(seconds)
    if not beside or not alone:
        return {"overhead": "not measured (no step ran wholly beside a probe, or none alone)"}
    rate = lambda times: SEQ_LEN * BATCH / statistics.median(times)  # noqa: E731
    return {
        "parent_tokens_per_s_alone": round(rate(alone)),
        "parent_tokens_per_s_beside_a_probe": round(rate(beside)),
        "ratio": round(rate(beside) / rate(alone), 3),
        "steps_alone": len(alone),
        "steps_beside": len(beside),
    }


def check(parent: Path, results: list[ProbeResult], tokens: float, truth: float) -> dict[str, object]:
    """The forecast from `results` at `tokens` against the measured `truth`."""
    try:
        band = fit(results, run=RunDir(parent)).at(tokens)
    except NoForecast as why:
        return {"forecast": str(why)}
    return {
        "predicted": round(band.value, 4),
        "band_90": [round(band.low, 4), round(band.high, 4)],
        "measured": round(truth, 4),
        "error": round(band.value - truth, 4),
        "inside_band": band.low <= truth <= band.high,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "anneal-probes")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/anneal-probes"))
    parser.add_argument("--steps", type=int, default=240, help="the parent's planned steps")
    parser.add_argument("--every", type=int, default=40, help="a probe every K steps of the constant phase")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data" / "pystdlib" / "out", help="prepared pystdlib"
    )
    args = parser.parse_args()
    parent = args.scratch / "parent"
    command = fit_command(parent, args.data, args.steps, args.every, schedule())
    started = time.time()
    process = start_parent(command, args.scratch / "parent.log")
    stable_end = round(args.steps * 0.8)
    steps = [s for s in range(args.every, stable_end + 1, args.every) if s < stable_end]
    windows = []
    for step in steps:  # each probe beside the parent, as soon as its checkpoint is published
        wait_for(f"step {step}", partial(has_checkpoint, parent, step), process)
        windows.append(probe(parent, step, args.fraction))
    wait_for("its end", lambda: finished(parent), process)
    results = read_results(parent)
    write_table(parent)
    last, earlier = results[-1], results[:-1]
    planned = args.steps * SEQ_LEN * BATCH
    numbers = {
        "parent": {"steps": args.steps, "tokens": planned, "schedule": "WSD, 20% 1-sqrt decay"},
        "probes_by": "pretrain anneal, each beside the training parent",
        "fraction": args.fraction,
        "probes": [
            {
                "step": r.step,
                "tokens": r.tokens,
                "stable_val_loss": r.stable_val_loss,
                "annealed_val_loss": r.val_loss,
            }
            for r in results
        ],
        "last_probe_from_the_earlier": check(parent, earlier, last.tokens, last.val_loss),
        "full_run_from_all_probes": check(parent, results, planned, last_val(parent)),
        "forecast_lines": forecast_lines(parent),
        "parent_beside_probes": overhead(parent, started, windows, args.every)
        if process is not None
        else {"overhead": "not measured (the parent was not started by this run)"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    log = RunDir(parent).read_logs()
    plot_runs([log], args.out / "anneal-probes.png", anneal=[anneal_view(parent)])
    (args.out / "anneal-probes.json").write_text(json.dumps(numbers, indent=1) + "\n")
    print("\n".join(table_lines(results)))
    print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
