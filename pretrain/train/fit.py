"""`pretrain fit`'s trainer: LightningCLI over `PretrainModule` + `PretrainDataModule`, with run
directories (`pretrain.run_dir`), derived batch geometry, and `--resume auto|none|PATH`.

    pretrain fit --config configs/tiny.yaml [--section.key value ...] [--print_config]

Besides the usual `trainer`, `model` and `data` sections, a recipe has:
- `run_dir`: where logs (`logs/version_<k>/metrics.csv`, one version per launch), checkpoints
  and the resolved config of each launch go;
- `max_tokens`: training length in tokens (sets `trainer.max_steps`);
- `validate_every_steps`: validation cadence in optimizer steps;
- `resume`: `auto` (default: newest complete checkpoint in the run dir, else start fresh),
  `none`, or a checkpoint path;
- `checkpoint`: cadence and retention (`pretrain.train.callbacks.periodic_checkpoint.PeriodicCheckpoint`);
- `profile`: `steps: A:B` profiles those optimizer steps (`pretrain.train.callbacks.profiler`);
- `slurm`: `pretrain submit`'s settings (`pretrain.recipe.SlurmSettings`).

Defaults a recipe leaves out and the batch geometry (gradient accumulation = global_batch_tokens /
(micro_batch_size * seq_len * devices * num_nodes), its checks and messages) come from
`pretrain.recipe`, which `pretrain submit` reads too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import ModelParallelStrategy

from pretrain import recipe
from pretrain.errors import UserError
from pretrain.model.checkpoint import check_sharded_checkpoint, checkpoint_identity
from pretrain.model.config import get_preset
from pretrain.model.flops import count_parameters, flops_per_token
from pretrain.run_dir import RunDir, describe_incidents
from pretrain.train import private_apis, rollback
from pretrain.train.callbacks import requeue
from pretrain.train.callbacks.final_validation import FinalValidation
from pretrain.train.callbacks.goodput import GoodputRecorder
from pretrain.train.callbacks.monitor import TrainingMonitor
from pretrain.train.callbacks.periodic_checkpoint import (
    TRAINING_CHECKPOINTS,
    DirectCheckpointIO,
    PeriodicCheckpoint,
)
from pretrain.train.callbacks.profiler import StepProfiler, parse_steps
from pretrain.train.callbacks.progress_bar import StepProgressBar
from pretrain.train.datamodule import PretrainDataModule
from pretrain.train.module import PretrainModule


def count_devices(devices: Any, accelerator: Any) -> int:
    """Devices per node as the Trainer will see them ("auto" -> all GPUs, or 1 CPU process)."""
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    on_gpu = str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return torch.cuda.device_count() if on_gpu else 1


def default_precision(accelerator: Any) -> str:
    """bf16-mixed when training on a GPU that supports bf16, float32 otherwise (the CPU)."""
    wants_gpu = str(accelerator) in ("gpu", "cuda", "auto")
    has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if wants_gpu and has_bf16 else "32-true"


# Lightning/jsonargparse notices that say nothing actionable about a pretrain run.
QUIET = [
    r"LightningCLI's args parameter is intended",  # we pass the arguments after `pretrain fit`
    r"Your `IterableDataset` has `__len__` defined",  # validation sets: exact per-rank lengths
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"\s*skip_none parameter was deprecated",
    r"It is recommended to use `self.log\('val/",  # validation metrics are reduced before logging
]


class _DropTips(logging.Filter):
    """Lightning's advertisement for its own logger service, printed on every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


