"""`pretrain submit`'s job: an sbatch script rendered from a recipe, and its submission.

The script comes from `train.sbatch.template` beside this module (shipped in the wheel):
`--nodes` x `--ntasks-per-node` tasks (one per GPU, or `trainer.devices` CPU processes for a CPU
recipe), `--signal=USR1@margin` so that the trainer checkpoints and requeues the job before its
time limit (`pretrain.train.callbacks.requeue`), `--requeue`, `--open-mode=append`, logs in RUN_DIR/slurm/,
and `srun pretrain fit` with the same recipe, whose `resume: auto` continues from the newest
checkpoint after every requeue. It is written to RUN_DIR/slurm/train.sbatch: a plain file to
read, edit and `sbatch` by hand.

Settings missing from the command line come from the recipe's `slurm:` section
(`pretrain.recipe.SlurmSettings`); the recipe's `trainer.num_nodes` and `trainer.devices` must
match the geometry, and its batch geometry is checked as `pretrain fit` checks it
(`pretrain.recipe.BatchGeometry`), so a job that `fit` would refuse is never queued. The recipe,
its overrides and its defaults are read through `pretrain.recipe`. No torch or Lightning import:
submitting starts fast.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, cast

from pretrain.errors import UserError
from pretrain.recipe import BatchGeometry, Recipe, SlurmSettings, as_int
from pretrain.run_dir import RunDir

TEMPLATE = Path(__file__).resolve().parent / "train.sbatch.template"


@dataclass(frozen=True)
class Job:
    """Everything an sbatch script needs, resolved from the command line, the recipe and defaults."""

    config: str
    run_dir: Path
    workdir: Path
    settings: SlurmSettings
    nodes: int
    ntasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    job_name: str
    env_setup: str
    fit_args: tuple[str, ...]

    @property
    def log_dir(self) -> Path:
        return RunDir(self.run_dir).slurm

    @property
    def script_path(self) -> Path:
        return RunDir(self.run_dir).sbatch_script


def time_limit_seconds(limit: str) -> int | None:
    """Seconds in a SLURM time limit ("minutes", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]"); None for
    "UNLIMITED"/"infinite"."""
    if limit.lower() in ("unlimited", "infinite"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = clock.split(":")
    if not all(part.isdigit() for part in parts) or (days and not days.isdigit()) or len(parts) > 3:
        raise UserError(f"time limit {limit!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    numbers = [int(part) for part in parts]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        numbers += [0] * (3 - len(numbers))
        return int(days) * 86400 + numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(numbers)]
    return sum(n * unit for n, unit in zip(numbers, units))


def resolve_job(
    config: str,
    cli: Mapping[str, Any],
    overrides: Sequence[str] = (),
    workdir: Path | None = None,
) -> Job:
    """Merge command-line settings (`cli`, None = not given) over the recipe's `slurm:` section and
    the defaults, and check the geometry against the recipe's trainer and data sections."""
    workdir = workdir or Path.cwd()
    recipe = Recipe.load(config, overrides)
    settings = _slurm_settings(recipe, cli)
    run_dir = Path(str(recipe.get("run_dir")))
    if str(recipe.get("resume")) == "none":
        raise UserError(
            "resume: none cannot be submitted: a requeued job must continue from its own checkpoints "
            "(resume: auto); start a fresh run with a new run_dir instead"
        )
    nodes, ntasks, gpus = _tasks(recipe, settings)
    _check_length(recipe, recipe.geometry(ntasks, nodes))  # what `pretrain fit` checks on these processes
    _check_time_limit(settings)
    job_name = settings.job_name or f"pretrain-{(workdir / run_dir).resolve().name}"
    _check_script_values(config, settings, run_dir=run_dir, workdir=workdir, job_name=job_name)
    fit_args = ["--config", config]
    if cli.get("max_requeues") is not None:
        fit_args += ["--slurm.max_requeues", str(cli["max_requeues"])]
    num_workers = as_int(recipe.get("data.num_workers"), "data.num_workers")
    return Job(
        config=config,
        run_dir=run_dir,
        workdir=workdir,
        settings=settings,
        nodes=nodes,
        ntasks_per_node=ntasks,
        gpus_per_node=gpus,
        cpus_per_task=settings.cpus_per_task or num_workers + 1,
        job_name=job_name,
        env_setup=settings.env_setup if settings.env_setup is not None else default_env_setup(workdir),
        fit_args=(*fit_args, *overrides),
    )


