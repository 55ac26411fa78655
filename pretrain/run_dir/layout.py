"""The run directory's layout: what RUN_DIR holds, what its files are called, and the methods that
read and write them (checkpoints and their retention, the lease, the requeue record, SLURM jobs).

    RUN_DIR/
      checkpoints/step-00001000.ckpt        a file, or a folder of shards under FSDP2
      checkpoints/.partial-step-....ckpt    being written; published by an atomic rename, so every
                                            `step-*.ckpt` is complete (a crash's leftover is removed
                                            by the next save)
      checkpoints/diverged-step-*.ckpt      the state at a divergence stop (inspection only); also
                                            damaged-/abandoned-/foreign-step-*.ckpt: set aside, never
                                            resumed from, pruned or deleted
      incidents.jsonl                       one line per divergence: steps, why, the checkpoint rolled
                                            back to, the skipped sample range and where the bad
                                            steps' samples came from; its skip ranges are part of
                                            the run's data order
      logs/version_<k>/metrics.csv          one version per launch (version k+1 resumed version k),
      logs/version_<k>/config.yaml          with the launch's resolved recipe
      requeue.json                          SLURM job id, requeue count and every stop on a signal
      owner.json                            the lease of the one `pretrain fit` that owns the run
      goodput/launch-<k>.json               where launch k's wall time went (`pretrain.run_dir.goodput`)
      profile/                              torch profiler traces of `--profile.steps A:B`
      verified-shards.json                  how often the launches checked each shard (`pretrain.data.verify`)
      compile_cache/                        `torch.compile`'s artifacts, reused by the next launch
                                            (`pretrain.train.parallelize.use_compile_cache`; written by torch)
      slurm/train.sbatch, slurm/jobs.jsonl  written by `pretrain submit`, with the jobs' .out/.err

How the logs are read: `pretrain.run_dir.logs`; the incidents: `pretrain.run_dir.incidents`.

The lease (`RunDir.acquire`, `pretrain.lease`): one `pretrain fit` owns a run directory at a time,
so that two launches never both write checkpoints there. It names its owner's host, process and
SLURM job; another launch takes it over only when the owner is provably gone (a process of this
host that no longer runs, or the same SLURM job requeued); otherwise it is refused with the owner
named. A lease that cannot be read was not written by `pretrain fit`: every launch is refused,
naming the file to delete. `release` removes it when training ends.

Files read back (`pretrain.files.read_json`): a damaged requeue.json is kept aside as
requeue.json.damaged (with one line) when the next signal writes a new record, and its usable
fields carry over; a damaged or foreign line of slurm/jobs.jsonl is passed over; a config.yaml
that is not a mapping is ignored. `pretrain status` names what it could not read.

Whether a file is a usable training checkpoint is told by a `CheckpointCheck` the caller passes in
(`pretrain fit` passes `pretrain.train.callbacks.periodic_checkpoint.TRAINING_CHECKPOINTS`, which
opens weights): nothing here imports torch, Lightning or `pretrain.model`, so `pretrain status`
and `pretrain plot` start fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import NoneType
from typing import Any

from pretrain import lease
from pretrain.errors import UserError
from pretrain.files import DamagedRecord, Fields, has_fields, is_a, read_json, write_atomic, write_json_atomic
from pretrain.run_dir.goodput import GoodputReport, read_goodput
from pretrain.run_dir.incidents import read_incidents, skip_range
from pretrain.run_dir.logs import SKIPPED_STEPS, TOKENS_PER_SEC, TRAIN_LOSS, RunLog, merge_logs

_CHECKPOINT = re.compile(r"step-(\d+)\.ckpt")
_VERSION = re.compile(r"version_(\d+)")
_JOB: Fields = {"job_id": (str, int), "time": (int, float)}
_REQUEUE: Fields = {
    "job_id": (str, int),
    "requeues": (int,),
    "max_requeues": (int, NoneType),
    "updated": (int, float),
}
_REQUEUE_EVENT: Fields = {"signal": (str,), "step": (int,), "action": (str,)}


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in a checkpoints folder, oldest first, as (step, path)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found)


def remove(path: Path) -> None:
    """Delete a file or folder we wrote (a checkpoint or its partial), if it is there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@dataclass(frozen=True)
