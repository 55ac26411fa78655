"""The one owner of RUN_DIR: what a run directory holds, what its files are called, how they are
read and written. Nothing here imports torch or Lightning.

- `layout`: `RunDir`, the directory's names and the methods over them: checkpoints (listing,
  resume, set aside, retention: judged by a `CheckpointCheck` the caller passes in), log
  versions, the lease (`pretrain.lease`), the requeue record, SLURM jobs, the status summary;
- `logs`: every launch's metrics.csv merged into one series per metric (`RunLog`);
- `incidents`: the divergence records (`incidents.jsonl`) and their one-line description;
- `goodput`: the launches' time records (`goodput/launch-<k>.json`), accounted and described.
"""

from pretrain.run_dir.incidents import describe_incidents
from pretrain.run_dir.layout import (
    CheckpointCheck,
    RunDir,
    RunSummary,
    checkpoint_name,
    list_checkpoints,
    remove,
)
from pretrain.run_dir.logs import (
    LR,
    SKIPPED_STEPS,
    START_STEP,
    TOKENS,
    TOKENS_PER_SEC,
    TRAIN_LOSS,
    RunLog,
    Series,
    downstream_column,
)

__all__ = [
    "LR",
    "SKIPPED_STEPS",
    "START_STEP",
    "TOKENS",
    "TOKENS_PER_SEC",
    "TRAIN_LOSS",
    "CheckpointCheck",
    "RunDir",
    "RunLog",
    "RunSummary",
    "Series",
    "checkpoint_name",
    "describe_incidents",
    "downstream_column",
    "list_checkpoints",
    "remove",
]