def _tasks(recipe: Recipe, settings: SlurmSettings) -> tuple[int, int, int]:
    """(nodes, tasks per node, GPUs per node) of the job, agreeing with the recipe's trainer section."""
    accelerator = str(recipe.get("trainer.accelerator"))
    devices = recipe.get("trainer.devices")
    trainer_nodes = as_int(recipe.get("trainer.num_nodes"), "trainer.num_nodes")
    nodes = settings.nodes if settings.nodes is not None else trainer_nodes
    if nodes != trainer_nodes:
        raise UserError(
            f"the job asks for {nodes} node(s) but the recipe's trainer.num_nodes is {trainer_nodes}: "
            f"make them agree (e.g. add `-- --trainer.num_nodes {nodes}`)"
        )
    on_cpu = accelerator == "cpu"
    if settings.gpus_per_node is not None:
        gpus = settings.gpus_per_node
    elif on_cpu:
        gpus = 0
    elif devices == "auto":
        raise UserError(
            "trainer.devices is 'auto': give --gpus-per-node (or slurm.gpus_per_node) for a GPU job, "
            "or set trainer.accelerator: cpu"
        )
    else:
        gpus = as_int(devices, "trainer.devices")
    if accelerator in ("gpu", "cuda") and not gpus:
        raise UserError(
            f"the recipe trains on GPUs (trainer.accelerator: {accelerator}) but the job asks for no GPU "
            "per node: give --gpus-per-node N >= 1, or set trainer.accelerator: cpu"
        )
    if on_cpu and gpus:
        raise UserError(
            f"the recipe trains on the CPU (trainer.accelerator: cpu) but the job asks for {gpus} GPUs"
        )
    if gpus and devices != "auto" and as_int(devices, "trainer.devices") != gpus:
        raise UserError(
            f"the job asks for {gpus} GPU(s) per node but the recipe's trainer.devices is {devices}: "
            f"one task per GPU needs trainer.devices: {gpus} (e.g. add `-- --trainer.devices {gpus}`)"
        )
    ntasks = gpus or (1 if devices == "auto" else as_int(devices, "trainer.devices"))
    if min(nodes, ntasks) < 1:
        raise UserError(f"a job needs at least one node and one task per node, got {nodes} x {ntasks}")
    return nodes, ntasks, gpus


def _check_length(recipe: Recipe, geometry: BatchGeometry) -> None:
    """The run's length must be set once, as `pretrain fit` requires (max_tokens or trainer.max_steps)."""
    max_tokens, max_steps = recipe.get("max_tokens"), recipe.get("trainer.max_steps")
    geometry.max_steps(
        None if max_tokens is None else as_int(max_tokens, "max_tokens"),
        None if max_steps in (None, -1) else as_int(max_steps, "trainer.max_steps"),
    )


def _check_time_limit(settings: SlurmSettings) -> None:
    """The signal margin must be shorter than the time limit."""
    # SlurmSettings.__post_init__ rejects an int time, so a set time is text here.
    limit = time_limit_seconds(cast(str, settings.time)) if settings.time else None
    if limit is not None and settings.signal_margin >= limit:
        raise UserError(
            f"the signal margin ({settings.signal_margin} s) must be shorter than the time limit "
            f"({settings.time} = {limit} s): the job would be told to requeue as it starts"
        )