class FitCLI(LightningCLI):
    def __init__(self, args: Sequence[str] | None) -> None:
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        super().__init__(
            PretrainModule,
            PretrainDataModule,
            run=False,
            args=list(args) if args is not None else None,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=1337,
            parser_kwargs={
                "prog": "pretrain fit",
                "description": __doc__.split("\n\n")[0],
                "exit_on_error": False,  # `fit` prints the one line that matters, not the usage
                "allow_abbrev": False,  # --trainer.max_step is a typo, not --trainer.max_steps
            },
            # Lightning's summary table reads "FLOPs 0" for this model: `model` prints ours instead.
            trainer_defaults={
                "use_distributed_sampler": False,
                "enable_checkpointing": False,
                "enable_model_summary": False,
            },
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        defaults = recipe.DEFAULTS
        parser.add_argument("--run_dir", type=str, default=defaults["run_dir"], help="run directory")
        parser.add_argument(
            "--resume", type=str, default=defaults["resume"], help="auto | none | PATH to a checkpoint"
        )
        parser.add_argument(
            "--max_tokens", type=int | None, default=defaults["max_tokens"], help="train for this many tokens"
        )
        parser.add_argument(
            "--validate_every_steps", type=int | None, default=None, help="validate every N optimizer steps"
        )
        parser.add_argument(
            "--branch_from",
            type=str | None,
            default=None,
            help="start this run from another run's checkpoint with its optimizer, step and data position "
            "(e.g. a WSD/infinite decay branched off the constant phase); later launches resume this run",
        )
        parser.add_class_arguments(PeriodicCheckpoint, "checkpoint", skip={"run_dir"})
        parser.add_class_arguments(StepProfiler, "profile", skip={"run_dir"}, instantiate=False)
        # `pretrain submit` settings; `pretrain fit` itself uses only slurm.max_requeues.
        parser.add_class_arguments(recipe.SlurmSettings, "slurm")
        parser.set_defaults({key: value for key, value in defaults.items() if "." in key})

    def before_instantiate_classes(self) -> None:
        c = self.config
        trainer, data = c.trainer, c.data
        if data.num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {data.num_workers}")
        if c.profile.steps is not None:
            parse_steps(c.profile.steps)  # a typo stops the launch before the model is built
        geometry = recipe.BatchGeometry(
            devices=count_devices(trainer.devices, trainer.accelerator),
            nodes=trainer.num_nodes or 1,
            micro_batch_size=data.micro_batch_size,
            seq_len=data.seq_len,
            global_batch_tokens=data.global_batch_tokens,
        )
        model = get_preset(c.model.model).replace(**(c.model.model_overrides or {}))
        if data.seq_len > (context := model.max_seq_len):
            raise UserError(
                f"data.seq_len {data.seq_len} exceeds the model's context of {context} tokens (max_seq_len): lower "
                f"data.seq_len, or raise model.model_overrides.max_seq_len"
            )
        trainer.accumulate_grad_batches = geometry.accumulation
        trainer.max_steps = geometry.max_steps(c.max_tokens, trainer.max_steps)
        trainer.max_epochs = -1  # the data stream is endless (epochs are walked inside it)
        if trainer.precision is None:
            trainer.precision = default_precision(trainer.accelerator)
        if c.validate_every_steps:
            trainer.val_check_interval = c.validate_every_steps * trainer.accumulate_grad_batches
            trainer.check_val_every_n_epoch = None
        trainer.default_root_dir = c.run_dir
        self.geometry = geometry
        print(geometry.describe(trainer.max_steps), file=sys.stderr)
        print(
            f"model: {c.model.model} preset, {count_parameters(model).total:,} parameters, "
            f"{flops_per_token(model, data.seq_len) / 1e9:.3g} GFLOP per token (training, seq_len {data.seq_len})",
            file=sys.stderr,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        run = RunDir(self.config.run_dir)
        trainer_init = self.config_init.get("trainer") or {}
        configured = trainer_init.get("logger")
        # Flushed every step, so that a killed run loses at most the row being written.
        csv_logger = CSVLogger(
            run.path, name="logs", version=run.next_log_version(), flush_logs_every_n_steps=1
        )
        loggers: list[Logger] = [csv_logger]
        if isinstance(configured, Logger):
            loggers.append(configured)
        elif isinstance(configured, list):
            loggers.extend(configured)
        self.checkpoint = PeriodicCheckpoint(run_dir=run.path, **self.config.checkpoint)
        self.on_signal = requeue.RequeueOnSignal(run, self.checkpoint, self.config.slurm.max_requeues)
        monitor = TrainingMonitor()
        if not hasattr(self, "goodput"):  # one per launch, kept through rollbacks
            self.goodput = GoodputRecorder(run.path, int(csv_logger.version or 0))
        callbacks: list[Any] = [self.checkpoint, self.on_signal, monitor, self.goodput]
        if self.config.profile.steps is not None:  # off: no profiler, no hook
            callbacks.append(StepProfiler(self.config.profile.steps, run.path))
        if self.config.trainer.enable_progress_bar is not False:
            callbacks.append(StepProgressBar(monitor))
        if self.config.validate_every_steps:
            callbacks.append(FinalValidation(self.config.validate_every_steps))
        self.trainer_defaults["callbacks"] = callbacks
        if "SLURM_JOB_ID" not in os.environ:  # outside a job, not launching with srun is expected
            warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
        plugins = trainer_init.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]  # a rollback instantiates again
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(DirectCheckpointIO())  # written beside its destination, never in $TMPDIR
        if SLURMEnvironment.detect():  # launched by srun: ranks come from SLURM, requeue from us
            recipe.check_srun_geometry(self.geometry.devices, self.geometry.nodes)
            plugins.append(SLURMEnvironment(auto_requeue=False))
        kwargs["plugins"] = plugins
        if not hasattr(
            self, "_recipe_callbacks"
        ):  # Lightning extends the list it is given: keep the recipe's
            given = trainer_init.get("callbacks") or []
            self._recipe_callbacks = list(given) if isinstance(given, list) else [given]
        kwargs["callbacks"] = list(self._recipe_callbacks)
        trainer = super().instantiate_trainer(logger=loggers, **kwargs)
        private_apis.replace_signal_connector(trainer, requeue.FlagSignalConnector(trainer))
        return trainer


def fit(args: Sequence[str] | None = None) -> int:
    """Entry point of `pretrain fit`; returns the process exit code: 0 when training finished or
    requeued its SLURM job, 3 when it stopped after non-finite steps, `requeue.STOPPED_EXIT_CODE`
    (4) when a signal stopped it with a checkpoint and the job was not requeued."""
    try:
        cli = FitCLI(args)
    except ArgumentError as err:  # jsonargparse: a typo, a wrong type, a missing file
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise UserError(f"{message} (see `pretrain fit --help`)") from None
    run = RunDir(cli.config.run_dir, TRAINING_CHECKPOINTS)
    owner = launched_as_rank_zero()  # the other ranks are the same run: only rank 0 holds the lease
    if owner:
        run.acquire()
    try:
        return _fit(cli, run)
    except BaseException:
        if owner:  # a launch that failed before its first logged step leaves no empty log version
            run.drop_log_version_without_metrics(cli.trainer.loggers[0].version or 0)
        raise
    finally:
        cli.goodput.finish(cli.trainer)
        if owner:
            run.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning leaves the process group up; gloo's threads then abort the exit at random
            # ("terminate called without an active exception") after a run that finished.
            torch.distributed.destroy_process_group()


def launched_as_rank_zero() -> bool:
    """Whether this process is rank 0 of its launch (srun, torchrun or Lightning's own launcher)."""
    return all(
        os.environ.get(name, "0") == "0" for name in ("SLURM_PROCID", "RANK", "NODE_RANK", "LOCAL_RANK")
    )


def _fit(cli: FitCLI, run: RunDir) -> int:
    if cli.model.hparams.init_from and cli.config.resume not in ("auto", "none"):
        raise UserError(
            "model.init_from (start a new stage from weights) and --resume PATH (continue a run with its "
            "optimizer and step) exclude each other; a stage resumes its own run with --resume auto"
        )
    ckpt_path = run.resolve_resume(cli.config.resume, set_aside=launched_as_rank_zero())
    if cli.config.branch_from:
        if cli.model.hparams.init_from or cli.config.resume not in ("auto", "none"):
            raise UserError(
                "branch_from excludes model.init_from and --resume PATH: give only one starting point"
            )
        if ckpt_path is None:  # first launch of the branch; later launches resume the branch's own run
            if cli.config.branch_from in ("auto", "none"):
                raise UserError(
                    f"branch_from: {cli.config.branch_from}: give the path of the checkpoint to branch from"
                )
            ckpt_path = Path(cli.config.branch_from)
            if not ckpt_path.exists():
                raise UserError(f"branch_from {ckpt_path}: no such checkpoint")
            cli.model.branched_from = str(ckpt_path.resolve())
    if (
        ckpt_path is not None
        and ckpt_path.is_dir()
        and not isinstance(cli.trainer.strategy, ModelParallelStrategy)
    ):
        raise UserError(
            f"{ckpt_path} is a sharded FSDP2 checkpoint (a folder): resume it with trainer.strategy: fsdp2, "
            "on any number of devices (one included)"
        )
    if ckpt_path is not None and ckpt_path.is_dir():
        check_sharded_checkpoint(ckpt_path)  # a downloaded folder must not run code when loaded
    if ckpt_path is not None and launched_as_rank_zero():
        for aside in run.set_aside_after(ckpt_path):  # the later ones belong to the path not taken
            print(f"resuming from an earlier step: set a later checkpoint aside as {aside}", file=sys.stderr)
    if ckpt_path is not None:
        print(f"resuming from {ckpt_path}", file=sys.stderr)
        if cli.config.branch_from and cli.model.branched_from:
            cli.model.new_stage = f"a branch from {ckpt_path}"
        cli.model.resuming = True  # the checkpoint restores the weights: skip model.init_from
    elif cli.model.hparams.init_from:
        print(f"new stage: initial weights from {cli.model.hparams.init_from}", file=sys.stderr)
    if ckpt_path is not None:
        cli.model.own_checkpoint_ids.add(checkpoint_identity(ckpt_path))
    rollback.restore_run_state(run, cli.model, cli.datamodule)
    while True:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        if cli.model.divergence is None:
            break
        rolling_back = cli.model.divergence.action == "rollback"
        kept = cli.model.divergence.checkpoint
        if kept is not None and cli.trainer.is_global_zero:  # before the record: a kill in between replays it
            for aside in run.set_aside_after(kept):  # from the streak's first step on: suspect
                print(f"divergence: set a later checkpoint aside as {aside}", file=sys.stderr)
        entry = rollback.record(cli.trainer, run, cli.model, cli.datamodule)
        if not rolling_back:
            break
        ckpt_path = rollback.prepare_rollback(entry, cli.model, cli.datamodule)
        if cli.trainer.is_global_zero:
            rollback.announce(entry, cli.model)
        cli.trainer = cli.instantiate_trainer()
    _print_guard_summary(cli)
    if cli.model.stop_reason:
        print(f"pretrain fit: stopped: {cli.model.stop_reason}", file=sys.stderr)
        return 3
    on_signal = cli.on_signal
    if on_signal.outcome is not None:  # 0: the job is queued again; else the run is not finished
        if cli.trainer.is_global_zero:
            print(f"pretrain fit: {on_signal.message}", file=sys.stderr)
        return 0 if on_signal.outcome == "requeued" else requeue.STOPPED_EXIT_CODE
    if cli.trainer.is_global_zero:
        log_dir = cli.trainer.loggers[0].log_dir
        print(f"done: checkpoints in {run.checkpoints}, logs in {log_dir}", file=sys.stderr)
    return 0


def _print_guard_summary(cli: FitCLI) -> None:
    """One line on what the spike guard did over the run, if anything."""
    module, run = cli.model, RunDir(cli.config.run_dir)
    incidents = tuple(run.incidents(strict=False))
    if cli.trainer.is_global_zero and (module.skipped_steps or module.grad_norm_outliers or incidents):
        print(
            f"spike guard: {describe_incidents(module.skipped_steps, incidents)}; {module.grad_norm_outliers} "
            f"gradient-norm outlier(s) kept (clipping bounds them); details in {run.incidents_file}",
            file=sys.stderr,
        )
