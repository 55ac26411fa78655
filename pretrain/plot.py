"""`pretrain plot`: loss curves of training runs, drawn from their Lightning CSV logs.

A run directory holds `logs/version_<k>/metrics.csv`, one version per launch; version k+1
resumed version k from a checkpoint. How the logs are read:

- columns are `step` plus metric names, in any order; an empty cell means "not logged";
- the run may still be writing: a last line without a newline is skipped, cells that are not
  numbers are ignored, and a version with no rows yet is skipped;
- a later version wins on overlapping steps: version k is cut at the first step of version k+1,
  and a resume is marked there;
- the tokens seen at a point come from `train/tokens_seen`, linear in step: exact at a step that
  logged it, interpolated between such steps and extrapolated beyond them from the two nearest
  (from step 0 with 0 tokens if only one step logged it). A run that never logged
  `train/tokens_seen` makes the plot use steps for its x-axis.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.errors import UserError

if TYPE_CHECKING:
    import argparse

    import numpy as np
    from matplotlib.figure import Figure

TOKENS = "train/tokens_seen"
TRAIN_LOSS = "train/loss"
LR = "train/lr"
_VERSION_DIR = re.compile(r"version_(\d+)")
_VAL_LOSS = re.compile(r"val/(.+)/loss")
# Line styles of validation sources; "--" is left for resume marks.
_VAL_STYLES: tuple[Any, ...] = ("-", ":", "-.", (0, (3, 1, 1, 1, 1, 1)))

Row = tuple[int, dict[str, float]]


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

    def val_sources(self) -> list[str]:
        """Names of the validation sources with a `val/<source>/loss` series, sorted."""
        return sorted(match[1] for name in self.series if (match := _VAL_LOSS.fullmatch(name)))


def load_run(run_dir: str | os.PathLike[str]) -> RunLog:
    """Read and merge all `logs/version_<k>/metrics.csv` of a run directory."""
    import numpy as np

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    versions = {}
    for path in (run_dir / "logs").glob("version_*/metrics.csv"):
        if match := _VERSION_DIR.fullmatch(path.parent.name):
            versions[int(match[1])] = path
    if not versions:
        raise UserError(f"{run_dir}: no logs/version_<k>/metrics.csv (is this a run directory?)")
    paths = [versions[k] for k in sorted(versions)]

    rows: list[Row] = []
    resume_steps: list[int] = []
    for path in paths:
        version_rows = _read_metrics(path)
        if not version_rows:
            continue
        first = min(step for step, _ in version_rows)
        if rows:
            resume_steps.append(first)
            rows = [row for row in rows if row[0] < first]
        rows += version_rows
    if not rows:
        raise UserError(f"no usable metrics rows in {', '.join(map(str, paths))}")

    known_tokens = {step: metrics[TOKENS] for step, metrics in rows if TOKENS in metrics}
    series = {}
    for name in dict.fromkeys(name for _, metrics in rows for name in metrics):
        steps = np.array([step for step, metrics in rows if name in metrics])
        values = np.array([metrics[name] for _, metrics in rows if name in metrics])
        series[name] = Series(steps, _tokens_at(steps, known_tokens), values)
    resume_tokens = _tokens_at(np.array(resume_steps), known_tokens)
    return RunLog(
        run_dir.resolve().name, series, list(zip(resume_steps, resume_tokens.tolist(), strict=True))
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
    """Tokens seen at `steps`, linear in step through the steps in `known` (see the module docstring)."""
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


def smooth(values: Sequence[float] | np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard-style smoothing).

    avg_n = weight * avg_{n-1} + (1 - weight) * x_n from avg_0 = 0, reported as avg_n / (1 - weight**n)
    so that early points are not pulled toward 0. `weight` in [0, 1): 0 returns the values
    unchanged, w averages over roughly the last 1 / (1 - w) points. Non-finite values (a diverged
    step) are skipped: their output repeats the current average.
    """
    import numpy as np

    if not 0 <= weight < 1:
        raise UserError(f"smoothing weight must be in [0, 1), got {weight}")
    out = np.full(len(values), np.nan)
    avg, count = 0.0, 0
    for i, value in enumerate(np.asarray(values, dtype=float)):
        if math.isfinite(value):
            avg = weight * avg + (1 - weight) * value
            count += 1
        if count:
            out[i] = avg / (1 - weight**count)
    return out


