"""Where people look at anneal probes: `RUN_DIR/anneal/table.md`, the forecast's lines (printed by
`pretrain anneal` and `pretrain status`) and the points and curve `pretrain plot` draws.

Every value a forecast gives comes with its band (`pretrain.anneal.forecast`); a forecast that
cannot be made says why in one line. Damaged or foreign probe records are named in one line and
left out (`pretrain.anneal.result.read_results`), never break a report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.anneal.forecast import NOISE_FLOOR, Band, Forecast, NoForecast, fit_forecast, format_band
from pretrain.anneal.result import ANNEAL_DIR, ProbeResult, read_results
from pretrain.errors import UserError
from pretrain.eval.metrics import headline_metric, is_score
from pretrain.files import write_atomic
from pretrain.plot import format_tokens
from pretrain.run_dir import RunDir

TABLE = "table.md"
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")  # downstream metrics where lower is better
INDENT = " " * 12  # `pretrain status` aligns its values after a 12-character label


@dataclass(frozen=True)
class Curve:
    """A fitted forecast drawn over `tokens`: the fitted values and the band's edges."""

    tokens: np.ndarray
    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float


@dataclass(frozen=True)
class AnnealView:
    """What `pretrain plot` draws of a run's probes: annealed points (at their D) and curves."""

    tokens: np.ndarray
    val_loss: np.ndarray
    loss_curve: Curve | None
    downstream: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # "task/metric"


def headline_scores(results: list[ProbeResult]) -> dict[str, str]:
    """task -> the metric that stands for it among the probes' downstream scores ("task/metric" keys)."""
    metrics: dict[str, set[str]] = {}
    for result in results:
        for key in result.downstream:
            task, _, metric = key.rpartition("/")
            if task and is_score(metric):
                metrics.setdefault(task, set()).add(metric)
    return {task: headline_metric(task, names) for task, names in sorted(metrics.items())}


