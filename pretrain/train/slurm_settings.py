"""The recipe's `slurm:` section, and the check that `srun` started the processes a recipe trains on.

`pretrain submit` renders its sbatch script from these settings (`pretrain.slurm.job`);
`pretrain fit` itself uses only `max_requeues` and, under `srun`, `check_srun_geometry`.
No torch import: `pretrain submit` starts fast.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pretrain.errors import UserError


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
