"""A run's logs: every launch's `logs/version_<k>/metrics.csv`, merged into one series per metric.

- columns are `step` plus metric names, in any order; an empty cell means "not logged";
- the run may still be writing: a last line without a newline is skipped, cells that are not
  numbers are ignored, and a version with no rows yet is skipped;
- a later version wins on overlapping steps: version k is cut where version k+1 resumed (its
  `train/start_step`, else its first logged step), and the resume is marked there;
- the tokens seen at a point come from `train/tokens_seen`, linear in step: exact at a step that
  logged it, interpolated between such steps and extrapolated beyond them from the two nearest
  (from step 0 with 0 tokens if only one step logged it); NaN if no step logged it.
- downstream benchmark scores are the sparse columns `downstream/<task>/<metric>` (`RunLog.downstream`),
  merged across versions like every other column.

No torch import; numpy only when logs are read.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.errors import UserError
from pretrain.eval.metrics import is_score

if TYPE_CHECKING:
    import numpy as np

TOKENS = "train/tokens_seen"
TRAIN_LOSS = "train/loss"
TOKENS_PER_SEC = "train/tokens_per_sec"
LR = "train/lr"
SKIPPED_STEPS = "train/skipped_steps"
START_STEP = "train/start_step"  # logged by a launch that resumed: the step it resumed at
_VAL_LOSS = re.compile(r"val/(.+)/loss")
_DOWNSTREAM = re.compile(r"downstream/(.+)/([^/]+)")

Row = tuple[int, dict[str, float]]


def downstream_column(task: str, metric: str) -> str:
    """The log column of a downstream benchmark score, e.g. `downstream/hellaswag/acc_norm`."""
    return f"downstream/{task}/{metric}"


@dataclass(frozen=True)
class Series:
    """One metric of a run in logging order."""

    steps: np.ndarray
    tokens: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class RunLog:
    """All launches of one run merged: metric name -> series, and (step, tokens) of each resume."""

    name: str
    series: dict[str, Series]
    resumes: list[tuple[int, float]]
    incidents: tuple[dict[str, Any], ...] = ()  # incidents.jsonl's readable records

    def val_sources(self) -> list[str]:
        """Names of the validation sources with a `val/<source>/loss` series, sorted."""
        return sorted(match[1] for name in self.series if (match := _VAL_LOSS.fullmatch(name)))

    def downstream(self) -> dict[str, dict[str, Series]]:
        """Downstream benchmark scores: task -> metric -> series, both sorted by name."""
        found: dict[str, dict[str, Series]] = {}
        for name in sorted(self.series):
            if (match := _DOWNSTREAM.fullmatch(name)) and is_score(match[2]):
                found.setdefault(match[1], {})[match[2]] = self.series[name]
        return dict(sorted(found.items()))

    def downstream_extra(self, task: str, name: str) -> Series | None:
        """A downstream column that is not a score: `<metric>_stderr` or `chance`
        (`pretrain.eval.metrics`), None if no evaluation logged it."""
        return self.series.get(downstream_column(task, name))


def merge_logs(name: str, paths: list[Path], incidents: tuple[dict[str, Any], ...] = ()) -> RunLog:
    """The metrics.csv files of a run's launches, oldest first, merged (module docstring)."""
    import numpy as np

    rows: list[Row] = []
    resume_steps: list[int] = []
    for path in paths:
        version_rows = _read_metrics(path)
        if not version_rows:
            continue
        starts = [metrics[START_STEP] for _, metrics in version_rows if START_STEP in metrics]
        first = int(starts[0]) if starts else min(step for step, _ in version_rows)
        if rows:
            resume_steps.append(first)
            rows = [row for row in rows if row[0] < first]
        rows += version_rows
    if not rows:
        raise UserError(f"no usable metrics rows in {', '.join(map(str, paths))}")

    known_tokens = {step: metrics[TOKENS] for step, metrics in rows if TOKENS in metrics}
    series = {}
    for column in dict.fromkeys(column for _, metrics in rows for column in metrics):
        steps = np.array([step for step, metrics in rows if column in metrics])
        values = np.array([metrics[column] for _, metrics in rows if column in metrics])
        series[column] = Series(steps, _tokens_at(steps, known_tokens), values)
    resume_tokens = _tokens_at(np.array(resume_steps), known_tokens)
    return RunLog(
        name,
        series,
        list(zip(resume_steps, resume_tokens.tolist(), strict=True)),
        incidents,
    )


def _read_metrics(path: Path) -> list[Row]:
    """The complete rows of one metrics.csv as (step, {metric: value}), empty cells left out."""
    try:
        text = path.read_text()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # the last line is still being written
        rows = []
        for record in csv.DictReader(io.StringIO(text)):
            step = _number(record.pop("step", None))
            if step is None or not math.isfinite(step):
                continue
            metrics = {
                name: value for name, cell in record.items() if name and (value := _number(cell)) is not None
            }
            if metrics:
                rows.append((int(step), metrics))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read {path}: {err}") from err
    return rows


def _number(cell: str | None) -> float | None:
    try:
        return float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _tokens_at(steps: np.ndarray, known: dict[int, float]) -> np.ndarray:
    """Tokens seen at `steps`, linear in step through the steps in `known` (module docstring)."""
    import numpy as np

    if not known:
        return np.full(len(steps), np.nan)
    xs = np.array(sorted(known), dtype=float)
    ys = np.array([known[step] for step in sorted(known)], dtype=float)
    if len(xs) == 1 and xs[0] > 0:
        xs, ys = np.r_[0.0, xs], np.r_[0.0, ys]
    tokens = np.interp(steps, xs, ys)
    if len(xs) > 1:
        before, after = steps < xs[0], steps > xs[-1]
        tokens[before] = ys[0] + (steps[before] - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
        tokens[after] = ys[-1] + (steps[after] - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return tokens
