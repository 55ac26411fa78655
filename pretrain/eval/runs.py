"""`pretrain eval` on one checkpoint, or on the checkpoints of a run directory.

A run's scores are kept in RUN_DIR/eval/step-NNNNNNNN.json (`RunDir.eval_result`), per settings
(few-shot count and limit): a checkpoint already scored on a task with the same settings is not
evaluated again, so the command can be rerun as training writes new checkpoints. The table of
scores against tokens seen (TinyLlama's intermediate-checkpoint table for any run) is written to
RUN_DIR/eval/table.md and printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pretrain.data.shards import write_atomic
from pretrain.errors import UserError
from pretrain.eval.harness import Scores, markdown_table, run_tasks, scores
from pretrain.run_dir import RunDir

MakeLM = Callable[[Path], Any]  # checkpoint path -> an lm-eval LM over its weights


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
    log: Callable[[str], None] = print,
) -> tuple[str, dict[int, dict[str, Any]]]:
    """Score the run's checkpoints (every `every` steps, or all) not scored yet: the table, and the
    record of each checkpoint (step -> {step, tokens, checkpoint, evaluations})."""
    key = settings_key(num_fewshot, limit)
    checkpoints = [(step, path) for step, path in run.list_checkpoints() if not every or step % every == 0]
    if not checkpoints:
        which = f" at a multiple of {every} steps" if every else ""
        raise UserError(f"{run.checkpoints} holds no checkpoint{which} to evaluate")
    rows: list[tuple[str, Scores]] = []
    records: dict[int, dict[str, Any]] = {}
    for step, path in checkpoints:
        record = _read(run.eval_result(step))
        done: Scores = record.setdefault("evaluations", {}).setdefault(key, {})
        missing = {name: task for name, task in tasks.items() if name not in done}
        if missing:
            log(f"evaluating {path.name} on {', '.join(missing)}")
            lm = make_lm(path)
            done |= scores(run_tasks(lm, missing, num_fewshot, limit))
            record.update(step=step, tokens=getattr(lm, "tokens_seen", None), checkpoint=path.name)
            del lm  # one model in memory at a time
            run.eval_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(
                run.eval_result(step), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
            )
        else:
            log(f"{path.name}: already evaluated ({key})")
        rows.append(
            (_label(step, record.get("tokens")), {name: done[name] for name in tasks if name in done})
        )
        records[step] = record
    table = f"# {run.path.name}: downstream scores ({key})\n\n" + markdown_table(rows, list(tasks))
    write_atomic(run.eval_dir / "table.md", table.encode())
    return table, records


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged record is rebuilt: nothing in it that evaluating again cannot give
    return data if isinstance(data, dict) else {}


def _label(step: int, tokens: int | None) -> str:
    return f"step {step}" + (f" ({_human(tokens)} tokens)" if tokens else "")


def _human(tokens: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return str(tokens)


def table_for(label: str, results: dict[str, Any], names: Sequence[str]) -> str:
    """The markdown table of one evaluation."""
    return markdown_table([(label, scores(results))], list(names))