def _check_script_values(
    config: str, settings: SlurmSettings, run_dir: Path, workdir: Path, job_name: str
) -> None:
    """Values that land on #SBATCH lines (or in the script's comments) must stay on their line."""
    sbatch_values = {
        "run directory": run_dir,
        "working directory": workdir,
        "job name": job_name,
        **{
            f"slurm.{name}": getattr(settings, name)
            for name in ("time", "partition", "account", "qos", "constraint")
        },
    }
    for what, value in sbatch_values.items():
        if value is not None and any(c.isspace() or not c.isprintable() for c in str(value)):
            raise UserError(
                f"the {what} {str(value)!r} contains white space or a control character, which an #SBATCH line "
                "cannot hold (a newline would start a line of its own in the job script)"
            )
    if not config.isprintable():
        raise UserError(
            f"the recipe path {config!r} contains a control character (a newline?): rename the file"
        )
    if any(not c.isprintable() and c not in "\n\t" for c in settings.env_setup or ""):
        raise UserError(
            f"slurm.env_setup {settings.env_setup!r} contains a control character other than a newline"
        )


def _slurm_settings(recipe: Recipe, cli: Mapping[str, Any]) -> SlurmSettings:
    """The recipe's `slurm:` section with the command line's settings (None: not given) over it."""
    section = recipe.section("slurm")
    fields = {f.name for f in dataclasses.fields(SlurmSettings)}
    if not isinstance(section, dict) or set(section) - fields:
        unknown = sorted(set(section) - fields) if isinstance(section, dict) else section
        raise UserError(
            f"{recipe.path}: unknown slurm setting(s) {unknown}; known: {', '.join(sorted(fields))}"
        )
    return SlurmSettings(**(section | {k: v for k, v in cli.items() if v is not None and k in fields}))


def default_env_setup(workdir: Path) -> str:
    """Activate the virtual environment this command runs from (relative to `workdir` if inside)."""
    if sys.prefix == sys.base_prefix:
        return ""
    venv = Path(sys.prefix)
    if venv.is_relative_to(workdir):
        venv = venv.relative_to(workdir)
    return f"source {shlex.quote(str(venv / 'bin' / 'activate'))}"


def render(job: Job) -> str:
    """The sbatch script for `job`, from the template shipped in this package."""
    s = job.settings
    options = [f"--gres=gpu:{job.gpus_per_node}"] if job.gpus_per_node else []
    for name in ("time", "partition", "account", "qos", "constraint"):
        if getattr(s, name):
            options.append(f"--{name}={getattr(s, name)}")
    try:
        text = TEMPLATE.read_text()
    except OSError as err:
        raise UserError(f"cannot read the sbatch template {TEMPLATE}: {err}") from err
    return Template(text).substitute(
        config=job.config,
        job_name=job.job_name,
        workdir=job.workdir,
        nodes=job.nodes,
        ntasks_per_node=job.ntasks_per_node,
        cpus_per_task=job.cpus_per_task,
        options="".join(f"#SBATCH {option}\n" for option in options),
        signal_margin=s.signal_margin,
        log_dir=job.log_dir,
        env_setup=job.env_setup or "# (none: `pretrain` must be on PATH)",
        fit_command=shlex.join(["pretrain", "fit", *job.fit_args]),
    )


def submit(job: Job) -> str:
    """Write the script into the run directory, `sbatch` it, record and return the job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: submit from a SLURM login node (--dry-run only prints the script)")
    script = render(job)
    run = RunDir(job.workdir / job.run_dir)
    run.slurm.mkdir(parents=True, exist_ok=True)
    run.sbatch_script.write_text(script)
    result = subprocess.run(
        ["sbatch", "--parsable", str(run.sbatch_script)], capture_output=True, text=True, cwd=job.workdir
    )
    if result.returncode != 0:
        raise UserError(f"sbatch {run.sbatch_script} failed: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    run.record_job(job_id)
    return job_id
