"""Where people look at anneal probes: table.md, the forecast lines, `pretrain status` and `pretrain plot`,
on run directories with fabricated probe records (no training)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_plot import lines_by_gid, train_row, write_metrics

from pretrain.anneal.forecast import NOISE_FLOOR
from pretrain.anneal.report import (
    anneal_view,
    fit,
    forecast_lines,
    status_lines,
    validation_noise,
    write_table,
)
from pretrain.anneal.result import ProbeResult, probe_dir, write_result
from pretrain.commands import plot as plot_command
from pretrain.errors import UserError
from pretrain.plot import plot_runs
from pretrain.run_dir import RunDir
from pretrain.slurm.status import status

BATCH = 4096
MAX_STEPS = 2000


def annealed(tokens: float) -> float:
    return 2.0 + 40.0 * tokens**-0.3


def probe(step: int, downstream: bool = True) -> ProbeResult:
    parent, anneal = step * BATCH, step * BATCH // 5
    loss = annealed(parent + anneal)
    scores = {"hellaswag/acc_norm": 0.9 - loss / 5, "hellaswag/acc_norm_stderr": 0.01} if downstream else {}
    return ProbeResult(step, f"id-{step}", parent, anneal, loss, loss + 0.3, {"pystdlib": loss}, scores)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run with logs, a launch config planning MAX_STEPS steps, and five probes."""
    run = tmp_path / "run"
    write_metrics(run / "logs/version_0/metrics.csv", [train_row(s, 4.0, BATCH) for s in range(1, 1001, 50)])
    config = {"trainer": {"max_steps": MAX_STEPS}, "data": {"global_batch_tokens": BATCH}}
    (run / "logs/version_0/config.yaml").write_text(yaml.safe_dump(config))
    for step in (200, 400, 600, 800, 1000):
        write_result(run, probe(step))
    return run


def test_table_lists_every_probe_and_the_forecast_with_its_band(run: Path) -> None:
    path = write_table(run)
    text = path.read_text()
    assert path == run / "anneal" / "table.md"
    assert "| step | tokens | stable-phase val loss | annealed val loss | gap | hellaswag acc_norm |" in text
    assert (
        f"| 1000 | 4.915M | {annealed(1000 * BATCH * 1.2) + 0.3:.4f} | {annealed(1000 * BATCH * 1.2):.4f} | 0.3000 |"
        in text
    )
    assert "annealed val loss at the planned end (8.192M tokens): " in text
    assert text.count("90% band") == 2  # the loss and hellaswag's acc_norm, never a bare number
    assert [p.name for p in path.parent.iterdir() if p.is_file()] == ["table.md"]  # no temporary left


def test_forecast_predicts_the_planned_end_within_its_band(run: Path) -> None:
    line = forecast_lines(run)[1]
    value, band = line.split(": ")[1].split(" (90% band ")
    low, high = (float(x) for x in band.rstrip(")").split("-"))
    truth = annealed(MAX_STEPS * BATCH)
    assert abs(float(value) - truth) < 0.005 and low <= truth <= high


def test_target_reached_already_later_or_never(run: Path) -> None:
    reached = annealed(1000 * BATCH * 1.2)
    assert "already reached: the probe at step 1000" in forecast_lines(run, reached + 1e-3)[2]
    later = forecast_lines(run, annealed(2 * MAX_STEPS * BATCH))[2]
    assert later.startswith("val loss") and " tokens (90% band " in later
    assert "not reached: the fitted floor E = 2.000 is above it" in forecast_lines(run, 1.5)[2]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--target"):
            forecast_lines(run, bad)


def test_two_probes_say_that_no_forecast_is_made(tmp_path: Path) -> None:
    for step in (100, 200):
        write_result(tmp_path, probe(step, downstream=False))
    assert forecast_lines(tmp_path) == [
        "forecast: 2 distinct token count(s) among 2 point(s): a forecast needs at least 3"
    ]


