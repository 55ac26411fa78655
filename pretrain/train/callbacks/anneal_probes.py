"""`AnnealProbes`: launch an anneal probe of every K-th checkpoint of the constant-LR phase.

    trainer:
      callbacks:
        - class_path: pretrain.train.callbacks.anneal_probes.AnnealProbes
          init_args: {every_n_steps: 1000, fraction: 0.2}

Off unless a recipe adds it. At every multiple of `every_n_steps` of the constant phase (a
WarmupStableDecay or Infinite schedule whose LR was constant up to that step), once the periodic checkpoint of that step is
published (`step-N.ckpt` exists: never a `.partial-` one), rank 0 launches
`pretrain anneal RUN_DIR --steps N` (docs/anneal-probes.md): locally as a detached child at low
priority (`nice`), its output in `RUN_DIR/anneal/step-N/launch.log`; inside a SLURM job with
`--submit`, as a job of its own. One line per launch; a launch that fails is one line and
training goes on. A probe never launches probes of its own (`pretrain.anneal.plan.probe_config`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L

from pretrain.anneal.plan import constant_phase_start
from pretrain.anneal.result import probe_dir
from pretrain.run_dir import RunDir
from pretrain.train.callbacks.step_callback import StepCallback
from pretrain.train.schedules import Infinite, WarmupStableDecay


class AnnealProbes(StepCallback):
    """Every `every_n_steps` of the constant phase: a probe decaying over `fraction` of the steps so
    far with `shape` (default: the run's), scored on lm-eval `tasks` when given."""

    def __init__(
        self,
        every_n_steps: int,
        fraction: float = 0.2,
        shape: str | None = None,
        tasks: list[str] | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps <= 0 or not 0.0 < fraction <= 1.0:
            raise ValueError("every_n_steps must be positive and fraction in (0, 1]")
        self.every_n_steps, self.fraction, self.shape, self.tasks = (
            every_n_steps,
            fraction,
            shape,
            tasks or [],
        )
        self._pending: list[int] = []

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if not trainer.is_global_zero:
            return
        if step % self.every_n_steps == 0 and _constant_phase(pl_module, step, trainer.max_steps):
            self._pending.append(step)
        run = RunDir(trainer.default_root_dir)
        for pending in [s for s in self._pending if run.checkpoint(s).exists()]:
            self._pending.remove(pending)
            launch(run.path, pending, self.arguments(pending))

    def arguments(self, step: int) -> list[str]:
        """`pretrain anneal`'s arguments for the probe of `step`."""
        args = ["--steps", str(step), "--fraction", str(self.fraction)]
        if self.shape:
            args += ["--shape", self.shape]
        if self.tasks:
            args += ["--tasks", ",".join(self.tasks)]
        return args


def _constant_phase(pl_module: L.LightningModule, step: int, max_steps: int) -> bool:
    """Whether the steps before `step` ended in the constant phase (a decay may branch from it)."""
    schedule = getattr(pl_module, "lr_schedule", None)
    if not isinstance(schedule, WarmupStableDecay | Infinite):
        return False
    constant = schedule.max_lr if isinstance(schedule, WarmupStableDecay) else schedule.constant_lr
    return step >= constant_phase_start(schedule) and schedule(step - 1, max_steps) == constant


def launch(run_dir: Path, step: int, args: list[str]) -> None:
    """Start `pretrain anneal RUN_DIR ARGS` detached (sbatch inside a SLURM job); one line either way."""
    in_job = "SLURM_JOB_ID" in os.environ
    command = [
        sys.executable,
        "-m",
        "pretrain.cli",
        "anneal",
        str(run_dir),
        *args,
        *(["--submit"] if in_job else []),
    ]
    log = probe_dir(run_dir, step) / "launch.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command if in_job else ["nice", "-n", "19", *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not killed with the training's process group
            )
    except OSError as err:
        print(
            f"anneal probes: could not launch the probe of step {step} ({err}); training goes on",
            file=sys.stderr,
        )
        return
    how = "submitting it as a SLURM job" if in_job else "locally at low priority"
    print(
        f"anneal probes: launched the probe of step {step}, {how} (pid {process.pid}, log {log})",
        file=sys.stderr,
    )
