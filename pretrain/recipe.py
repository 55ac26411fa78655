"""The recipe's one owner: loading it, its `--key value` overrides, the defaults, the `slurm:`
section and the batch geometry. `pretrain fit` (through LightningCLI), the data module and
`pretrain submit` all read them from here, so a default or a rule changed here is seen by all.

A recipe is a YAML file or a shipped recipe's name (`pretrain/recipes/`, also `configs/` in a
clone): `tiny`, `continual/infinite-anneal`; a path to a file wins when both exist.

Overrides are `pretrain fit`'s command-line form, applied in order: `--section.key value` or
`--section.key=value`, the value read as YAML (`7` is a number, `"7"` text, `null` none), the
last one of a key winning; `--config FILE` merges another recipe over what came before (as
`pretrain fit --config A --config B` does). A `--flag` followed by another `--option` carries no
value and is not read here (`pretrain fit` itself checks every argument).

No torch, Lightning or `pretrain` subpackage import: `pretrain submit` starts fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.errors import UserError

RECIPES = Path(__file__).resolve().parent / "recipes"

# Every default a recipe may leave out, by dotted key, stated once. `pretrain fit` sets its parser's
# defaults from here (`trainer.*` are Lightning's own, repeated so that `submit` reads the same).
DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/default",
    "resume": "auto",
    "max_tokens": None,
    "trainer.accelerator": "auto",
    "trainer.devices": "auto",
    "trainer.num_nodes": 1,
    "trainer.max_steps": -1,
    "data.seq_len": 2048,
    "data.global_batch_tokens": 2**21,
    "data.micro_batch_size": 8,
    "data.seed": 42,
    "data.num_workers": 2,
}


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes, e.g. "tiny", "continual/infinite-anneal"."""
    return sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))


def recipe_path(config: str) -> str:
    """`config` itself when it is a file, else the shipped recipe of that name."""
    if Path(config).is_file():
        return config
    name = config.removesuffix(".yaml").removeprefix("configs/")
    shipped = RECIPES / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise UserError(
        f"--config {config}: no such file and no shipped recipe of that name; shipped: {', '.join(shipped_recipes())}"
    )


def override_pairs(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """`--key value` and `--key=value` pairs in order, each value read as YAML (a `--config` value
    is a path, or a shipped recipe's name, kept as text)."""
    import yaml

    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(overrides):
        arg, value = overrides[i], None
        if arg.startswith("--") and "=" in arg:
            arg, _, value = arg.partition("=")
        elif arg.startswith("--") and i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            value = overrides[i + 1]
            i += 1
        if value is not None:
            key = arg[2:]
            pairs.append((key, value if key == "config" else yaml.safe_load(value)))
        i += 1
    return pairs


def read_recipe(config: str) -> dict[str, Any]:
    """The YAML mapping of recipe `config` (a path or a shipped name)."""
    import yaml

    path = recipe_path(config)
    try:
        mapping = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read recipe {path}: {err}") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(mapping, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with trainer/model/data sections")
    return mapping


@dataclass(frozen=True)
class Recipe:
    """A recipe as `pretrain fit` will see it: its file, then each override in order (a later
    `--config FILE` merged over what came before, a `--section.key value` set)."""

    path: str
    mapping: dict[str, Any]

    @classmethod
    def load(cls, config: str, overrides: Sequence[str] = ()) -> Recipe:
        """Read `config` (a path or a shipped name) and apply its overrides."""
        mapping = read_recipe(config)
        for key, value in override_pairs(overrides):
            if key == "config":
                _merge(mapping, read_recipe(str(value)))
            else:
                _set(mapping, key.split("."), value)
        return cls(recipe_path(config), mapping)

    def get(self, key: str) -> Any:
        """The value of dotted `key`, else `DEFAULTS[key]` (None when neither has it)."""
        node: Any = self.mapping
        for part in key.split("."):
            if not isinstance(node, dict) or node.get(part) is None:
                return DEFAULTS.get(key)
            node = node[part]
        return node

    def section(self, name: str) -> Any:
        """The recipe's top-level section `name` (an empty mapping when absent)."""
        return self.mapping.get(name) or {}

    def geometry(self, devices: int, nodes: int) -> BatchGeometry:
        """The batch geometry of this recipe on `nodes` x `devices` processes."""
        return BatchGeometry(
            devices=devices,
            nodes=nodes,
            micro_batch_size=as_int(self.get("data.micro_batch_size"), "data.micro_batch_size"),
            seq_len=as_int(self.get("data.seq_len"), "data.seq_len"),
            global_batch_tokens=as_int(self.get("data.global_batch_tokens"), "data.global_batch_tokens"),
        )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    """Merge mapping `over` into `base`, mappings key by key, anything else replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _set(mapping: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set `mapping[parts[0]][parts[1]]... = value`, making the mappings on the way."""
    for part in parts[:-1]:
        if not isinstance(mapping.get(part), dict):
            mapping[part] = {}
        mapping = mapping[part]
    mapping[parts[-1]] = value


