"""`pretrain plot`'s drawing: loss curves and learning rate of runs against tokens seen.

The logs are read by `pretrain.run_dir.RunDir.read_logs` (all launches merged, resumes marked).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.errors import UserError
from pretrain.run_dir import LR, TOKENS, TRAIN_LOSS, RunDir, RunLog, Series

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

# Line styles of validation sources; "--" is left for resume marks.
_VAL_STYLES: tuple[Any, ...] = ("-", ":", "-.", (0, (3, 1, 1, 1, 1, 1)))


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


def plot_runs(
    runs: Sequence[str | os.PathLike[str] | RunLog],
    out_path: str | os.PathLike[str],
    smoothing: float | None = None,
) -> Figure:
    """Draw loss and learning rate of runs (directories or loaded logs), save a PNG, return the figure.

    Top panel: training loss raw (thin) and smoothed (thick: an EMA of weight `smoothing`, by default
    `auto_smoothing` of the run's number of points; the legend says over how many), validation loss per source (markers,
    one line style per source); bottom panel: learning rate. One color per run; dashed vertical
    lines where a run resumed. Every line has a gid "<run>:<metric>[:raw|:smooth]" or "<run>:resume".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    logs = [run if isinstance(run, RunLog) else RunDir(run).read_logs() for run in runs]
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
    """One line: optimizer steps done and tokens seen, last training loss, last validation loss per source.

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
    return f"{run.name}: {', '.join(parts)}"
