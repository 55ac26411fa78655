"""`GoodputRecorder`: where this launch's wall time goes, written to `RUN_DIR/goodput/launch-<k>.json`.

Phases (seconds): start-up (from the process's own start, read from /proc, so imports count, to
`on_train_start`: checkpoint load, data verification; torch.compile compiles lazily inside the
first step, which counts as a step), steps (the training loop less the phases below), checkpoint
stalls (`stall_seconds` of `PeriodicCheckpoint`, when it has them), validation, downstream
evaluation (`DownstreamEval.seconds`), teardown (last step to the end of `pretrain fit`). A rollback
records the step seconds spent past its checkpoint; the time to set the rollback up counts as
start-up. Rank 0 writes the record (`pretrain.files.write_json_atomic`) at every checkpoint step,
at most every `every_seconds` otherwise, and at the end; each step also logs `goodput/elapsed_s`.
A record that cannot be written (a full disk) is said in one line, once; training goes on.
The record's format and how it is read back: `pretrain.run_dir.goodput`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

from pretrain.files import write_json_atomic
from pretrain.lease import process_start
from pretrain.run_dir.goodput import ELAPSED, KIND, PHASES, GoodputReport, read_goodput, record_path
from pretrain.train.callbacks.step_callback import StepCallback


def process_start_time() -> float:
    """This process's start as a Unix time (boot time + `pretrain.lease.process_start`'s ticks);
    where there is no /proc, the import time of this module, which misses the imports before it."""
    ticks = process_start(os.getpid())
    try:
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED
    return boot + int(ticks) / os.sysconf("SC_CLK_TCK") if ticks is not None else _IMPORTED


_IMPORTED = time.time()


class GoodputRecorder(StepCallback):
    """Times the phases of one launch (module docstring); one instance lives through rollbacks."""

    def __init__(self, run_dir: str | os.PathLike, launch: int, every_seconds: float = 30.0) -> None:
        super().__init__()
        self.path = record_path(Path(run_dir), launch)
        self.launch = launch
        self.every_seconds = every_seconds
        self.start = process_start_time()
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.marks: list[list[float]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.start_step: int | None = None
        self.last_step = 0
        self._cumulative: dict[int, float] = {}  # step -> step seconds of this launch at its end
        self._last = self._written = 0.0
        self._outside_steps = 0.0  # seconds of the other phases counted since `_last`
        self._validation_start: float | None = None
        self._earlier: GoodputReport | None = None
        self.active = False
        self._write_failed = False

    # ---- phases ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        now, step = time.time(), trainer.global_step
        self._checkpoint_seen = self._stalls(trainer)
        self._downstream_seen = self._downstream(trainer)
        if self.start_step is None:  # the launch's first fit
            self.phases["startup"] = now - self.start
            self.start_step = self.last_step = step
            self._cumulative[step] = 0.0
        else:  # a rollback: the steps past `step` are redone
            self.phases["startup"] += now - self._last
            seconds = self.phases["steps"] - self._seconds_at(step)
            self.rollbacks.append({"from_step": self.last_step, "to_step": step, "seconds": seconds})
            self.last_step = step
            self.marks = [mark for mark in self.marks if mark[0] < step]  # steps only rise along the marks
        self.marks.append([step, self.phases["steps"], now - self.start])
        self._last, self._outside_steps, self.active = now, 0.0, True
        self.write(trainer, force=True)
        if trainer.is_global_zero and self._earlier is None:  # with this launch's record: its lost work
            self._earlier = read_goodput(self.path.parent.parent)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            self._validation_start = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None:
            seconds = time.time() - self._validation_start
            self.phases["validation"] += seconds
            self._outside_steps += seconds
            self._validation_start = None

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        now = time.time()
        self._account_others(trainer)
        self.phases["steps"] += max(0.0, now - self._last - self._outside_steps)
        self._last, self._outside_steps, self.last_step = now, 0.0, step
        self._cumulative[step] = self.phases["steps"]
        if trainer.is_global_zero:
            for logger in trainer.loggers[:1]:  # the CSV log: places the steps after the last write
                logger.log_metrics({ELAPSED: now - self.start}, step=step - 1)
        checkpointed = any(
            cb.every_n_steps and step % cb.every_n_steps == 0 for cb in self._checkpointers(trainer)
        )
        if checkpointed:
            self.marks.append([step, self.phases["steps"], now - self.start])
        self.write(trainer, force=checkpointed)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._account_others(trainer)

    def finish(self, trainer: L.Trainer) -> None:
        """At the end of `pretrain fit` (also after an error): teardown, and the last write."""
        if not self.active:
            return
        self._account_others(trainer)
        self.phases["teardown"] += max(0.0, time.time() - self._last - self._outside_steps)
        self._last, self._outside_steps = time.time(), 0.0
        self.write(trainer, force=True, ended=True)

    def _account_others(self, trainer: L.Trainer) -> None:
        """Add the checkpoint stalls and downstream seconds since the last call to their phases."""
        stalls, downstream = self._stalls(trainer), self._downstream(trainer)
        if stalls < self._checkpoint_seen:  # a rollback's new Trainer: its checkpointer counts from zero
            self._checkpoint_seen = 0.0
        new_stalls, new_downstream = stalls - self._checkpoint_seen, downstream - self._downstream_seen
        self._checkpoint_seen, self._downstream_seen = stalls, downstream
        self.phases["checkpoint"] += new_stalls
        self.phases["downstream"] += new_downstream
        self._outside_steps += new_stalls + new_downstream

    @staticmethod
    def _checkpointers(trainer: L.Trainer) -> list[Any]:
        from pretrain.train.callbacks.periodic_checkpoint import PeriodicCheckpoint

        return [cb for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint)]  # type: ignore[attr-defined]

    def _stalls(self, trainer: L.Trainer) -> float:
        return sum(float(getattr(cb, "stall_seconds", 0.0)) for cb in self._checkpointers(trainer))

    @staticmethod
    def _downstream(trainer: L.Trainer) -> float:
        from pretrain.train.callbacks.downstream import DownstreamEval

        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        return sum(cb.seconds for cb in callbacks if isinstance(cb, DownstreamEval))

    def _seconds_at(self, step: int) -> float:
        """Step seconds of this launch when `step` was reached (0 if before it started)."""
        earlier = [s for s in self._cumulative if s <= step]
        return self._cumulative[max(earlier)] if earlier else 0.0

    # ---- the record -----------------------------------------------------------------------------

    def record(self, ended: bool = False) -> dict[str, Any]:
        return {
            "kind": KIND,
            "launch": self.launch,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": self.start,
            "updated": time.time(),
            "ended": ended,
            "start_step": self.start_step or 0,
            "last_step": self.last_step,
            "phases": self.phases,
            "marks": self.marks + [[self.last_step, self.phases["steps"], time.time() - self.start]],
            "rollbacks": self.rollbacks,
        }

    def write(self, trainer: L.Trainer, force: bool = False, ended: bool = False) -> None:
        """Write the record (rank 0) if forced or `every_seconds` passed; log `goodput/*` then."""
        now = time.time()
        if not trainer.is_global_zero or not (force or now - self._written >= self.every_seconds):
            return
        self._written = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.record(ended))
        except OSError as err:  # a full disk stops training at the next checkpoint, not here
            if not self._write_failed:
                print(
                    f"goodput: cannot write {self.path} ({err.strerror}); training goes on", file=sys.stderr
                )
            self._write_failed = True
        if self.last_step > (self.start_step or 0):  # no log row before the first step
            # after Lightning finalized its loggers (the end), only the CSV log, flushed here
            for logger in trainer.loggers[:1] if ended else trainer.loggers:
                logger.log_metrics(self.metrics(now), step=self.last_step - 1)
                if ended:
                    logger.save()

    def metrics(self, now: float) -> dict[str, float]:
        """goodput/* metrics: this launch's phases and goodput, and the run's so far."""
        wall = now - self.start
        values = {f"goodput/{phase}_s": seconds for phase, seconds in self.phases.items()}
        values["goodput/launch"] = self.phases["steps"] / wall if wall > 0 else 0.0
        useful = self.phases["steps"] - sum(r["seconds"] for r in self.rollbacks)
        earlier = [t for t in self._earlier.launches if t.launch != self.launch] if self._earlier else []
        run_wall = now - min([self.start] + [t.start for t in earlier])
        values["goodput/run"] = (useful + sum(t.useful for t in earlier)) / run_wall if run_wall > 0 else 0.0
        return values