def as_int(value: Any, what: str) -> int:
    """`value` as a whole number (an int, or text of digits), else a UserError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise UserError(f"{what} must be a whole number, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's tokens split over processes, micro-batches and accumulation:
    global_batch_tokens = micro_batch_size x seq_len x devices x nodes x accumulation.
    Built only from valid numbers: every invalid combination raises one UserError here."""

    devices: int  # processes per node
    nodes: int
    micro_batch_size: int
    seq_len: int
    global_batch_tokens: int

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "seq_len", "global_batch_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name} must be positive, got {getattr(self, name)}")
        if min(self.devices, self.nodes) < 1:
            raise UserError(
                f"a run needs at least one node and one device per node, got {self.nodes} x {self.devices}"
            )
        if self.global_batch_tokens % self.tokens_per_micro_step:
            raise UserError(
                f"data.global_batch_tokens ({self.global_batch_tokens:,}) must be a multiple of "
                f"micro_batch_size x seq_len x devices x num_nodes = {self.micro_batch_size} x {self.seq_len} x "
                f"{self.devices} x {self.nodes} = {self.tokens_per_micro_step:,}"
            )

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes

    @property
    def tokens_per_micro_step(self) -> int:
        """Tokens of one forward/backward over all processes."""
        return self.micro_batch_size * self.seq_len * self.world_size

    @property
    def accumulation(self) -> int:
        """Micro-batches per process per optimizer step."""
        return self.global_batch_tokens // self.tokens_per_micro_step

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.global_batch_tokens // self.seq_len

    @property
    def per_rank_batch(self) -> int:
        """Sequences per optimizer step on one process."""
        return self.global_batch_size // self.world_size

    def max_steps(self, max_tokens: int | None, trainer_max_steps: int | None) -> int:
        """The run's length in optimizer steps, from `max_tokens` or `trainer.max_steps` (one of them)."""
        if max_tokens is not None:
            steps = math.ceil(max_tokens / self.global_batch_tokens)
            if trainer_max_steps not in (None, -1):
                raise UserError(
                    f"give either max_tokens or trainer.max_steps, not both (max_tokens {max_tokens:,} = "
                    f"{steps:,} steps, trainer.max_steps {trainer_max_steps:,}): to change the length of a run "
                    "whose recipe sets max_tokens, give --max_tokens N (or --max_tokens null with "
                    "--trainer.max_steps N)"
                )
            return steps
        if trainer_max_steps in (None, -1):
            raise UserError("set max_tokens (or trainer.max_steps): the LR schedule needs a training length")
        assert trainer_max_steps is not None
        return trainer_max_steps

    def describe(self, max_steps: int) -> str:
        """One line: how the global batch is made and how long the run is."""
        return (
            f"global batch: {self.global_batch_tokens:,} tokens = {self.micro_batch_size} sequences x "
            f"{self.seq_len} tokens x {self.devices} device(s) x {self.nodes} node(s) x "
            f"{self.accumulation} accumulation step(s); {max_steps:,} optimizer steps "
            f"= {max_steps * self.global_batch_tokens:,} tokens"
        )


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
        for field_ in dataclasses.fields(self):
            value = getattr(self, field_.name)
            wanted = int if str(field_.type).startswith("int") else str  # "int | None", "str | None"
            if value is not None and (not isinstance(value, wanted) or isinstance(value, bool)):
                raise UserError(
                    f"slurm.{field_.name}: expected {'a whole number' if wanted is int else 'text'}, "
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
