"""`pretrain eval` on one checkpoint, or on the checkpoints of a run directory.

A run's scores are kept in RUN_DIR/eval/step-NNNNNNNN.json (`RunDir.eval_result`): the identity of
the checkpoint they scored (`pretrain.model.checkpoint.checkpoint_identity`: the id `pretrain fit`
writes into a checkpoint at save time) and its scores per settings (few-shot count and limit). A
checkpoint already scored on a task with the same settings is not evaluated again, so the command
can be rerun as training writes new checkpoints. A record is scored again, with one line saying
why, when the checkpoint now under its name is another one (rewritten after a rewind to an earlier
checkpoint) or when the record cannot be read (empty, truncated, not UTF-8, JSON of another shape).

Two `pretrain eval` on one run at once: each record is read, scored and written under a lock
(`.step-NNNNNNNN.json.lock` beside it, `flock`, released by the kernel when its process ends,
even killed), so the second waits (saying so in one line), then finds the first one's scores and
adds only what it still misses; RUN_DIR/eval/table.md is rebuilt under its own lock from every
record whose checkpoint is still in the run: one table per settings, the last writer's holds all.
The table of the command's own tasks against tokens seen (TinyLlama's intermediate-checkpoint
table for any run) is printed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import NoneType
from typing import Any

from pretrain.errors import UserError, writing
from pretrain.eval.harness import Scores, markdown_table, run_tasks, score_tasks, scores
from pretrain.files import DamagedRecord, Fields, has_fields, read_json, write_atomic
from pretrain.run_dir import RunDir

MakeLM = Callable[[Path], Any]  # checkpoint path -> an lm-eval LM over its weights
Log = Callable[[str], None]
Record = dict[str, Any]  # step, tokens, checkpoint (its name), checkpoint_id, evaluations

_RECORD: Fields = {
    "step": (int,),
    "tokens": (int, NoneType),
    "checkpoint_id": (str,),
    "evaluations": (dict,),
}


def settings_key(num_fewshot: int | None, limit: int | float | None) -> str:
    """How a result was produced, as stored beside it (other settings are other results)."""
    return f"num_fewshot={num_fewshot} limit={limit}"


def evaluate_checkpoint(
    make_lm: MakeLM,
    path: Path,
    tasks: dict[str, Any],
    num_fewshot: int | None,
    limit: int | float | None,
) -> dict[str, Any]:
    """lm-eval's results dict for one checkpoint."""
    return run_tasks(make_lm(path), tasks, num_fewshot, limit)


def evaluate_run(
    make_lm: MakeLM,
    run: RunDir,
    tasks: dict[str, Any],
    num_fewshot: int | None,
    limit: int | float | None,
    every: int | None = None,
    log: Log = print,
) -> tuple[str, dict[int, Record]]:
    """Score the run's checkpoints (every `every` steps, or all) not scored yet: the table of these
    checkpoints and tasks, and the record of each checkpoint (step -> record)."""
    from pretrain.model.checkpoint import checkpoint_identity  # torch: only when evaluating

    key = settings_key(num_fewshot, limit)
    checkpoints = [(step, path) for step, path in run.list_checkpoints() if not every or step % every == 0]
    if not checkpoints:
        which = f" at a multiple of {every} steps" if every else ""
        raise UserError(f"{run.checkpoints} holds no checkpoint{which} to evaluate")
    rows: list[tuple[str, Scores]] = []
    records: dict[int, Record] = {}
    for step, path in checkpoints:
        with locked(run.eval_result(step), log):
            record = _current_record(run.eval_result(step), path, checkpoint_identity(path), log)
            done: Scores = record["evaluations"].setdefault(key, {})
            if missing := {name: task for name, task in tasks.items() if name not in done}:
                log(f"evaluating {path.name} on {', '.join(missing)}")
                lm = make_lm(path)
                done |= score_tasks(lm, missing, num_fewshot, limit)
                record.update(step=step, tokens=_tokens_seen(lm), checkpoint=path.name)
                del lm  # one model in memory at a time
                _write(run.eval_result(step), json.dumps(record, indent=1, sort_keys=True) + "\n")
            else:
                log(f"{path.name}: already evaluated ({key})")
        rows.append((_label(record), {name: done[name] for name in tasks if name in done}))
        records[step] = record
    with locked(run.eval_dir / "table.md", log):
        _write(run.eval_dir / "table.md", run_tables(run, key, list(tasks)))
    return _heading(run, key) + markdown_table(rows, list(tasks)), records