def _points(results: list[ProbeResult], key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(D, value) of the probes that have `key` (None: the annealed validation loss)."""
    chosen = [r for r in results if key is None or key in r.downstream]
    values = [r.val_loss if key is None else r.downstream[key] for r in chosen]
    return np.array([r.tokens for r in chosen], dtype=float), np.array(values, dtype=float)


def fit(results: list[ProbeResult], key: str | None = None, run: RunDir | None = None) -> Forecast:
    """The forecast of the annealed loss (key None) or of a downstream score ("task/metric"); for
    the loss, the parent `run`'s validations set the least noise assumed (`validation_noise`)."""
    tokens, values = _points(results, key)
    higher = key is not None and not any(word in key for word in LOWER_IS_BETTER)
    floor = NOISE_FLOOR if key is not None or run is None else validation_noise(run, results)
    return fit_forecast(tokens, values, higher_is_better=higher, noise_floor=floor)


def validation_noise(run: RunDir, results: list[ProbeResult]) -> float:
    """The noise of one validation loss, from the parent's own validations between the first and
    the last probe (all in the constant phase): the RMS of their second differences over sqrt(6),
    which a straight trend cancels. What curvature is left only widens the band. Three probes fit
    the three-parameter law exactly and leave no residual to measure noise with; this keeps their
    band from resting on `NOISE_FLOOR` alone. Fewer than 3 validations there: `NOISE_FLOOR`."""
    try:
        log = run.read_logs()
    except UserError:
        return NOISE_FLOOR
    first, last = min(r.step for r in results), max(r.step for r in results)
    means: dict[int, list[float]] = {}
    for source in log.val_sources():
        series = log.series[f"val/{source}/loss"]
        for step, value in zip(series.steps, series.values):
            if first <= step + 1 <= last:  # a validation after optimizer step k is logged at k - 1
                means.setdefault(int(step), []).append(float(value))
    values = np.array([sum(v) / len(v) for _, v in sorted(means.items())])
    if len(values) < 3:
        return NOISE_FLOOR
    second = np.diff(values, n=2)
    return max(NOISE_FLOOR, math.sqrt(float(np.mean(second**2)) / 6))


def planned_tokens(run: RunDir) -> int | None:
    """Tokens the run's latest recipe plans in all (max_steps x global batch), None if unknown."""
    summary = run.summary()
    if summary.max_steps and summary.global_batch_tokens:
        return summary.max_steps * summary.global_batch_tokens
    return None


def _reach_line(forecast: Forecast, results: list[ProbeResult], target: float) -> str:
    """Where the annealed loss reaches `target`, with the band (or already reached, or never)."""
    done = [r for r in results if r.val_loss <= target]
    if done:
        first = min(done, key=lambda r: r.tokens)
        return f"already reached: the probe at step {first.step} annealed to {first.val_loss:.3f}"
    band = forecast.tokens_to_reach(target)
    if math.isinf(band.value):
        return f"not reached: the fitted floor E = {forecast.law.e:.3f} is above it"
    high = "not reached within the band's range" if math.isinf(band.high) else format_tokens(band.high)
    return f"at {format_tokens(band.value)} tokens ({band.level:.0%} band {format_tokens(band.low)}-{high})"


def _at_end(forecast: Forecast, planned: int | None) -> tuple[str, Band]:
    """Where the forecast is read: the planned end, else twice the last probe's tokens."""
    if planned:
        return f"at the planned end ({format_tokens(planned)} tokens)", forecast.at(planned)
    tokens = 2 * forecast.law.d_ref
    return f"at {format_tokens(tokens)} tokens (the run's planned end is unknown)", forecast.at(tokens)


def forecast_lines(run_dir: str | os.PathLike, target: float | None = None) -> list[str]:
    """The forecast of the run's probes as a few lines, every value with its band."""
    if target is not None and not (math.isfinite(target) and target > 0):
        raise UserError(f"--target {target}: give the validation loss to reach, a positive number")
    results = read_results(Path(run_dir))
    if not results:
        return ["forecast: no finished probe yet (run `pretrain anneal RUN_DIR`)"]
    try:
        forecast = fit(results, run=RunDir(run_dir))
    except NoForecast as why:
        return [f"forecast: {why}"]
    planned = planned_tokens(RunDir(run_dir))
    where, band = _at_end(forecast, planned)
    law = forecast.law
    lines = [
        f"forecast from {forecast.points} probes: L(D) = E + A * D^-alpha, E = {law.e:.3f}, alpha = {law.alpha:.2f}",
        f"annealed val loss {where}: {format_band(band)}",
    ]
    if target is not None:
        lines.append(f"val loss {target:g} reached: {_reach_line(forecast, results, target)}")
    for task, metric in headline_scores(results).items():
        try:
            score = fit(results, f"{task}/{metric}")
        except NoForecast as why:
            lines.append(f"{task} {metric}: {why}")
            continue
        where, band = _at_end(score, planned)
        lines.append(f"{task} {metric} if annealed {where}: {format_band(band)}")
    return lines


def _cell(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table_lines(results: list[ProbeResult]) -> list[str]:
    """The probes as a Markdown table: step, tokens, stable and annealed loss, gap, downstream scores."""
    tasks = headline_scores(results)
    head = ["step", "tokens", "stable-phase val loss", "annealed val loss", "gap"]
    head += [f"{task} {metric}" for task, metric in tasks.items()]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        gap = None if r.stable_val_loss is None else r.stable_val_loss - r.val_loss
        cells = [
            str(r.step),
            format_tokens(r.tokens),
            _cell(r.stable_val_loss),
            _cell(r.val_loss),
            _cell(gap),
        ]
        cells += [_cell(r.downstream.get(f"{task}/{metric}")) for task, metric in tasks.items()]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_table(run_dir: str | os.PathLike, target: float | None = None) -> Path:
    """Write `RUN_DIR/anneal/table.md` (atomically): the probes' table and the forecast's lines."""
    results = read_results(Path(run_dir))
    path = Path(run_dir) / ANNEAL_DIR / TABLE
    text = [f"# Anneal probes of {Path(run_dir).resolve().name}", "", *table_lines(results), ""]
    text += [f"- {line}" for line in forecast_lines(run_dir, target)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, ("\n".join(text) + "\n").encode())
    return path


def status_lines(run_dir: str | os.PathLike) -> list[str]:
    """`pretrain status`'s lines on probes: the newest one and the forecast (none without `anneal/`)."""
    if not (Path(run_dir) / ANNEAL_DIR).is_dir():
        return []
    results = read_results(Path(run_dir))
    if not results:
        return ["anneal      no finished probe yet"]
    newest = results[-1]
    stable = "" if newest.stable_val_loss is None else f" (stable phase {newest.stable_val_loss:.4f})"
    lines = [
        f"anneal      newest probe: step {newest.step}, {format_tokens(newest.tokens)} tokens, "
        f"annealed val loss {newest.val_loss:.4f}{stable}"
    ]
    return lines + [INDENT + line for line in forecast_lines(run_dir)]


def anneal_view(run_dir: str | os.PathLike) -> AnnealView | None:
    """The probes' points and the loss forecast's curve for `pretrain plot` (None: no probe)."""
    results = read_results(Path(run_dir))
    if not results:
        return None
    tokens, losses = _points(results, None)
    try:
        forecast: Forecast | None = fit(results, run=RunDir(run_dir))
    except NoForecast as why:
        print(f"{run_dir}: anneal forecast not drawn: {why}")
        forecast = None
    curve = None
    if forecast is not None:
        end = max(planned_tokens(RunDir(run_dir)) or 0, 2 * tokens.max())
        grid = np.geomspace(tokens.min() / 2, end, 100)
        curve = Curve(grid, *forecast.curve(grid), level=forecast.level)
    downstream = {f"{t}/{m}": _points(results, f"{t}/{m}") for t, m in headline_scores(results).items()}
    return AnnealView(tokens, losses, curve, downstream)
