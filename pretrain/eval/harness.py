"""Downstream tasks through lm-evaluation-harness: names, suites, loading, scores, tables.

- Task names are lm-eval's (`hellaswag`, `arc_easy`, ...), a suite (`tinyllama-commonsense`:
  TinyLlama's seven zero-shot commonsense tasks with the metric TinyLlama reports for each), or
  the embedded `pystdlib_next_line` (no download: its items ship in `pretrain/eval/tasks/`).
- Loading a task reads its dataset, from the Hugging Face datasets cache when offline. A task
  whose data cannot be read is one line naming the task and `pretrain eval --download TASK`
  (run where there is internet), so a run on an offline compute node fails at start.
- Scores are {task: {metric: value}} from lm-eval's results (filters other than `none` keep
  their name: `exact_match,strict-match`), with each metric's standard error as
  `<metric>_stderr` and a multiple-choice task's chance level as `chance`
  (`pretrain.eval.metrics`); a task's headline metric is its suite's, else acc_norm, else acc,
  else the first.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import UserError
from pretrain.eval.metrics import CHANCE, STDERR, SUITES, headline_metric, stderr_name

EMBEDDED_DATA = Path(__file__).parent / "tasks"
NEXT_LINE = "pystdlib_next_line"

Scores = dict[str, dict[str, float]]


def embedded_task(name: str) -> dict[str, Any]:
    """The lm-eval config of an embedded task (its data file named by absolute path)."""
    if name != NEXT_LINE:
        raise KeyError(name)
    return {
        "task": NEXT_LINE,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(EMBEDDED_DATA / f"{NEXT_LINE}.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",  # the context ends with its newline; the choice is the next line
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def expand(names: Sequence[str]) -> list[str]:
    """Task names with suites replaced by their tasks, each once, in order."""
    out: list[str] = []
    for name in names:
        for task in SUITES.get(name, {name: ""}):
            if task not in out:
                out.append(task)
    if not out:
        raise UserError(
            "--tasks names no task: give lm-eval task names, a suite (tinyllama-commonsense) or pystdlib_next_line"
        )
    return out


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """`a,b` or ["a", "b,c"] -> task names (suites expanded)."""
    parts = [text] if isinstance(text, str) else list(text)
    return expand([name.strip() for part in parts for name in part.split(",") if name.strip()])


def load_tasks(names: Sequence[str], include_path: str | None = None) -> dict[str, Any]:
    """lm-eval Task objects by name, their datasets read now (module docstring: offline failures);
    `include_path`: a folder of your own task YAMLs (e.g. `dataset_path: json` + `data_files`)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: not a folder of lm-eval task YAML files")
    with _quiet():
        manager = TaskManager(include_path=include_path)
        known = set(manager.all_tasks)
        tasks: dict[str, Any] = {}
        for name in names:
            if name == NEXT_LINE:
                spec: str | dict[str, Any] = embedded_task(name)
            elif name in known:
                spec = name
            else:
                raise UserError(
                    f"unknown task {name!r}: see `lm_eval ls tasks`, the suite tinyllama-commonsense, {NEXT_LINE}, "
                    "or a task YAML of yours in --include-path"
                )
            try:
                loaded = manager.load([spec])["tasks"]
            except Exception as err:  # datasets raises many kinds: offline, missing, gated, network
                first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise UserError(
                    f"task {name}: its dataset could not be read ({type(err).__name__}: {first_line[:200]}); "
                    f"on a machine with internet run `pretrain eval --download {name}` to fill the Hugging "
                    "Face datasets cache (HF_HOME) that this machine reads"
                ) from None
            tasks |= loaded
    return tasks


def run_tasks(
    lm: Any,
    tasks: dict[str, Any],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int = 1234,
) -> dict[str, Any]:
    """lm-eval's results dict for `tasks` (fixed seeds; the caller's random states are kept)."""
    from lm_eval import evaluator

    with _random_states_kept(), _quiet():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        for task in tasks.values():
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        task_dict = {"tasks": dict(tasks), "groups": {}, "group_map": {}}
        results = evaluator.evaluate(lm, task_dict, limit=limit, log_samples=False, bootstrap_iters=1000)
    if results is None:
        raise RuntimeError("lm-eval returned no results on this rank")
    return results


def score_tasks(
    lm: Any, tasks: dict[str, Any], num_fewshot: int | None = None, limit: int | float | None = None
) -> Scores:
    """Run `tasks` (`run_tasks`): their scores, standard errors and chance levels."""
    out = scores(run_tasks(lm, tasks, num_fewshot, limit))
    for task, level in chance_levels(tasks, limit).items():
        out.setdefault(task, {})[CHANCE] = level
    return out


def scores(results: dict[str, Any]) -> Scores:
    """{task: {metric: value, metric_stderr: its standard error}} from lm-eval's results dict
    (aliases and standard errors lm-eval did not compute left out)."""
    out: Scores = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, where = key.split(",", 1)
            base = metric.removesuffix(STDERR)
            name = base if where == "none" else f"{base},{where}"
            out.setdefault(task, {})[stderr_name(name) if base != metric else name] = float(value)
    return out


def chance_levels(tasks: dict[str, Any], limit: int | float | None = None) -> dict[str, float]:
    """The chance level of each multiple-choice task over the documents lm-eval evaluates with
    `limit`: the mean of 1 / the number of choices (what guessing scores in acc and acc_norm)."""
    from lm_eval.evaluator_utils import get_sample_size

    out = {}
    for name, task in tasks.items():
        if task.OUTPUT_TYPE != "multiple_choice":
            continue
        docs = task.doc_iterator(limit=get_sample_size(task, limit))
        inverse = [1 / len(task.doc_to_choice(doc)) for _, doc in docs]
        if inverse:
            out[name] = sum(inverse) / len(inverse)
    return out


def headline(task: str, metrics: dict[str, float]) -> tuple[str, float] | None:
    """(metric, value) a table shows for `task` (`pretrain.eval.metrics.headline_metric`)."""
    if not metrics:
        return None
    metric = headline_metric(task, metrics)
    return metric, metrics[metric]


def markdown_table(rows: Sequence[tuple[str, Scores]], tasks: Sequence[str]) -> str:
    """One row per (label, scores), one column per task (its headline metric, in %), and the average."""
    metrics = {}
    for task in tasks:
        found = next((headline(task, s[task]) for _, s in rows if task in s), None)
        metrics[task] = found[0] if found else ""
    header = ["", *(f"{task} ({metrics[task]})" for task in tasks), "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in rows:
        values = [row.get(task, {}).get(metrics[task]) for task in tasks]
        cells = ["" if v is None else f"{100 * v:.2f}" for v in values]
        present = [v for v in values if v is not None]
        average = (
            f"{100 * sum(present) / len(present):.2f}" if len(present) == len(values) and present else ""
        )
        lines.append("| " + " | ".join([label, *cells, average]) + " |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _random_states_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's random states as they were (training continues unchanged)."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO chatter (one line per task and request type) hidden; warnings stay."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
