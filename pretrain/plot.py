"""`pretrain plot`'s drawing: loss curves, learning rate and downstream benchmark scores of runs
against tokens seen.

The logs are read by `pretrain.run_dir.RunDir.read_logs` (all launches merged, resumes marked).
A downstream panel shows each score with its standard error (the `<metric>_stderr` lm-eval
reports, logged beside it) and, for acc and acc_norm of a multiple-choice task, its chance level
(logged as `chance`) as a dotted line kept inside the y-axis: a model at chance reads as one, not
as a trend in the noise.

`plot_time` draws where each launch's wall time went (`pretrain.run_dir.goodput`): `pretrain plot --time`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.errors import UserError
from pretrain.eval.metrics import CHANCE, CHANCE_METRICS, headline_metric, stderr_name
from pretrain.run_dir import LR, TOKENS, TRAIN_LOSS, RunDir, RunLog, Series, downstream_column
from pretrain.run_dir.goodput import LaunchTime, read_goodput

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pretrain.anneal.report import AnnealView

# Line styles of validation sources; "--" is left for resume marks.
_VAL_STYLES: tuple[Any, ...] = ("-", ":", "-.", (0, (3, 1, 1, 1, 1, 1)))
# The metric that stands for a downstream task: the first of these it has, else its first by name.


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


def auto_smoothing(points: int) -> float:
    """The EMA weight that averages over about a twentieth of `points` (none up to 20 points)."""
    return 1 - 1 / max(1.0, points / 20)


def downstream_headlines(logs: Sequence[RunLog]) -> dict[str, str]:
    """Task -> headline metric over all runs' downstream scores (one metric per task, so that the
    runs compare like with like), tasks sorted."""
    metrics: dict[str, set[str]] = {}
    for run in logs:
        for task, series in run.downstream().items():
            metrics.setdefault(task, set()).update(series)
    return {task: headline_metric(task, names) for task, names in sorted(metrics.items())}


def _task_grid(tasks: int) -> tuple[int, int]:
    """Rows and columns of the downstream panels: near square, 3 x 3 for up to 9 tasks; none for none."""
    cols = math.ceil(math.sqrt(tasks))
    return (math.ceil(tasks / cols), cols) if tasks else (0, 0)


def _layout(tasks: int) -> tuple[Figure, Axes, Axes, list[Axes]]:
    """An 11 x 7 inch figure of loss over learning rate; with downstream tasks, widened (and
    heightened beyond two rows) by a grid of one panel per task to their right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = _task_grid(tasks)
    fig = Figure(figsize=(11 + 3.5 * cols, max(7, 3 * rows)), layout="constrained")
    FigureCanvasAgg(fig)
    if not tasks:
        return fig, *fig.subplots(2, 1, sharex=True, height_ratios=(3, 1)), []
    left, right = fig.subfigures(1, 2, squeeze=False, width_ratios=(11, 3.5 * cols))[0]
    loss_ax, lr_ax = left.subplots(2, 1, sharex=True, height_ratios=(3, 1))  # first in fig.axes
    grid = right.add_gridspec(rows, cols)
    return fig, loss_ax, lr_ax, [right.add_subplot(grid[i // cols, i % cols]) for i in range(tasks)]


def _draw_score(
    ax: Axes, run: RunLog, task: str, metric: str, xs: np.ndarray, score: Series, color: str
) -> None:
    """One run's headline score of one task: markers with standard-error bars where logged, and
    the chance level (dotted, labelled once per panel) for acc and acc_norm where logged."""
    import numpy as np

    column = downstream_column(task, metric)
    stderr = run.downstream_extra(task, stderr_name(metric))
    errors = None
    if stderr is not None:
        by_step = dict(zip(stderr.steps.tolist(), stderr.values.tolist()))
        errors = np.array([by_step.get(step, np.nan) for step in score.steps.tolist()])
    bars = ax.errorbar(
        xs, score.values, yerr=errors, color=color, marker="o", ms=4, gid=f"{run.name}:{column}"
    )
    if bars.lines[2]:
        bars.lines[2][0].set_gid(f"{run.name}:{downstream_column(task, stderr_name(metric))}")
    chance = run.downstream_extra(task, CHANCE)
    if metric in CHANCE_METRICS and chance is not None:
        labelled = any(line.get_label() == "chance" for line in ax.get_lines())
        ax.axhline(
            float(chance.values[-1]),
            color=color,
            ls=":",
            lw=1.2,
            label="_chance" if labelled else "chance",
            gid=f"{run.name}:{downstream_column(task, CHANCE)}",
        )  # in the y data limits: autoscaled in


def plot_runs(
    runs: Sequence[str | os.PathLike[str] | RunLog],
    out_path: str | os.PathLike[str],
    smoothing: float | None = None,
    anneal: Sequence[AnnealView | None] = (),
) -> Figure:
    """Draw loss, learning rate and downstream scores of runs (directories or loaded logs), save a
    PNG, return the figure.

    Top panel: training loss raw (thin) and smoothed (thick: an EMA of weight `smoothing`, by default
    `auto_smoothing` of the run's number of points; the legend says over how many), validation loss per source (markers,
    one line style per source); bottom panel: learning rate. To their right, only where runs logged
    downstream scores, a grid of one panel per task (titled by the task) with its headline metric
    (`downstream_headlines`), markers at the evaluations. One color per run; dashed vertical lines
    where a run resumed. Every line has a gid "<run>:<metric>[:raw|:smooth]" or "<run>:resume".
    `anneal[i]`, where given (`pretrain.anneal.report.anneal_view`), adds run i's anneal probes:
    annealed points and the forecast with its band on the loss panel ("if annealed now"), annealed
    scores on the task panels (gids "<run>:anneal:...").
    """
    from matplotlib.ticker import FuncFormatter

    logs = [run if isinstance(run, RunLog) else RunDir(run).read_logs() for run in runs]
    by_steps = any(TOKENS not in run.series for run in logs)
    sources = sorted({source for run in logs for source in run.val_sources()})
    headlines = downstream_headlines(logs)
    for view in anneal:  # tasks only the probes were scored on get their panels too
        for key in view.downstream if view is not None else ():
            task, _, metric = key.rpartition("/")
            headlines.setdefault(task, metric)

    fig, loss_ax, lr_ax, task_axes = _layout(len(headlines))

    def x(series: Series) -> np.ndarray:
        return series.steps if by_steps else series.tokens

    for i, run in enumerate(logs):
        color = f"C{i % 10}"
        if train := run.series.get(TRAIN_LOSS):
            loss_ax.plot(
                x(train), train.values, color=color, lw=0.6, alpha=0.35, gid=f"{run.name}:{TRAIN_LOSS}:raw"
            )
            weight = auto_smoothing(len(train.values)) if smoothing is None else smoothing
            smoothed = smooth(train.values, weight)
            span = f"EMA over ~{1 / (1 - weight):.0f} points" if weight > 0 else "unsmoothed"
            loss_ax.plot(
                x(train),
                smoothed,
                color=color,
                lw=2,
                label=f"{run.name} train ({span})",
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
        downstream = run.downstream()
        for ax, (task, metric) in zip(task_axes, headlines.items()):
            if score := downstream.get(task, {}).get(metric):
                _draw_score(ax, run, task, metric, x(score), score, color)
        for incident in run.incidents:  # a divergence: its bad steps shaded, the decision marked
            first, last = _x_of_steps(run, incident["steps"], by_steps)
            for ax in (loss_ax, lr_ax):
                ax.axvspan(
                    first, max(last, first + 1e-9), color="red", alpha=0.15, gid=f"{run.name}:incident"
                )
            if incident["action"] == "rollback":  # the samples stepped over, as steps of the old path
                start, stop = _x_of_steps(run, incident["skip_steps"], by_steps)
                loss_ax.axvspan(
                    start, stop, ymax=0.04, color="red", alpha=0.5, gid=f"{run.name}:incident:skipped"
                )
            loss_ax.plot(
                [last],
                [1.0],
                marker="x",
                color="red",
                ms=8,
                transform=loss_ax.get_xaxis_transform(),
                clip_on=False,
                gid=f"{run.name}:incident:{incident['action']}",
            )
        if i < len(anneal) and (view := anneal[i]) is not None and not by_steps:
            _draw_anneal(loss_ax, dict(zip(headlines.items(), task_axes)), run.name, view, color)
        for step, tokens in run.resumes:
            for ax in (loss_ax, lr_ax, *task_axes):
                ax.axvline(
                    step if by_steps else tokens,
                    color=color,
                    ls="--",
                    lw=1,
                    alpha=0.6,
                    gid=f"{run.name}:resume",
                )

    notes = [
        note
        for note, shown in (
            ("dashed vertical lines: resumes", any(run.resumes for run in logs)),
            (
                "red: divergences, x: rollback or stop, bar: samples skipped",
                any(run.incidents for run in logs),
            ),
        )
        if shown
    ]
    title = "Training and validation loss" + (f" ({'; '.join(notes)})" if notes else "")
    loss_ax.set(title=title, ylabel="loss")
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize="small")
    xlabel = "step" if by_steps else "tokens seen"
    lr_ax.set(ylabel="learning rate", xlabel=xlabel)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax, (task, metric) in zip(task_axes, headlines.items()):
        ax.set(title=task, ylabel=metric, xlabel=xlabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    if not by_steps:
        for ax in (lr_ax, *task_axes):
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_tokens(value)))
    for ax in (loss_ax, lr_ax, *task_axes):
        ax.grid(alpha=0.3)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return fig


def _draw_anneal(
    loss_ax: Axes, task_axes: dict[tuple[str, str], Axes], name: str, view: AnnealView, color: str
) -> None:
    """A run's anneal probes: annealed losses (squares) and the forecast with its band, annealed scores."""
    loss_ax.plot(
        view.tokens,
        view.val_loss,
        ls="none",
        marker="s",
        ms=6,
        mfc="white",
        color=color,
        label=f"{name} val if annealed now (probes)",
        gid=f"{name}:anneal:val_loss",
    )
    if (curve := view.loss_curve) is not None:
        loss_ax.plot(curve.tokens, curve.value, color=color, ls=":", lw=1.5, gid=f"{name}:anneal:forecast")
        loss_ax.fill_between(
            curve.tokens,
            curve.low,
            curve.high,
            color=color,
            alpha=0.15,
            label=f"{name} forecast, {curve.level:.0%} band",
            gid=f"{name}:anneal:band",
        )
    for (task, metric), ax in task_axes.items():
        if (points := view.downstream.get(f"{task}/{metric}")) is not None:
            ax.plot(
                *points,
                ls="none",
                marker="s",
                mfc="white",
                color=color,
                label=f"{name} if annealed now",
                gid=f"{name}:anneal:{task}",
            )


def _x_of_steps(run: RunLog, steps: Sequence[int], by_steps: bool) -> np.ndarray:
    """Where steps lie on the x axis: the steps themselves, or the tokens seen at them."""
    import numpy as np

    train = run.series.get(TRAIN_LOSS)
    if by_steps or train is None or len(train.steps) < 2:
        return np.asarray(steps, dtype=float)
    return np.interp(steps, train.steps.astype(float), train.tokens)


def summarize(run: RunLog) -> str:
    """One line: optimizer steps done and tokens seen, last training loss, last validation loss per
    source, last score per downstream task (its headline metric).

    The loss of optimizer step k + 1 is logged at step k, so a run with a loss at step 89 has done 90
    steps, as its checkpoint `step-00000090.ckpt` and `pretrain status` say."""
    step, tokens = max((series.steps[-1], series.tokens[-1]) for series in run.series.values())
    if train := run.series.get(TRAIN_LOSS):
        step = max(step, int(train.steps[-1]) + 1)
    parts = [f"step {step}"]
    if math.isfinite(tokens):
        parts.append(f"{format_tokens(tokens)} tokens")
    if train := run.series.get(TRAIN_LOSS):
        parts.append(f"train loss {train.values[-1]:.4f}")
    parts += [
        f"val/{source} loss {run.series[f'val/{source}/loss'].values[-1]:.4f}" for source in run.val_sources()
    ]
    downstream = run.downstream()
    for task, metric in downstream_headlines([run]).items():
        parts.append(f"downstream/{task} {metric} {downstream[task][metric].values[-1]:.4f}")
    if run.incidents:
        rollbacks = sum(entry["action"] == "rollback" for entry in run.incidents)
        parts.append(f"{rollbacks} rollback(s), {len(run.incidents) - rollbacks} divergence stop(s)")
    return f"{run.name}: {', '.join(parts)}"


# Segments of a launch's bar in `plot_time`: its phases, then the steps later redone (lost).
TIME_SEGMENTS = (
    "startup",
    "useful steps",
    "lost steps",
    "checkpoint",
    "validation",
    "downstream",
    "teardown",
)


def time_segments(launch: LaunchTime) -> dict[str, float]:
    """A launch's wall seconds split for `plot_time`: its step time is split into useful and lost."""
    phases = launch.phases
    return {
        "startup": phases["startup"],
        "useful steps": launch.useful,
        "lost steps": launch.lost_seconds,
        "checkpoint": phases["checkpoint"],
        "validation": phases["validation"],
        "downstream": phases["downstream"],
        "teardown": phases["teardown"],
    }


def plot_time(run_dirs: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str]) -> Figure:
    """Where the time went: one stacked bar per launch (labelled `<run>:<k>`) of seconds per phase,
    with the run's goodput in the title; every bar segment has a gid "<run>:<k>:<segment>"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars: list[tuple[str, dict[str, float]]] = []
    goodputs = []
    for run_dir in run_dirs:
        name = Path(run_dir).resolve().name
        report = read_goodput(Path(run_dir))
        if not report.launches:
            raise UserError(f"{run_dir}: no goodput/launch-<k>.json records (written by `pretrain fit`)")
        bars += [(f"{name}:{launch.launch}", time_segments(launch)) for launch in report.launches]
        goodputs.append(f"{name} {report.goodput:.1%}")
    fig = Figure(figsize=(max(5.0, 0.6 * len(bars) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bottoms = [0.0] * len(bars)
    for segment in TIME_SEGMENTS:
        heights = [seconds[segment] for _, seconds in bars]
        drawn = ax.bar([label for label, _ in bars], heights, bottom=bottoms, label=segment)
        for (label, _), patch in zip(bars, drawn.patches, strict=True):
            patch.set_gid(f"{label}:{segment}")
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set(ylabel="wall seconds", xlabel="run:launch")
    ax.set_title(f"where the time went\ngoodput {', '.join(goodputs)}", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return fig
