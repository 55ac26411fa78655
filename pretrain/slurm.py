"""SLURM: `pretrain submit` renders and submits an sbatch script for a recipe; `pretrain status`
reports on a run; `check_srun_geometry` guards `pretrain fit` under `srun`.

    pretrain submit --config configs/X.yaml [--nodes N] [--gpus-per-node G] [--time HH:MM:SS] ...
                    [--dry-run] [-- extra `pretrain fit` overrides]
    pretrain status RUN_DIR

The script comes from `slurm/train.sbatch.template`: `--nodes` x `--ntasks-per-node` tasks (one
per GPU, or `trainer.devices` CPU processes for a CPU recipe), `--signal=USR1@margin` so that the
trainer checkpoints and requeues the job before its time limit (`pretrain.train.requeue`),
`--requeue`, `--open-mode=append`, logs in RUN_DIR/slurm/, and `srun pretrain fit` with the same
recipe, whose `resume: auto` continues from the newest checkpoint after every requeue. It is
written to RUN_DIR/slurm/train.sbatch: a plain file to read, edit and `sbatch` by hand.

Settings missing from the command line come from the recipe's `slurm:` section
(`SlurmSettings`); the recipe's `trainer.num_nodes` and `trainer.devices` must match the
geometry. This module stays free of torch and Lightning imports, so both commands start fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from pretrain.errors import UserError

if TYPE_CHECKING:
    import argparse

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch.template"
JOBS_FILE = "jobs.jsonl"  # in RUN_DIR/slurm/: one line per submitted job


@dataclass
class SlurmSettings:
    """The `slurm:` section of a recipe; `pretrain submit --field-name` overrides each field.

    Args:
        nodes: number of nodes (default: `trainer.num_nodes`, else 1).
        gpus_per_node: GPUs per node, one task each (default: `trainer.devices` for a GPU recipe,
            0 for a CPU recipe, which runs `trainer.devices` tasks per node).
        cpus_per_task: CPU cores per task (default: `data.num_workers` + 1).
        time: time limit, e.g. "2-00:00:00" or "48:00:00" (default: the partition's).
        partition: partition (queue) to submit to.
        account: account to charge.
        qos: quality of service.
        constraint: node features, e.g. "h100".
        signal_margin: seconds before the time limit at which SLURM sends SIGUSR1 to the trainer,
            which then checkpoints and requeues the job (SLURM may send it up to 60 s earlier).
        max_requeues: how many times a job may requeue itself (default: no limit).
        env_setup: shell lines run before `srun`, e.g. "module load cuda; source .venv/bin/activate"
            (default: activate the virtual environment `pretrain submit` runs from).
        job_name: job name (default: "pretrain-" + the run directory's name).
    """

    nodes: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | int | None = None  # int only to say clearly that YAML read an unquoted H:MM:SS
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_margin: int = 300
    max_requeues: int | None = None
    env_setup: str | None = None
    job_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.time, int) and not isinstance(self.time, bool):
            raise UserError(
                f"slurm.time: YAML read an unquoted time limit as the number {self.time} (48:00:00 reads "
                'as 172800); quote it, e.g. time: "48:00:00"'
            )
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            wanted = int if str(field.type).startswith("int") else str  # "int | None", "str | None"
            if value is not None and (not isinstance(value, wanted) or isinstance(value, bool)):
                raise UserError(
                    f"slurm.{field.name}: expected {'a whole number' if wanted is int else 'text'}, "
                    f"got {value!r} ({type(value).__name__})"
                )


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
        return self.run_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.log_dir / "train.sbatch"


# ---- geometry --------------------------------------------------------------------------------


def check_srun_geometry(devices: int, num_nodes: int, environ: Mapping[str, str] = os.environ) -> None:
    """Under `srun`: SLURM must have started trainer.num_nodes x trainer.devices tasks."""
    ntasks = int(environ.get("SLURM_NTASKS", "1"))
    nnodes = int(environ.get("SLURM_NNODES", "1"))
    if ntasks > 1 and "SLURM_NTASKS_PER_NODE" not in environ:
        raise UserError(
            f"SLURM started {ntasks} tasks from `--ntasks`: give `#SBATCH --ntasks-per-node` instead "
            "(one task per device; `pretrain submit` renders it)"
        )
    if nnodes != num_nodes or ntasks != devices * num_nodes:
        raise UserError(
            f"SLURM started {ntasks} task(s) on {nnodes} node(s), but the recipe trains on "
            f"trainer.num_nodes={num_nodes} x trainer.devices={devices} = {devices * num_nodes} processes: "
            "`#SBATCH --nodes` must equal trainer.num_nodes and `--ntasks-per-node` trainer.devices "
            "(`pretrain submit` renders both from the recipe)"
        )


def _override_values(overrides: Sequence[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs of `pretrain fit` overrides, by key (last one wins)."""
    values: dict[str, str] = {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if arg.startswith("--") and "=" in arg:
            key, _, value = arg[2:].partition("=")
            values[key] = value
        elif arg.startswith("--") and i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            values[arg[2:]] = overrides[i + 1]
            i += 1
        i += 1
    return values


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise UserError(f"{what} must be a whole number for `pretrain submit`, got {value!r}")
    return int(value)


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


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read recipe {path}: {err}") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with trainer/model/data sections")
    return recipe


def resolve_job(
    config: str,
    cli: Mapping[str, Any],
    overrides: Sequence[str] = (),
    workdir: Path | None = None,
) -> Job:
    """Merge command-line settings (`cli`, None = not given) over the recipe's `slurm:` section and
    the defaults, and check the geometry against the recipe's trainer section."""
    import yaml

    workdir = workdir or Path.cwd()
    recipe = load_recipe(config)
    section = recipe.get("slurm") or {}
    fields = {f.name for f in dataclasses.fields(SlurmSettings)}
    if not isinstance(section, dict) or set(section) - fields:
        unknown = sorted(set(section) - fields) if isinstance(section, dict) else section
        raise UserError(f"{config}: unknown slurm setting(s) {unknown}; known: {', '.join(sorted(fields))}")
    settings = SlurmSettings(**(section | {k: v for k, v in cli.items() if v is not None and k in fields}))

    given = {k: yaml.safe_load(v) for k, v in _override_values(overrides).items()}
    trainer = recipe.get("trainer") or {}
    accelerator = str(given.get("trainer.accelerator", trainer.get("accelerator", "auto")))
    devices = given.get("trainer.devices", trainer.get("devices", "auto"))
    trainer_nodes = _as_int(given.get("trainer.num_nodes", trainer.get("num_nodes", 1)), "trainer.num_nodes")
    run_dir = Path(str(given.get("run_dir", recipe.get("run_dir", "runs/default"))))
    if str(given.get("resume", recipe.get("resume", "auto"))) == "none":
        raise UserError(
            "resume: none cannot be submitted: a requeued job must continue from its own checkpoints "
            "(resume: auto); start a fresh run with a new run_dir instead"
        )
    num_workers = (recipe.get("data") or {}).get("num_workers", 2)

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
        gpus = _as_int(devices, "trainer.devices")
    if accelerator in ("gpu", "cuda") and not gpus:
        raise UserError(
            f"the recipe trains on GPUs (trainer.accelerator: {accelerator}) but the job asks for no GPU "
            "per node: give --gpus-per-node N >= 1, or set trainer.accelerator: cpu"
        )
    if on_cpu and gpus:
        raise UserError(
            f"the recipe trains on the CPU (trainer.accelerator: cpu) but the job asks for {gpus} GPUs"
        )
    if gpus:
        if devices != "auto" and _as_int(devices, "trainer.devices") != gpus:
            raise UserError(
                f"the job asks for {gpus} GPU(s) per node but the recipe's trainer.devices is {devices}: "
                f"one task per GPU needs trainer.devices: {gpus} (e.g. add `-- --trainer.devices {gpus}`)"
            )
        ntasks = gpus
    else:
        ntasks = 1 if devices == "auto" else _as_int(devices, "trainer.devices")
    if min(nodes, ntasks) < 1:
        raise UserError(f"a job needs at least one node and one task per node, got {nodes} x {ntasks}")

    limit = time_limit_seconds(settings.time) if settings.time else None
    if limit is not None and settings.signal_margin >= limit:
        raise UserError(
            f"the signal margin ({settings.signal_margin} s) must be shorter than the time limit "
            f"({settings.time} = {limit} s): the job would be told to requeue as it starts"
        )
    job_name = settings.job_name or f"pretrain-{(workdir / run_dir).resolve().name}"
    for what, value in (("run directory", run_dir), ("working directory", workdir), ("job name", job_name)):
        if any(c.isspace() for c in str(value)):
            raise UserError(
                f"the {what} {str(value)!r} contains white space, which #SBATCH lines cannot hold"
            )
    fit_args = ["--config", config]
    if cli.get("max_requeues") is not None:
        fit_args += ["--slurm.max_requeues", str(cli["max_requeues"])]
    return Job(
        config=config,
        run_dir=run_dir,
        workdir=workdir,
        settings=settings,
        nodes=nodes,
        ntasks_per_node=ntasks,
        gpus_per_node=gpus,
        cpus_per_task=settings.cpus_per_task or int(num_workers) + 1,
        job_name=job_name,
        env_setup=settings.env_setup if settings.env_setup is not None else default_env_setup(workdir),
        fit_args=(*fit_args, *overrides),
    )


def default_env_setup(workdir: Path) -> str:
    """Activate the virtual environment this command runs from (relative to `workdir` if inside)."""
    if sys.prefix == sys.base_prefix:
        return ""
    venv = Path(sys.prefix)
    if venv.is_relative_to(workdir):
        venv = venv.relative_to(workdir)
    return f"source {shlex.quote(str(venv / 'bin' / 'activate'))}"


# ---- rendering and submission ----------------------------------------------------------------


def render(job: Job) -> str:
    """The sbatch script for `job`, from slurm/train.sbatch.template."""
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
    log_dir = job.workdir / job.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    path = job.workdir / job.script_path
    path.write_text(script)
    result = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, cwd=job.workdir
    )
    if result.returncode != 0:
        raise UserError(f"sbatch {path} failed: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    with open(log_dir / JOBS_FILE, "a") as f:
        record = {"job_id": job_id, "time": time.time(), "script": str(job.script_path)}
        f.write(json.dumps(record) + "\n")
    return job_id


def _submit(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if overrides[:1] == ["--"]:
        overrides = overrides[1:]
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(SlurmSettings)}
    job = resolve_job(args.config, cli, overrides)
    if args.dry_run:
        print(render(job), end="")
        return 0
    job_id = submit(job)
    out = job.log_dir / f"{job.job_name}-{job_id}"
    print(f"submitted job {job_id}")
    print(f"  script: {job.script_path}")
    print(f"  stdout: {out}.out")
    print(f"  stderr: {out}.err")
    print(f"  status: pretrain status {job.run_dir}")
    return 0


# ---- status ----------------------------------------------------------------------------------


def _latest_job_id(run_dir: Path) -> str | None:
    """The most recently submitted or started job of a run (from jobs.jsonl and requeue.json)."""
    from pretrain.train.requeue import read_requeue_record

    candidates: list[tuple[float, str]] = []
    try:
        lines = (run_dir / "slurm" / JOBS_FILE).read_text().splitlines()
        last = json.loads(lines[-1]) if lines else None
        if last:
            candidates.append((last["time"], str(last["job_id"])))
    except (OSError, ValueError, KeyError):
        pass
    record = read_requeue_record(run_dir)
    if record.get("job_id"):
        candidates.append((record.get("updated", 0.0), str(record["job_id"])))
    return max(candidates)[1] if candidates else None


def _first_line(command: list[str]) -> str:
    """The first line a SLURM client command prints, "" if it is missing or fails."""
    if shutil.which(command[0]) is None:
        return ""
    result = subprocess.run(command, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return lines[0] if lines else ""


def job_state(job_id: str) -> str:
    """The job's state from squeue (pending, running, recently ended) or else sacct (which fails
    without accounting storage)."""
    if line := _first_line(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r|%M|%l"]):
        state, reason, elapsed, limit = line.split("|")
        detail = f"reason {reason}" if state == "PENDING" else f"elapsed {elapsed}, limit {limit}"
        return f"{state} ({detail})"
    if line := _first_line(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,Elapsed"]):
        state, exit_code, elapsed = line.split("|")
        return f"{state} (exit code {exit_code}, elapsed {elapsed})"
    return "unknown (not in squeue, and sacct has no record)"


def _latest_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    configs = sorted(
        (run_dir / "logs").glob("version_*/config.yaml"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    for path in reversed(configs):
        try:
            return yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
    return {}


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{days}d " if days else "") + f"{hours}h {minutes:02d}m"


def status(run_dir: str | os.PathLike) -> str:
    """A few lines on a run: job state, progress, last checkpoint, requeues, throughput and ETA."""
    from pretrain.plot import TRAIN_LOSS, format_tokens, load_run
    from pretrain.train.checkpoints import list_checkpoints
    from pretrain.train.requeue import read_requeue_record

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    lines = [f"run         {run_dir}"]
    job_id = _latest_job_id(run_dir)
    lines.append(f"job         {f'{job_id}: {job_state(job_id)}' if job_id else 'none recorded'}")

    config = _latest_config(run_dir)
    max_steps = (config.get("trainer") or {}).get("max_steps")
    batch_tokens = (config.get("data") or {}).get("global_batch_tokens")
    try:
        log = load_run(run_dir)
    except UserError:
        log = None
    steps_done = 0
    if log is not None and TRAIN_LOSS in log.series:
        loss = log.series[TRAIN_LOSS]
        steps_done = int(loss.steps[-1]) + 1  # row k holds the loss of optimizer step k + 1
        of = f" of {max_steps:,} ({100 * steps_done / max_steps:.1f}%)" if max_steps else ""
        tokens = f", {format_tokens(steps_done * batch_tokens)} tokens seen" if batch_tokens else ""
        lines.append(f"progress    step {steps_done:,}{of}{tokens}, loss {loss.values[-1]:.4f}")
    else:
        lines.append("progress    no training step logged yet")

    checkpoints = list_checkpoints(run_dir / "checkpoints")
    lines.append(f"checkpoint  {checkpoints[-1][1] if checkpoints else 'none yet'}")

    record = read_requeue_record(run_dir)
    if record:
        limit = record.get("max_requeues")
        text = f"{record.get('requeues', 0)} (max {limit if limit is not None else 'unlimited'})"
        if events := record.get("events"):
            last = events[-1]
            text += (
                f"; last signal: {last['signal']} at step {last['step']}, checkpoint saved, {last['action']}"
            )
        lines.append(f"requeues    {text}")

    speed = log.series.get("train/tokens_per_sec") if log is not None else None
    if speed is not None and len(speed.values):
        rate = float(speed.values[-1])
        text = f"{rate:,.0f} tokens/s"
        if max_steps and steps_done >= max_steps:
            text += ", training finished"
        elif max_steps and batch_tokens and rate > 0:
            eta = (max_steps - steps_done) * batch_tokens / rate
            text += f", ETA {_duration(eta)} of training at this rate (queue time not included)"
        lines.append(f"throughput  {text}")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    print(status(args.run_dir))
    return 0


# ---- command line ----------------------------------------------------------------------------


def register(subcommands: Any) -> None:
    """Add the `submit` and `status` subcommands to an argparse subparsers action."""
    parser = subcommands.add_parser(
        "submit",
        help="render an sbatch script for a recipe and submit it (auto-requeue before the time limit)",
        description="Render slurm/train.sbatch.template for a recipe into RUN_DIR/slurm/train.sbatch and "
        "submit it with sbatch. Options not given come from the recipe's `slurm:` section. Arguments "
        "after `--` are passed to `pretrain fit`.",
    )
    parser.add_argument("--config", required=True, help="the recipe (YAML) to train")
    parser.add_argument("--nodes", type=int, help="number of nodes (default: trainer.num_nodes)")
    parser.add_argument(
        "--gpus-per-node", type=int, help="GPUs (= tasks) per node; 0 for CPU (default: trainer.devices)"
    )
    parser.add_argument(
        "--cpus-per-task", type=int, help="CPU cores per task (default: data.num_workers + 1)"
    )
    parser.add_argument("--time", help="time limit, e.g. 48:00:00 (default: the partition's)")
    parser.add_argument("--partition", help="partition to submit to")
    parser.add_argument("--account", help="account to charge")
    parser.add_argument("--qos", help="quality of service")
    parser.add_argument("--constraint", help="required node features")
    parser.add_argument(
        "--signal-margin",
        type=int,
        help="send SIGUSR1 (checkpoint + requeue) this many seconds before the time limit (default: 300)",
    )
    parser.add_argument(
        "--max-requeues", type=int, help="requeue the job at most this many times (default: no limit)"
    )
    parser.add_argument(
        "--env-setup", help="shell lines run before srun (default: activate the current virtual environment)"
    )
    parser.add_argument("--job-name", help="job name (default: pretrain-<run dir name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument(
        "overrides", nargs="*", metavar="-- FIT_OVERRIDES", help="extra `pretrain fit` arguments"
    )
    parser.set_defaults(run=_submit)

    parser = subcommands.add_parser(
        "status",
        help="state of a run: SLURM job, step, tokens, last checkpoint, requeues, ETA",
        description="Report on a run directory: its latest SLURM job's state (squeue, else sacct), the last "
        "logged step and tokens seen, the newest checkpoint, the requeue count and an ETA from the logged "
        "throughput.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    parser.set_defaults(run=_status)
