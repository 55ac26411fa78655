"""`DownstreamEval`: lm-eval benchmarks on the weights being trained, every N optimizer steps.

    trainer:
      callbacks:
        - class_path: pretrain.train.callbacks.downstream.DownstreamEval
          init_args: {tasks: [pystdlib_next_line], every_n_steps: 30, limit: 200}

Logs `downstream/<task>/<metric>` (acc, acc_norm, ...), each metric's standard error
`downstream/<task>/<metric>_stderr` and a multiple-choice task's chance level `downstream/<task>/chance`
(`pretrain.eval.metrics`; so that `pretrain plot` draws them without lm-eval) at the step, to
metrics.csv and every configured logger, at the step of the step's other metrics (Lightning's step, one less than the
optimizer steps taken; `RunDir.read_logs` joins them); `pretrain plot` draws them against tokens. The tasks' datasets are loaded
once, at setup, on every rank: a task whose data is missing (an offline node whose cache lacks
it) stops the launch before the first step, naming the task and `pretrain eval --download`.
Between evaluations the callback costs nothing.

Several processes (FSDP2 or DDP): every rank builds the same requests; each scores its
share (request i goes to rank i mod world, longest first), in the same number of forward passes
on every rank, because an FSDP2 forward gathers each layer's shards from all ranks; the
(log-likelihood, greedy) pairs are all-gathered, so every rank computes the same metrics.
Generation requests are not split (every rank generates all, stopping together). Random
states are restored afterwards, so training continues exactly as without the callback; the
callback keeps no state, so a resumed or requeued run evaluates at the same steps; a launch that
resumes at an evaluation step whose scores the killed launch had not logged yet evaluates it first.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from typing import Any, cast

import lightning as L
import torch.distributed as dist

from pretrain.errors import UserError
from pretrain.run_dir import RunDir, downstream_column
from pretrain.train.callbacks.step_callback import StepCallback
from pretrain.train.callbacks.weight_copies import drop_gathered
from pretrain.train.datamodule import trainer_datamodule


class DownstreamEval(StepCallback):
    """Every `every_n_steps`: lm-eval `tasks` (names, suites, `pystdlib_next_line`) on the current
    weights, at most `limit` examples per task, `num_fewshot` examples in context (default: each
    task's own), `batch_size` sequences per forward pass; `include_path`: a folder of your own
    lm-eval task YAMLs."""

    def __init__(
        self,
        tasks: list[str],
        every_n_steps: int = 1000,
        limit: int | None = 200,
        num_fewshot: int | None = None,
        batch_size: int = 16,
        include_path: str | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or batch_size < 1 or (limit is not None and limit < 1):
            raise UserError("DownstreamEval: every_n_steps, batch_size and limit must be >= 1")
        self.task_names = tasks
        self.every_n_steps = every_n_steps
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.include_path = include_path
        self._tasks: dict[str, Any] = {}
        self.seconds = 0.0  # wall time spent evaluating (`pretrain.train.callbacks.goodput`)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            from pretrain.eval.harness import load_tasks, parse_tasks
        except ImportError:
            raise UserError(
                "DownstreamEval needs lm-evaluation-harness: pip install 'pretrain[eval]'"
            ) from None
        self._tasks = load_tasks(parse_tasks(self.task_names), self.include_path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A launch resuming at an evaluation step evaluates it if the killed launch had not."""
        super().on_train_start(trainer, pl_module)
        step = trainer.global_step
        if step and step % self.every_n_steps == 0:
            # decided on rank 0 and broadcast: a log directory that is not shared cannot split the ranks
            if not trainer.strategy.broadcast(
                self._logged(trainer, step) if trainer.is_global_zero else None
            ):
                self.evaluate(trainer, pl_module, step)

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module, step)

    def _logged(self, trainer: L.Trainer, step: int) -> bool:
        """Whether an earlier launch logged this step's scores (every rank decides the same)."""
        try:
            downstream = RunDir(trainer.default_root_dir).read_logs().downstream()
        except UserError:  # no log written yet
            return False
        return any(step - 1 in series.steps for metrics in downstream.values() for series in metrics.values())

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """Run the tasks now; log and return {column: value}; the time taken adds to `seconds`."""
        start = time.time()
        try:
            return self._evaluate(trainer, pl_module, step)
        finally:
            self.seconds += time.time() - start

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        from pretrain.eval.backend import PretrainLM
        from pretrain.eval.harness import score_tasks
        from pretrain.eval.metrics import is_score

        data = trainer_datamodule(trainer)
        if data.tokenizer_json is None or data.eos_id is None:
            raise UserError("DownstreamEval needs the data's tokenizer.json beside its manifest")
        model = cast(Any, pl_module).model
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        lm = PretrainLM.from_model(
            model,
            data.tokenizer_json,
            data.bos_id,
            data.eos_id,
            self.batch_size,
            group=dist.group.WORLD if distributed else None,
            forward_context=trainer.precision_plugin.val_step_context,
        )
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's progress bars, inside training's
            found = score_tasks(lm, self._tasks, self.num_fewshot, self.limit)
        drop_gathered(model)
        values = {
            downstream_column(task, metric): value
            for task, metrics in found.items()
            for metric, value in metrics.items()
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # at Lightning's step for the metrics of optimizer step `step`
                logger.log_metrics(values, step=step - 1)
            shown = ", ".join(
                f"{task}/{metric} {value:.4f}"
                for task, metrics in found.items()
                for metric, value in metrics.items()
                if is_score(metric)
            )
            print(f"step {step}: {shown}", file=sys.stderr)
        return values