@pytest.mark.parametrize("damage", [b"", b"\xff\xfe garbage", b"42", b'{"step": 1200}'])
def test_damaged_or_foreign_records_are_named_and_left_out(run: Path, damage: bytes, capsys) -> None:
    damaged = probe_dir(run, 1200) / "probe.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(damage)
    lines = status_lines(run)
    assert lines[0].startswith("anneal      newest probe: step 1000, 4.915M tokens, annealed val loss ")
    assert "forecast from 5 probes" in lines[1]
    assert str(damaged) in capsys.readouterr().err


def test_status_shows_the_newest_probe_and_the_forecast(run: Path, tmp_path: Path) -> None:
    report = status(run)
    assert "anneal      newest probe: step 1000" in report
    assert "            annealed val loss at the planned end (8.192M tokens): " in report
    (tmp_path / "plain").mkdir()
    assert "anneal" not in status(tmp_path / "plain")  # no anneal/ folder: no line


@pytest.mark.slow  # two matplotlib figures: ~3 s
def test_plot_draws_probes_and_the_forecast_band(run: Path, tmp_path: Path) -> None:
    view = anneal_view(run)
    assert view is not None and view.loss_curve is not None
    fig = plot_runs([run], tmp_path / "loss.png", anneal=[view])
    lines = lines_by_gid(fig)
    points = lines["run:anneal:val_loss"][0]
    assert list(points.get_xdata()) == [p.tokens for p in map(probe, (200, 400, 600, 800, 1000))]
    assert np.allclose(points.get_ydata(), [annealed(t) for t in points.get_xdata()])
    assert "run:anneal:forecast" in lines and "run:anneal:hellaswag" in lines  # a task panel from probes only
    band = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "run:anneal:band"]
    assert len(band) == 1 and "90% band" in band[0].get_label()
    out = tmp_path / "cli.png"
    plot_command.run(argparse.Namespace(run_dirs=[str(run)], out=str(out), smoothing=None, time=None))
    assert out.stat().st_size > 0


def test_anneal_forecast_prints_the_band_and_writes_the_table_running_nothing(run: Path, capsys) -> None:
    from pretrain.cli import main

    assert main(["anneal", str(run), "--forecast", "--target", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "annealed val loss at the planned end (8.192M tokens): " in out and "90% band" in out
    assert "val loss 2.5 reached: " in out
    assert "val loss 2.5 reached: " in (run / "anneal" / "table.md").read_text()
    assert not list(run.glob("anneal/step-*/checkpoints"))  # no probe was run


def test_three_probes_take_their_noise_from_the_parents_validations(tmp_path: Path) -> None:
    """Three probes fit the law exactly; the band's noise comes from the parent's own validation
    losses between the probes (their second differences), so a noisy parent gives a wider band."""
    rng = np.random.default_rng(0)
    bands = {}
    for noise in (0.0, 0.05):
        run = tmp_path / f"noise-{noise}"
        rows = [train_row(s, 4.0, BATCH) for s in range(1, 601, 50)]
        rows += [
            {"step": s - 1, "val/pystdlib/loss": annealed(s * BATCH) + 0.3 + noise * rng.standard_normal()}
            for s in range(200, 601, 20)
        ]
        write_metrics(run / "logs/version_0/metrics.csv", rows)
        config = {"trainer": {"max_steps": MAX_STEPS}, "data": {"global_batch_tokens": BATCH}}
        (run / "logs/version_0/config.yaml").write_text(yaml.safe_dump(config))
        results = [probe(step) for step in (200, 400, 600)]
        noise_seen = validation_noise(RunDir(run), results)
        assert noise_seen == pytest.approx(max(noise, NOISE_FLOOR), rel=0.5)
        band = fit(results, run=RunDir(run)).at(MAX_STEPS * BATCH)
        bands[noise] = band.high - band.low
    assert bands[0.05] > 1.5 * bands[0.0]
