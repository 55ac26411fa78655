"""Benchmark: how long a checkpoint save blocks the training loop, synchronous vs asynchronous.

Trains the `llama-120m` preset (125M parameters: a checkpoint with AdamW state is ~1.5 GB in fp32)
on the CPU for a few short steps on the pystdlib corpus, saving every `--every` steps, once with
`checkpoint.async_save: false` and once with `true`, alternating the two `--repeats` times. Prints,
per launch, the seconds the step loop was blocked per save inside the loop
(`PeriodicCheckpoint.stall_seconds / saves` before training ends: staging, waiting for an
earlier write, publishing), the seconds spent at the end of training (the last save, and with
`async_save` the wait for its write), and the wall time of the launch.

Run: python benchmarks/checkpoint_stall.py [--data data/pystdlib/out] [--steps 6] [--every 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pretrain.cli import main
from pretrain.train.callbacks.periodic_checkpoint import PeriodicCheckpoint

ROOT = Path(__file__).resolve().parents[1]


def launch(
    run_dir: Path, data: Path, async_save: bool, steps: int, every: int
) -> tuple[float, int, float, float]:
    """One `pretrain fit` in this process: (stall seconds in the loop, saves in the loop, seconds
    at the end of training, wall seconds)."""
    in_loop: list[tuple[float, int]] = []
    finished: list[PeriodicCheckpoint] = []
    train_end = PeriodicCheckpoint.on_train_end

    def keep(self: PeriodicCheckpoint, *args: object, **kwargs: object) -> None:
        in_loop.append((self.stall_seconds, self.saves))
        train_end(self, *args, **kwargs)  # type: ignore[arg-type]
        finished.append(self)

    PeriodicCheckpoint.on_train_end = keep  # type: ignore[method-assign]
    args = ["fit", "--config", "tiny", "--run_dir", str(run_dir), "--model.model", "llama-120m"]
    args += ["--data.sources", f'{{"pystdlib": {{"path": "{data}", "weight": 1.0}}}}']
    args += ["--data.seq_len", "128", "--data.global_batch_tokens", "256", "--data.micro_batch_size", "2"]
    args += ["--data.val_tokens", "256", "--validate_every_steps", str(10 * steps)]
    args += ["--max_tokens", str(steps * 256), "--trainer.enable_progress_bar", "false"]
    args += ["--checkpoint.every_n_steps", str(every), "--checkpoint.keep_last", "1"]
    args += ["--checkpoint.async_save", str(async_save).lower()]
    start = time.monotonic()
    try:
        if main(args) != 0:
            raise SystemExit("pretrain fit failed")
    finally:
        PeriodicCheckpoint.on_train_end = train_end  # type: ignore[method-assign]
    ((stall, saves),), (checkpoint,) = in_loop, finished
    return stall, saves, checkpoint.stall_seconds - stall, time.monotonic() - start


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "pystdlib" / "out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    per_save: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="checkpoint-stall-", dir=ROOT) as scratch:
        for repeat in range(args.repeats):
            for async_save in (False, True):  # interleaved: drifting machine load hits both alike
                run_dir = Path(scratch) / f"run-{repeat}-{async_save}"
                stall, saves, end, wall = launch(
                    run_dir, args.data.resolve(), async_save, args.steps, args.every
                )
                per_save[async_save].append(stall / saves)
                mode = "async" if async_save else "sync "
                print(
                    f"{mode} launch {repeat}: {stall / saves:.2f} s stall per save in the loop ({saves} saves), "
                    f"{end:.2f} s at the end of training, {wall:.1f} s wall",
                    flush=True,
                )
                shutil.rmtree(run_dir)
    for async_save in (False, True):
        mode = "async" if async_save else "sync"
        print(f"{mode}: median stall per save in the loop {statistics.median(per_save[async_save]):.2f} s")


if __name__ == "__main__":
    main_()
