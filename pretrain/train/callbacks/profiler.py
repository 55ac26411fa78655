"""`StepProfiler`: a torch profiler trace of optimizer steps A to B, on request.

    pretrain fit --config tiny --profile.steps 2:3      # or, in a recipe:  profile: {steps: "2:3"}

Steps are counted like the logs' optimizer steps, 1 for the first; A:B profiles steps A to B
inclusive. Writes `RUN_DIR/profile/trace-steps-A-B[-rank-R].json` (a Chrome trace: open it in
chrome://tracing or https://ui.perfetto.dev) and, on a GPU, `memory-steps-A-B[-rank-R].pickle`
(a CUDA memory snapshot for https://pytorch.org/memory_viz), then prints the top operations by
self time in a few lines. `pretrain fit` adds this callback only when `profile.steps` is given:
when it is not, no profiler exists and no hook runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pretrain.errors import UserError
from pretrain.files import write_atomic_with
from pretrain.train import private_apis
from pretrain.train.callbacks.step_callback import StepCallback

TOP_OPS = 8


def parse_steps(text: str) -> tuple[int, int]:
    """`A:B` -> (A, B) with 1 <= A <= B; anything else is a UserError naming `profile.steps`."""
    first, sep, last = str(text).partition(":")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise UserError(f"profile.steps {text!r}: give A:B, two optimizer steps counted from 1 (e.g. 2:3)")
    start, stop = int(first), int(last)
    if start < 1 or stop < start:
        raise UserError(f"profile.steps {text!r}: need 1 <= A <= B (e.g. 2:3 profiles steps 2 and 3)")
    return start, stop


class StepProfiler(StepCallback):
    """Profiles optimizer steps `steps` = "A:B" (module docstring); `run_dir` is set by `pretrain fit`."""

    def __init__(self, steps: str | None = None, run_dir: str | os.PathLike = ".") -> None:
        super().__init__()
        if steps is None:
            raise UserError("profile.steps: give A:B (e.g. 2:3)")
        self.first, self.last = parse_steps(steps)
        self.out = Path(run_dir) / "profile"
        self._profile: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step >= self.last and trainer.is_global_zero:
            print(
                f"profile.steps {self.first}:{self.last}: this launch starts after step {trainer.global_step}; "
                "nothing profiled",
                file=sys.stderr,
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to
        if self._profile is None and self.first <= step <= self.last:
            if pl_module.device.type == "cuda":
                private_apis.record_cuda_memory_history(True)
            self._profile = torch.profiler.profile(
                activities=torch.profiler.supported_activities(), record_shapes=True
            )
            self._profile.__enter__()

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if self._profile is not None and step >= self.last:
            self._finish(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._profile is not None:  # training ended inside the window
            self._finish(trainer, pl_module)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        suffix = f"steps-{self.first}-{self.last}" + (
            f"-rank-{trainer.global_rank}" if trainer.world_size > 1 else ""
        )
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace-{suffix}.json"
        write_atomic_with(trace, lambda tmp: profile.export_chrome_trace(str(tmp)))
        written = [trace]
        if pl_module.device.type == "cuda":
            snapshot = self.out / f"memory-{suffix}.pickle"
            write_atomic_with(snapshot, lambda tmp: private_apis.dump_cuda_memory_snapshot(str(tmp)))
            private_apis.record_cuda_memory_history(False)
            written.append(snapshot)
        if trainer.is_global_zero:
            print(top_operations(profile, self.first, self.last), file=sys.stderr)
            print(f"profile: wrote {', '.join(map(str, written))}", file=sys.stderr)


def top_operations(profile: Any, first: int, last: int, count: int = TOP_OPS) -> str:
    """A few lines: the operations that took the most self time (device time on a GPU) in the window."""
    events = profile.key_averages()
    on_device = any(getattr(e, "self_device_time_total", 0) for e in events)
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:count]
    total = sum(getattr(e, key) for e in events) or 1
    where = "device" if on_device else "CPU"
    lines = [f"profile: top {len(top)} operations by self {where} time, steps {first}-{last}:"]
    for event in top:
        micros = getattr(event, key)
        lines.append(
            f"  {micros / 1e3:9.1f} ms {100 * micros / total:5.1f}%  {event.count:6d} calls  {event.key}"
        )
    return "\n".join(lines)
