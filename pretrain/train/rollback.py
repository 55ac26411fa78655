"""Self-healing runs: what `pretrain fit` does after the spike guard judged a streak a divergence.

The training module ends its `trainer.fit` with `divergence` set (`pretrain.train.module`).
Then, in the same process and on every rank alike:

1. the incident is recorded in `RUN_DIR/incidents.jsonl` (rank 0, before anything else changes,
   so a kill at any later point replays the same decision): the bad steps and why, the checkpoint
   rolled back to (path, step, identity), the skipped global sample range, and for each bad step
   its samples' source, shard and token offset (`pretrain data show DIR --shard S --offset K`
   prints the text);
2. for a rollback, the samples read from that checkpoint to the end of the streak plus
   `rollback_skip_margin` steps join the run's skip list (`pretrain.data.skips`), which is part
   of the data order from then on: every later launch reads it from incidents.jsonl (and
   checkpoints carry it, for `branch_from`), so resume, requeue and another GPU count read the same
   samples; with `rollback_lr_scale` < 1 the LR of the re-done steps is scaled (also recorded);
3. later checkpoints of the abandoned path are set aside, and training resumes from the
   checkpoint with a new Trainer (a new log version, merged like a resumed launch).

A stop (`on_divergence: stop`, no checkpoint before the streak, or `max_rollbacks` rollbacks in a
row) is recorded too; it resets the count, so the same command, relaunched once the cause is
fixed, may roll back again later.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

from pretrain.data.skips import SkipList
from pretrain.model.checkpoint import checkpoint_identity
from pretrain.run_dir import RunDir
from pretrain.train.datamodule import PretrainDataModule
from pretrain.train.module import Divergence, PretrainModule


def restore_run_state(run: RunDir, module: PretrainModule, data: PretrainDataModule) -> None:
    """Apply the run's recorded incidents: the skip list, the rollback count and LR factors."""
    incidents = run.incidents()
    data.skips = data.skips.union(SkipList(run.skipped_samples()))
    module.rollbacks_in_a_row = run.rollbacks_in_a_row()
    module.lr_scaled_steps = [
        (entry["lr_steps"][0], entry["lr_steps"][1], float(entry["lr_scale"]))
        for entry in incidents
        if entry.get("lr_scale", 1.0) != 1.0
    ]


def record(
    trainer: L.Trainer, run: RunDir, module: PretrainModule, data: PretrainDataModule
) -> dict[str, Any]:
    """Record the module's divergence as an incident (rank 0 writes; every rank gets the entry)."""
    divergence = module.divergence
    assert divergence is not None
    entry: dict[str, Any] | None = None
    if trainer.is_global_zero:
        entry = _incident(divergence, module, data)
        run.record_incident(entry)
    entry = trainer.strategy.broadcast(entry, src=0)
    assert entry is not None
    return entry


def _incident(divergence: Divergence, module: PretrainModule, data: PretrainDataModule) -> dict[str, Any]:
    batch = data.global_batch_size
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "action": divergence.action,
        "steps": [divergence.first, divergence.last],
        "why": divergence.why,
        "bad_samples": [
            {"step": step, "samples": data.origins(step * batch, (step + 1) * batch)}
            for step in range(divergence.first, divergence.last + 1)
        ],
    }
    if divergence.action == "rollback":
        target = divergence.checkpoint
        assert target is not None
        back_to = divergence.checkpoint_step
        stop_step = divergence.last + 1 + module.hparams["rollback_skip_margin"]
        start, stop = data.skips.skip_positions(back_to * batch, stop_step * batch)
        scale = float(module.hparams["rollback_lr_scale"])
        entry |= {
            "checkpoint": {
                "path": str(target),
                "step": back_to,
                "checkpoint_id": checkpoint_identity(target),
            },
            "skip": [start, stop],
            "skip_steps": [back_to, stop_step],
            "lr_scale": scale,
            "lr_steps": [back_to, stop_step],
        }
    return entry


def prepare_rollback(entry: dict[str, Any], module: PretrainModule, data: PretrainDataModule) -> Path:
    """Apply a recorded rollback to this process's module and data; the checkpoint to reload."""
    data.skips = data.skips.union(SkipList([entry["skip"]]))
    if entry["lr_scale"] != 1.0:
        module.lr_scaled_steps.append((entry["lr_steps"][0], entry["lr_steps"][1], entry["lr_scale"]))
    module.rollbacks_in_a_row += 1
    module.divergence = None
    return Path(entry["checkpoint"]["path"])


def announce(entry: dict[str, Any], module: PretrainModule) -> None:
    """One line on what the rollback did."""
    first, last = entry["steps"]
    back_to, stop_step = entry["skip_steps"]
    start, stop = entry["skip"]
    lr = f", LR x{entry['lr_scale']:g} until step {stop_step}" if entry["lr_scale"] != 1.0 else ""
    print(
        f"spike guard: divergence at steps {first}-{last}; rolled back to {entry['checkpoint']['path']} (step "
        f"{back_to}) and skipping global samples [{start:,}, {stop:,}) (steps {back_to}-{stop_step - 1}{lr}); "
        f"rollback {module.rollbacks_in_a_row} of at most {module.hparams['max_rollbacks']} in a row; details "
        "in incidents.jsonl",
        file=sys.stderr,
    )