class RunSummary:
    """Where a run stands, from its files (`pretrain status` adds the SLURM job's state)."""

    steps_done: int
    max_steps: int | None
    global_batch_tokens: int | None
    last_loss: float | None
    tokens_per_sec: float | None
    latest_checkpoint: Path | None
    requeue: dict[str, Any]
    requeue_problem: str | None = None  # what in requeue.json could not be read
    skipped_steps: int = 0
    incidents: tuple[dict[str, Any], ...] = ()
    goodput: GoodputReport | None = None  # where the launches' time went


@dataclass(frozen=True)
class CheckpointCheck:
    """How to tell a usable training checkpoint: `problem(path)` is None for one, else why not;
    `foreign` is the problem of a file `pretrain fit` did not write (never renamed or deleted) and
    `diverged` that of the state kept at a divergence stop."""

    problem: Callable[[Path], str | None]
    foreign: str
    diverged: str


class RunDir:
    """One run's directory (module docstring). `checks` is needed only by the methods that resume,
    set aside or prune checkpoints."""

    def __init__(self, path: str | os.PathLike, checks: CheckpointCheck | None = None) -> None:
        self.path = Path(path)
        self._checks = checks

    @property
    def checks(self) -> CheckpointCheck:
        """The checkpoint check given to the constructor."""
        if self._checks is None:
            raise TypeError("this RunDir was built without a CheckpointCheck: pass one to judge checkpoints")
        return self._checks

    @property
    def verified_shards(self) -> Path:
        """The record of the shards this run's launches checked (`pretrain.data.verify.VerifiedShards`)."""
        return self.path / "verified-shards.json"

    @property
    def compile_cache(self) -> Path:
        """Where `model.compile` keeps its compiled graphs by default, so a relaunch loads them."""
        return self.path / "compile_cache"

    # ---- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def partial_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f".partial-{checkpoint_name(step)}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1][1] if found else None

    def resolve_resume(self, resume: str, set_aside: bool = False) -> Path | None:
        """`auto`: the newest usable checkpoint (None if there is none); `none`: None, refused if
        the run already holds checkpoints (a fresh run here would mix with them); else a path.

        A newest checkpoint that cannot be used (truncated, empty, a folder without its index, the state
        at a divergence stop, or not written by `pretrain fit`) is passed over with a message; with
        `set_aside` (the run's owner only), one of ours is renamed `damaged-step-*.ckpt` (or
        `diverged-step-*.ckpt`) so that its step can be written again. When none of the run's own
        checkpoints is usable, `auto` refuses (one line, nothing renamed) rather than start over."""
        check = self.checks
        if resume == "none":
            found = self.list_checkpoints()
            if found and all(check.problem(path) not in (None, check.foreign) for _, path in found):
                if set_aside:  # every one is unusable: starting over is what --resume none asks for
                    self._set_aside([path for _, path in found])
                return None
            if found:
                raise UserError(
                    f"--resume none: {self.checkpoints} already holds checkpoints of an earlier run (newest: step "
                    f"{found[-1][0]}); a new run there would mix its checkpoints with them. Use another "
                    "run_dir, move those checkpoints away, or continue the run with --resume auto"
                )
            return None
        if resume == "auto":
            passed_over: list[tuple[Path, str]] = []
            for _, path in reversed(self.list_checkpoints()):
                problem = check.problem(path)
                if problem is None:
                    if set_aside:
                        self._set_aside([p for p, _ in passed_over])
                    return path
                passed_over.append((path, problem))
            if any(problem != check.foreign for _, problem in passed_over):
                named = "; ".join(f"{p} ({why})" for p, why in passed_over)
                raise UserError(
                    f"--resume auto: no usable checkpoint in {self.checkpoints}, though the run has some: {named}. "
                    "Nothing was changed. To start this run over deliberately, pass --resume none (the unusable "
                    "ones are then set aside as damaged-step-*.ckpt), or give --resume PATH"
                )
            for path, problem in passed_over:
                print(f"{path}: {problem}; passed over (move it out of {self.checkpoints})", file=sys.stderr)
            return None
        path = Path(resume)
        if not path.exists():
            raise UserError(f"--resume {resume}: no such checkpoint (use 'auto', 'none' or an existing path)")
        return path

    def _set_aside(self, paths: list[Path]) -> None:
        """Rename unusable checkpoints of ours to damaged-step-*.ckpt (someone else's stay put)."""
        check = self.checks
        for path in paths:
            problem = check.problem(path)
            if problem in (None, check.foreign):
                print(
                    f"{path}: {problem or 'usable'}; passed over (move it out of {self.checkpoints})",
                    file=sys.stderr,
                )
                continue
            aside = path.with_name(f"{'diverged' if problem == check.diverged else 'damaged'}-{path.name}")
            remove(aside)
            os.replace(path, aside)
            print(f"{path}: {problem}; passed over, kept as {aside}", file=sys.stderr)

    def diverged_checkpoint(self, step: int) -> Path:
        """Where the state at a divergence stop is kept (never resumed from by --resume auto)."""
        return self.checkpoints / f"diverged-{checkpoint_name(step)}"

    def lawa_checkpoints(self, last_k: int, every: int | None = None) -> list[Path]:
        """The latest `last_k` checkpoints at multiples of `every` steps (LaWA). The run directory
        may also be given as its checkpoints folder."""
        directory = self.checkpoints if self.checkpoints.is_dir() else self.path
        found = list_checkpoints(directory)
        if not found:
            raise UserError(f"{directory} holds no step-*.ckpt checkpoints")
        if last_k < 1 or (every is not None and every < 1):
            raise UserError("--last and --every must be at least 1")
        chosen = [(step, path) for step, path in found if every is None or step % every == 0]
        if len(chosen) < last_k:
            spacing = f" at multiples of {every} steps" if every else ""
            raise UserError(
                f"--last {last_k} needs {last_k} checkpoints{spacing}, but {directory} has {len(chosen)} "
                f"(steps {', '.join(str(s) for s, _ in found)}); keep them while training with "
                f"checkpoint.every_n_steps and checkpoint.pin_every_n_steps: {every or 'S'}"
            )
        return [path for _, path in chosen[-last_k:]]

    def set_aside_after(self, resume: Path) -> list[Path]:
        """When `resume` is one of this run's checkpoints, rename those of later steps to
        `abandoned-step-*.ckpt`: a run resumed from an earlier checkpoint takes another path and must
        not find them as its own (nor keep their names from being written again)."""
        check = self.checks
        match = _CHECKPOINT.fullmatch(resume.name)
        if match is None or resume.resolve().parent != self.checkpoints.resolve():
            return []
        step, moved = int(match[1]), []
        for later, path in self.list_checkpoints():
            if later > step and check.problem(path) != check.foreign:
                aside = path.with_name(f"abandoned-{path.name}")
                remove(aside)
                os.replace(path, aside)
                moved.append(aside)
        return moved

    def prune_checkpoints(self, keep_last: int, pinned: Callable[[int], bool]) -> None:
        """Delete leftover partials and every checkpoint but the newest `keep_last` and the pinned steps."""
        check = self.checks
        for leftover in self.checkpoints.glob(".partial-*"):
            remove(leftover)
        for step, path in self.list_checkpoints()[:-keep_last]:
            if not pinned(step) and check.problem(path) != check.foreign:  # never someone else's
                remove(path)

    # ---- downstream evaluation --------------------------------------------------------------------

    @property
    def eval_dir(self) -> Path:
        """Where `pretrain eval RUN_DIR` keeps its scores and table."""
        return self.path / "eval"

    def eval_result(self, step: int) -> Path:
        return self.eval_dir / f"step-{step:08d}.json"

    # ---- incidents (divergences) -------------------------------------------------------------------

    @property
    def incidents_file(self) -> Path:
        return self.path / "incidents.jsonl"

    def incidents(self, strict: bool = True) -> list[dict[str, Any]]:
        """The run's divergence records, oldest first (`pretrain.run_dir.incidents.read_incidents`)."""
        return read_incidents(self.incidents_file, strict)

    def record_incident(self, entry: dict[str, Any]) -> None:
        """Append one incident (the whole file is rewritten aside and renamed). Rank 0 only."""
        lines = [json.dumps(e, sort_keys=True) for e in self.incidents()] + [
            json.dumps(entry, sort_keys=True)
        ]
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.incidents_file, ("\n".join(lines) + "\n").encode())

    def skipped_samples(self) -> list[tuple[int, int]]:
        """Every global sample range the run's rollbacks stepped over, as [start, stop)."""
        return [r for entry in self.incidents() if (r := skip_range(entry)) is not None]

    def rollbacks_in_a_row(self) -> int:
        """Rollbacks recorded since the run's last divergence stop (a relaunch after a stop starts over)."""
        count = 0
        for entry in self.incidents():
            count = count + 1 if entry["action"] == "rollback" else 0
        return count

    # ---- logs -----------------------------------------------------------------------------------

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log_versions(self) -> dict[int, Path]:
        """`logs/version_<k>` folders by k."""
        found = {}
        for path in self.logs.glob("version_*"):
            if match := _VERSION.fullmatch(path.name):
                found[int(match[1])] = path
        return dict(sorted(found.items()))

    def next_log_version(self) -> int:
        return max(self.log_versions(), default=-1) + 1

    def drop_log_version_without_metrics(self, version: int | str) -> None:
        """Remove `logs/version_<version>` if it logged no metrics: only the files a launch writes
        before its first step (config.yaml, hparams.yaml) may be in it."""
        folder = self.logs / f"version_{version}"
        if not folder.is_dir() or (folder / "metrics.csv").exists():
            return
        if all(p.name in ("config.yaml", "hparams.yaml") for p in folder.iterdir()):
            shutil.rmtree(folder)

    def latest_config(self) -> dict[str, Any]:
        """The resolved recipe of the latest launch that saved a readable one ({} if none did)."""
        import yaml

        for version in reversed(self.log_versions().values()):
            try:
                config = yaml.safe_load((version / "config.yaml").read_text())
            except (OSError, ValueError, yaml.YAMLError):
                continue
            if isinstance(config, dict):
                return config
        return {}

    def read_logs(self) -> RunLog:
        """All launches' metrics merged (`pretrain.run_dir.logs`)."""
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a directory")
        paths = [v / "metrics.csv" for v in self.log_versions().values() if (v / "metrics.csv").is_file()]
        if not paths:
            raise UserError(f"{self.path}: no logs/version_<k>/metrics.csv (is this a run directory?)")
        return merge_logs(self.path.resolve().name, paths, tuple(self.incidents(strict=False)))

    # ---- lease ----------------------------------------------------------------------------------

    @property
    def lease_file(self) -> Path:
        return self.path / "owner.json"

    def acquire(self) -> None:
        """Make this process the run's one owner (module docstring), or refuse naming the owner."""
        self.path.mkdir(parents=True, exist_ok=True)
        lease.acquire(self.lease_file, lambda owner: _in_use_message(self, owner), "`pretrain fit`")

    def owner(self) -> dict[str, Any] | None:
        """The lease's content, None if there is none; {} if it is not a lease `pretrain fit` wrote."""
        return lease.read(self.lease_file)

    def release(self) -> None:
        """Remove the lease if this process holds it."""
        lease.release(self.lease_file)

    # ---- requeue record -------------------------------------------------------------------------

    @property
    def requeue_file(self) -> Path:
        return self.path / "requeue.json"

    def requeue_record(self) -> dict[str, Any]:
        """requeue.json ({} when absent): job_id, requeues (SLURM_RESTART_COUNT of the latest launch),
        max_requeues, updated (a Unix time) and events (one per signal: time, job_id,
        restart_count, signal, step, action "requeued" or "stopped"). Only what has its right type
        is returned (`read_requeue_record`)."""
        return self.read_requeue_record()[0]

    def read_requeue_record(self) -> tuple[dict[str, Any], str | None]:
        """requeue.json's usable part, and what could not be used (None if all could)."""
        try:
            data = read_json(self.requeue_file)
        except DamagedRecord as err:
            return {}, str(err)
        if data is None:
            return {}, None
        if not isinstance(data, dict):
            return {}, f"JSON {type(data).__name__} where an object belongs"
        record = {
            key: value for key, value in data.items() if key not in _REQUEUE or is_a(value, _REQUEUE[key])
        }
        events = data.get("events", [])
        record["events"] = (
            [e for e in events if has_fields(e, _REQUEUE_EVENT)] if isinstance(events, list) else []
        )
        wrong = [key for key in data if key not in record] + (
            ["events"] if record["events"] != events else []
        )
        return record, (f"wrong-typed {', '.join(wrong)} left out" if wrong else None)

    def update_requeue_record(self, **fields: Any) -> None:
        """Merge `fields` into requeue.json (written aside, then renamed). Rank 0 only. A damaged
        record is kept as requeue.json.damaged, with one line; its usable fields carry over."""
        record, problem = self.read_requeue_record()
        if problem is not None:
            aside = self.requeue_file.with_name(self.requeue_file.name + ".damaged")
            os.replace(self.requeue_file, aside)
            print(f"{self.requeue_file}: {problem}; kept as {aside}, a new record started", file=sys.stderr)
        record |= fields | {"updated": time.time()}
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.requeue_file, record)

    # ---- SLURM jobs -----------------------------------------------------------------------------

    @property
    def slurm(self) -> Path:
        return self.path / "slurm"

    @property
    def sbatch_script(self) -> Path:
        return self.slurm / "train.sbatch"

    @property
    def jobs_file(self) -> Path:
        return self.slurm / "jobs.jsonl"

    def record_job(self, job_id: str) -> None:
        """Append a submitted job to slurm/jobs.jsonl (on a line of its own after a cut-off one)."""
        self.slurm.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"job_id": job_id, "time": time.time(), "script": str(self.sbatch_script)}) + "\n"
        with open(self.jobs_file, "a+b") as f:
            if f.tell() and (f.seek(f.tell() - 1), f.read(1))[1] != b"\n":
                line = "\n" + line
            f.write(line.encode())

    def latest_job_id(self) -> str | None:
        """The most recently submitted or started job (from jobs.jsonl and requeue.json)."""
        candidates = [job] if (job := self._last_recorded_job()) else []
        record = self.requeue_record()
        if record.get("job_id"):
            candidates.append((float(record.get("updated", 0.0)), str(record["job_id"])))
        return max(candidates)[1] if candidates else None

    def _last_recorded_job(self) -> tuple[float, str] | None:
        """(time, job id) of the last well-formed line of jobs.jsonl; damaged lines are passed over."""
        try:
            lines = self.jobs_file.read_bytes().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                job = json.loads(line)
            except ValueError:
                continue
            if has_fields(job, _JOB):
                return float(job["time"]), str(job["job_id"])
        return None

    # ---- status ---------------------------------------------------------------------------------

    def summary(self) -> RunSummary:
        """Progress, newest checkpoint, requeues and throughput, from the run's files."""
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such run directory")
        config = self.latest_config()
        try:
            log: RunLog | None = self.read_logs()
        except UserError:
            log = None
        loss = log.series.get(TRAIN_LOSS) if log is not None else None
        speed = log.series.get(TOKENS_PER_SEC) if log is not None else None
        skipped = log.series.get(SKIPPED_STEPS) if log is not None else None
        requeue, requeue_problem = self.read_requeue_record()
        return RunSummary(
            # row k of the log holds the loss of optimizer step k + 1
            steps_done=int(loss.steps[-1]) + 1 if loss is not None else 0,
            max_steps=_positive_int(config, "trainer", "max_steps"),
            global_batch_tokens=_positive_int(config, "data", "global_batch_tokens"),
            last_loss=float(loss.values[-1]) if loss is not None else None,
            tokens_per_sec=float(speed.values[-1]) if speed is not None and len(speed.values) else None,
            latest_checkpoint=self.latest_checkpoint(),
            requeue=requeue,
            requeue_problem=requeue_problem,
            skipped_steps=int(skipped.values[-1]) if skipped is not None else 0,
            incidents=tuple(self.incidents(strict=False)),
            goodput=read_goodput(self.path),
        )


def _positive_int(config: dict[str, Any], section: str, name: str) -> int | None:
    """config[section][name] if it is a positive int, else None (a hand-edited or damaged config)."""
    values = config.get(section)
    value = values.get(name) if isinstance(values, dict) else None
    return value if isinstance(value, int) and is_a(value, (int,)) and value > 0 else None


def _in_use_message(run: RunDir, owner: dict[str, Any]) -> str:
    return (
        f"{run.path} is in use by another `pretrain fit` ({lease.describe_owner(owner)}): two runs in one directory would overwrite each other's checkpoints. "
        "Wait for it to finish or stop it, or give this run another run_dir; if that process is gone for good "
        f"(its node died), delete {run.lease_file}"
    )