def format_tokens(count: float) -> str:
    """A token count for an axis or a summary: 0, 512, 1.5K, 39.32M, 2B, 1.1T."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.4g}{suffix}"
    return f"{count:.4g}"


def plot_runs(
    runs: Sequence[str | os.PathLike[str] | RunLog], out_path: str | os.PathLike[str], smoothing: float = 0.9
) -> Figure:
    """Draw loss and learning rate of runs (directories or loaded logs), save a PNG, return the figure.

    Top panel: training loss raw (thin) and smoothed (thick), validation loss per source (markers,
    one line style per source); bottom panel: learning rate. One color per run; dashed vertical
    lines where a run resumed. Every line has a gid "<run>:<metric>[:raw|:smooth]" or "<run>:resume".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    logs = [run if isinstance(run, RunLog) else load_run(run) for run in runs]
    by_steps = any(TOKENS not in run.series for run in logs)
    sources = sorted({source for run in logs for source in run.val_sources()})

    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))

    def x(series: Series) -> np.ndarray:
        return series.steps if by_steps else series.tokens

    for i, run in enumerate(logs):
        color = f"C{i % 10}"
        if train := run.series.get(TRAIN_LOSS):
            loss_ax.plot(
                x(train), train.values, color=color, lw=0.6, alpha=0.35, gid=f"{run.name}:{TRAIN_LOSS}:raw"
            )
            smoothed = smooth(train.values, smoothing)
            loss_ax.plot(
                x(train),
                smoothed,
                color=color,
                lw=2,
                label=f"{run.name} train",
                gid=f"{run.name}:{TRAIN_LOSS}:smooth",
            )
        for source in run.val_sources():
            val = run.series[f"val/{source}/loss"]
            style = _VAL_STYLES[sources.index(source) % len(_VAL_STYLES)]
            loss_ax.plot(
                x(val),
                val.values,
                color=color,
                ls=style,
                marker="o",
                ms=4,
                label=f"{run.name} val/{source}",
                gid=f"{run.name}:val/{source}/loss",
            )
        if lr := run.series.get(LR):
            lr_ax.plot(x(lr), lr.values, color=color, gid=f"{run.name}:{LR}")
        for step, tokens in run.resumes:
            for ax in (loss_ax, lr_ax):
                ax.axvline(
                    step if by_steps else tokens,
                    color=color,
                    ls="--",
                    lw=1,
                    alpha=0.6,
                    gid=f"{run.name}:resume",
                )

    title = "Training and validation loss" + (
        " (dashed vertical lines: resumes)" if any(run.resumes for run in logs) else ""
    )
    loss_ax.set(title=title, ylabel="loss")
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize="small")
    lr_ax.set(ylabel="learning rate", xlabel="step" if by_steps else "tokens seen")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if not by_steps:
        lr_ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_tokens(value)))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return fig


def summarize(run: RunLog) -> str:
    """One line: last step and tokens seen, last training loss, last validation loss per source."""
    step, tokens = max((series.steps[-1], series.tokens[-1]) for series in run.series.values())
    parts = [f"step {step}"]
    if math.isfinite(tokens):
        parts.append(f"{format_tokens(tokens)} tokens")
    if train := run.series.get(TRAIN_LOSS):
        parts.append(f"train loss {train.values[-1]:.4f}")
    parts += [
        f"val/{source} loss {run.series[f'val/{source}/loss'].values[-1]:.4f}" for source in run.val_sources()
    ]
    return f"{run.name}: {', '.join(parts)}"


def register(subcommands: Any) -> None:
    """Add the `plot` subcommand to an argparse subparsers action."""
    parser = subcommands.add_parser(
        "plot",
        help="plot loss curves of runs from their CSV logs",
        description="Plot training loss (raw and smoothed), validation loss per source and the learning rate "
        "of one or more runs against tokens seen, from RUN_DIR/logs/version_<k>/metrics.csv.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (holds logs/version_<k>/)"
    )
    parser.add_argument("-o", "--out", default="loss.png", help="PNG file to write (default: %(default)s)")
    parser.add_argument(
        "--smoothing",
        type=float,
        default=0.9,
        help="EMA weight for the training loss, in [0, 1); 0 plots it unsmoothed (default: %(default)s)",
    )
    parser.set_defaults(run=_plot)


def _plot(args: argparse.Namespace) -> int:
    runs = [load_run(run_dir) for run_dir in args.run_dirs]
    plot_runs(runs, args.out, args.smoothing)
    print(f"wrote {args.out}")
    for run in runs:
        print(summarize(run))
    return 0
