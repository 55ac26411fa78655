"""Stop cleanly on SIGUSR1/SIGTERM with a checkpoint, and requeue the SLURM job on SIGUSR1.

SLURM warns a job before its time limit with the signal asked for by `#SBATCH --signal=USR1@S`
(sent to every task of the `srun` step), and ends a job (scancel, preemption, the time limit
itself, `scontrol requeue`) with SIGTERM, then SIGKILL `KillWait` seconds later.

- The signal handlers only set a flag (`pretrain.train.signals`, installed by `pretrain fit` before it
  imports torch, so a signal during start-up is kept). Saving inside a handler can hang (the
  handler runs at an arbitrary point, possibly inside a collective or a checkpoint write;
  Lightning issue #21406), so Lightning's own handlers are replaced (`FlagSignalConnector`),
  SLURM auto-requeue included.
- At every optimizer-step boundary (and once when training starts, for a signal that came
  during start-up) all ranks agree on the flags with one all-reduce, so either every rank stops
  at the same step or none does. A flag set during a checkpoint write is read only after it.
- On a stop, every rank saves through the run's `PeriodicCheckpoint.save` (atomic publish; an
  asynchronous write still in flight is finished and published first) and the trainer stops; the
  checkpoint's own write ends, and is published, in `PeriodicCheckpoint.on_train_end`, before this
  callback's `on_train_end` requeues the job. In `on_train_end`, after the step's metrics are logged, rank 0 runs
  `scontrol requeue $SLURM_JOB_ID` if the signal was SIGUSR1, the job's requeue count
  (`SLURM_RESTART_COUNT`) is below `max_requeues` and the launch made progress since the last
  requeue. SIGTERM requeues the same way only when SLURM is ending the job for its time limit
  (squeue reports the reason "TimeLimit"): the USR1 warning was missed or came too late, and the
  step boundary and checkpoint must fit in the cluster's KillWait (30 s by default). Any other
  SIGTERM never requeues from here: a cancelled job must stay cancelled, and SLURM requeues a
  preempted `--requeue` job on its own.
- The requeue count is logged as `train/requeues` and kept, with every stop, in
  `RUN_DIR/requeue.json` (read by `pretrain status`).

`pretrain fit` exits 0 when it finished or requeued its job, and `STOPPED_EXIT_CODE` when it
stopped on a signal without requeueing (the run is not finished; the checkpoint is there).
"""

from __future__ import annotations

import os
import subprocess
import time

import lightning as L
import torch

from pretrain.run_dir import RunDir
from pretrain.train import signals
from pretrain.train.callbacks.periodic_checkpoint import PeriodicCheckpoint
from pretrain.train.callbacks.step_callback import StepCallback
from pretrain.train.private_apis import SignalConnector

STOPPED_EXIT_CODE = 4


class FlagSignalConnector(SignalConnector):
    """Lightning's signal connector with only our flag handlers: no checkpoint or collective
    inside a handler, and no `SIGTERMException` in the middle of gradient accumulation."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = self._get_current_signal_handlers()
        signals.route_signals()


class RequeueOnSignal(StepCallback):
    """Checkpoint (with `checkpoint`) and stop on SIGUSR1/SIGTERM at a step boundary; requeue the
    SLURM job on SIGUSR1."""

    def __init__(self, run: RunDir, checkpoint: PeriodicCheckpoint, max_requeues: int | None = None) -> None:
        super().__init__()
        self.run = run
        self.checkpoint = checkpoint
        self.max_requeues = max_requeues
        self.job_id = os.environ.get("SLURM_JOB_ID")
        self.requeues = int(os.environ.get("SLURM_RESTART_COUNT") or 0)  # times SLURM requeued this job
        self.outcome: str | None = None  # "requeued" or "stopped"
        self.message = ""
        self._signal = signals.NONE

    # ---- hooks ------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and self.job_id:
            self.run.update_requeue_record(
                job_id=self.job_id, requeues=self.requeues, max_requeues=self.max_requeues
            )
        self._check(trainer, pl_module)

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        # Lightning sets trainer.log_every_n_steps without declaring it on Trainer.
        if self.job_id and step % trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            pl_module.log("train/requeues", float(self.requeues), on_step=True)
        self._check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._signal:
            return
        requeued, reason = False, None
        if trainer.is_global_zero:
            reason = self._no_requeue_reason(trainer)
            if reason is None:
                requeued, reason = self._scontrol_requeue()
        requeued, reason = trainer.strategy.broadcast((requeued, reason), src=0)
        name = "SIGUSR1" if self._signal == signals.REQUEUE else "SIGTERM"
        step = trainer.global_step
        self.outcome = "requeued" if requeued else "stopped"
        if requeued:
            limit = f" of {self.max_requeues}" if self.max_requeues is not None else ""
            self.message = f"{name}: saved step {step}, requeued SLURM job {self.job_id} (requeue {self.requeues + 1}{limit})"
        else:
            self.message = f"{name}: saved step {step} and stopped without requeueing ({reason})"
        if trainer.is_global_zero:
            event = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "job_id": self.job_id,
                "restart_count": self.requeues,
                "signal": name,
                "step": step,
                "action": self.outcome,
            }
            events = self.run.requeue_record().get("events", [])
            self.run.update_requeue_record(events=[*events, event])

    # ---- helpers ----------------------------------------------------------------------------

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """All ranks agree on the signal flags; on a signal, save and ask the trainer to stop."""
        if self._signal or trainer.global_step >= trainer.max_steps:
            return
        flag = torch.tensor(signals.received(), dtype=torch.int32, device=pl_module.device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not agreed:
            return
        self._signal = agreed
        self.checkpoint.save(trainer)
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates before an early stop: not now

    def _no_requeue_reason(self, trainer: L.Trainer) -> str | None:
        """Why this stop must not requeue the job, or None if it should."""
        if not self.job_id:
            return "not running under SLURM"
        if self._signal != signals.REQUEUE and not self._at_time_limit():
            return "SIGTERM before the time limit (scancel or preemption): SLURM decides whether the job comes back"
        if self.max_requeues is not None and self.requeues >= self.max_requeues:
            return f"the job was already requeued {self.requeues} times, max_requeues is {self.max_requeues}"
        events = self.run.requeue_record().get("events", [])
        last = events[-1] if events else None
        if last and last["action"] == "requeued" and last["step"] == trainer.global_step:
            return f"no progress since the last requeue at step {last['step']}"
        return None

    def _at_time_limit(self) -> bool:
        """Whether SLURM is ending the job for its time limit (squeue's reason "TimeLimit")."""
        try:
            result = subprocess.run(
                ["squeue", "-h", "-j", str(self.job_id), "-o", "%r"],
                capture_output=True,
                text=True,
                timeout=5,  # well inside KillWait: the checkpoint and the requeue must fit there too
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.stdout.strip() == "TimeLimit"

    def _scontrol_requeue(self) -> tuple[bool, str | None]:
        try:
            result = subprocess.run(
                ["scontrol", "requeue", str(self.job_id)], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return False, f"scontrol requeue failed: {err}"
        if result.returncode != 0:
            return False, f"scontrol requeue failed: {result.stderr.strip() or result.returncode}"
        return True, None
