"""Running one anneal probe beside its parent, and writing its record when it has finished.

The probe never disturbs the parent run: it reads only a published checkpoint (never a
`.partial-` one), takes only its own lease (`RUN_DIR/anneal/step-N/owner.json`, never the
parent's) and writes only under `RUN_DIR/anneal/step-N/`:

    anneal/step-N/parent/step-N.ckpt   the parent's checkpoint, pinned by a hard link (every file
                                       of an FSDP2 shard folder), so the parent's retention may
                                       prune its own name; a copy where linking fails
    anneal/step-N/probe.yaml           the probe's recipe (`pretrain.anneal.plan.probe_config`)
    anneal/step-N/checkpoints/, logs/  the probe's own run (`pretrain fit --config probe.yaml`)
    anneal/step-N/probe.json           the record, written last (`pretrain.anneal.result`)

A probe is `pretrain fit` with `resume: auto` in its own run dir, so a killed or requeued probe
resumes from its own last checkpoint and ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pretrain.anneal.plan import Plan, Probe, probe_config
from pretrain.anneal.report import write_table
from pretrain.anneal.result import RECORD, ProbeResult, probe_dir, read_result, write_result
from pretrain.errors import UserError
from pretrain.files import DamagedRecord, write_atomic
from pretrain.run_dir import RunDir, checkpoint_name, list_checkpoints

PINNED = "parent"
RECIPE = "probe.yaml"


def existing_probe(run_dir: Path, step: int) -> tuple[ProbeResult | None, Path | None]:
    """A probe folder's record (None if none; a damaged one is set aside with one line) and pin."""
    folder = probe_dir(run_dir, step)
    record = folder / RECORD
    try:
        result = read_result(record)
    except DamagedRecord as err:
        aside = record.with_name(RECORD + ".damaged")
        os.replace(record, aside)
        print(f"{record}: {err}; kept as {aside.name}, the probe's record is made again", file=sys.stderr)
        result = None
    pinned = list_checkpoints(folder / PINNED)
    return result, pinned[-1][1] if pinned else None


def pin(probe: Probe, folder: Path) -> Path:
    """Hard-link the parent's checkpoint into `folder/parent/` (copy where links fail) and check
    that what is pinned is the checkpoint planned."""
    target = folder / PINNED / checkpoint_name(probe.step)
    if probe.checkpoint != target and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".partial-{target.name}")
        _remove(staging)
        try:
            _link_or_copy(probe.checkpoint, staging)
        except FileNotFoundError:
            _remove(staging)
            raise UserError(
                f"checkpoint step-{probe.step} was pruned by the parent's retention before it could be pinned; "
                "probe a newer one, or keep checkpoints with the parent's checkpoint.pin_every_n_steps"
            ) from None
        os.replace(staging, target)
    if _identity(target) != probe.checkpoint_id:
        raise UserError(
            f"{folder} was started from another checkpoint step-{probe.step} than the parent's present one "
            f"(rewritten since, e.g. after a rollback): move {folder} aside and run `pretrain anneal` again"
        )
    return target


def _link_or_copy(source: Path, destination: Path) -> None:
    """`destination` made of hard links to `source` (a file, or a folder's every file)."""
    try:
        if source.is_dir():
            shutil.copytree(source, destination, copy_function=os.link)
        else:
            os.link(source, destination)
    except FileNotFoundError:
        raise
    except OSError as err:  # another file system, or links not allowed there
        _remove(destination)
        print(f"anneal: cannot hard-link {source} ({err.strerror}): copying it instead", file=sys.stderr)
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy2(source, destination)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _identity(path: Path) -> str:
    from pretrain.model.checkpoint import checkpoint_identity

    return checkpoint_identity(path)


def prepare_probe(plan: Plan, probe: Probe) -> Path:
    """Pin the probe's checkpoint and write its recipe; the recipe's path."""
    folder = probe_dir(plan.run.path, probe.step)
    pinned = pin(probe, folder)
    recipe = folder / RECIPE
    config = probe_config(plan.config, plan.run.path, probe, plan.branch(probe), pinned)
    write_atomic(recipe, yaml.safe_dump(config, sort_keys=False).encode())
    return recipe