@contextlib.contextmanager
def locked(target: Path, log: Log) -> Iterator[None]:
    """Hold the lock of `target` (module docstring); say so in one line when waiting for it."""
    lock = target.with_name(f".{target.name}.lock")
    with writing(lock, "scores"):
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{target}: another `pretrain eval` is writing it; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_tables(run: RunDir, key: str, tasks: Sequence[str]) -> str:
    """table.md: per settings (`key` first), the scores of every checkpoint of the run that a record
    holds (records of checkpoints rewritten since are left out), `tasks` first, then the others."""
    from pretrain.model.checkpoint import checkpoint_identity

    by_key: dict[str, list[tuple[str, Scores]]] = {key: []}
    for step, path in run.list_checkpoints():
        record = _valid(read_record(run.eval_result(step)))
        if record is None or record["checkpoint_id"] != checkpoint_identity(path):
            continue
        for settings, done in record["evaluations"].items():
            by_key.setdefault(settings, []).append((_label(record), done))
    sections = []
    for settings, rows in sorted(by_key.items(), key=lambda item: item[0] != key):
        scored = dict.fromkeys(task for _, done in rows for task in sorted(done))
        names = [task for task in tasks if task in scored or settings == key]
        names += [task for task in scored if task not in names]
        sections.append(_heading(run, settings) + markdown_table(rows, names))
    return "\n".join(sections)


def read_record(path: Path) -> Any:
    """A record's JSON, None if it is absent; a `DamagedRecord` message if it cannot be read."""
    try:
        return read_json(path)
    except DamagedRecord as err:
        return str(err)


def _current_record(path: Path, checkpoint: Path, identity: str, log: Log) -> Record:
    """The record of `checkpoint` at `path` if it scored these weights, else a new one (one line why)."""
    found = read_record(path)
    record = _valid(found)
    if found is None:
        why = None
    elif isinstance(found, str):
        why = found
    elif record is None:
        why = "not a record of `pretrain eval` (JSON of another shape)"
    elif record["checkpoint_id"] != identity:
        why = f"it scored other weights than {checkpoint.name} holds now (rewritten since)"
    else:
        return record
    if why:
        log(f"{path}: {why}; scoring {checkpoint.name} again")
    return {"checkpoint_id": identity, "evaluations": {}}


def _valid(record: Any) -> Record | None:
    """`record` if it has a record's shape: its fields, and {settings: {task: {name: number}}}."""
    if not has_fields(record, _RECORD):
        return None
    for done in record["evaluations"].values():
        if not isinstance(done, dict) or not all(
            isinstance(values, dict) and all(_is_number(v) for v in values.values())
            for values in done.values()
        ):
            return None
    return record


def _tokens_seen(lm: Any) -> int | None:
    """The tokens the scored weights were trained on, where their checkpoint says."""
    tokens = getattr(lm, "tokens_seen", None)
    if isinstance(tokens, int | float) and _is_number(tokens) and math.isfinite(tokens):
        return int(tokens)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _write(path: Path, text: str) -> None:
    with writing(path, "scores"):
        write_atomic(path, text.encode())


def _heading(run: RunDir, key: str) -> str:
    return f"# {run.path.name}: downstream scores ({key})\n\n"


def _label(record: Record) -> str:
    tokens = record.get("tokens")
    return f"step {record['step']}" + (f" ({_human(tokens)} tokens)" if tokens else "")


def _human(tokens: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return str(tokens)


def table_for(label: str, results: dict[str, Any], names: Sequence[str]) -> str:
    """The markdown table of one evaluation."""
    return markdown_table([(label, scores(results))], list(names))