def run_probe(
    plan: Plan, probe: Probe, fit: Callable[[list[str]], int], tasks: list[str], limit: int | None = None
) -> int:
    """Run (or resume) one probe under its own lease with `fit` (`pretrain fit`'s entry point, given by
    the command: the core never imports commands) and record it; `fit`'s exit code."""
    folder = probe_dir(plan.run.path, probe.step)
    folder.mkdir(parents=True, exist_ok=True)
    lease = RunDir(folder)
    lease.acquire()  # the loser of two `pretrain anneal` on one probe stops here, in one line
    try:
        recipe = prepare_probe(plan, probe)
        print(f"anneal: probe step-{probe.step}: pretrain fit --config {recipe}", file=sys.stderr, flush=True)
        code = fit(["--config", str(recipe)])
        if code == 0:
            lease.acquire()  # `pretrain fit` released the probe's lease as it ended: hold it while recording
            result = finish_probe(plan.run.path, probe, tasks, limit)
            print(f"anneal: probe step-{probe.step}: annealed val loss {result.val_loss:.4f}", flush=True)
    finally:
        lease.release()
    return code


def finish_probe(run_dir: Path, probe: Probe, tasks: list[str], limit: int | None = None) -> ProbeResult:
    """Read the finished probe's final validation (and score `tasks`, at most `limit` examples
    each), write its record."""
    folder = probe_dir(run_dir, probe.step)
    end = probe.step + probe.decay_steps
    per_source = _val_losses(RunDir(folder), end - 1, at_least=True)
    if not per_source:
        raise UserError(f"{folder}: the probe logged no validation at its last step {end}; run it again")
    result = ProbeResult(
        step=probe.step,
        checkpoint_id=probe.checkpoint_id,
        parent_tokens=probe.parent_tokens,
        anneal_tokens=probe.anneal_tokens,
        val_loss=sum(per_source.values()) / len(per_source),
        stable_val_loss=_stable_val_loss(RunDir(run_dir), probe.step),
        val_loss_per_source=per_source,
        downstream=_downstream(folder, end, tasks, limit) if tasks else {},
    )
    write_result(run_dir, result)
    write_table(run_dir)
    return result


def _val_losses(run: RunDir, logged_step: int, at_least: bool) -> dict[str, float]:
    """Validation loss per source logged at `logged_step` (or after it when `at_least`, else the
    nearest before it): Lightning logs the validation after optimizer step k at step k - 1."""
    log = run.read_logs()
    found = {}
    for source in log.val_sources():
        series = log.series[f"val/{source}/loss"]
        keep = series.steps >= logged_step if at_least else series.steps <= logged_step
        if keep.any():
            found[source] = float(series.values[keep][-1])
    return found


def _stable_val_loss(parent: RunDir, step: int) -> float | None:
    """The parent's validation loss at its step `step`, or the nearest before; None if none."""
    try:
        losses = _val_losses(parent, step - 1, at_least=False)
    except UserError:
        return None
    return sum(losses.values()) / len(losses) if losses else None


def _downstream(folder: Path, end: int, tasks: list[str], limit: int | None) -> dict[str, float]:
    """Scores of the probe's final checkpoint through `pretrain eval`'s run path (kept in the
    probe's own eval/ folder): `task/metric` -> score."""
    from pretrain.eval.backend import PretrainLM
    from pretrain.eval.harness import load_tasks, parse_tasks
    from pretrain.eval.metrics import is_score
    from pretrain.eval.runs import evaluate_run

    loaded = load_tasks(parse_tasks(",".join(tasks)))
    _, records = evaluate_run(
        lambda path: PretrainLM(str(path)),
        RunDir(folder),
        loaded,
        None,
        limit,
        every=end,
        log=lambda line: print(line, file=sys.stderr),
    )
    evaluations = next(iter(records[end]["evaluations"].values()))
    return {
        f"{task}/{metric}": value
        for task, metrics in evaluations.items()
        for metric, value in metrics.items()
        if is_score(metric)
    }
