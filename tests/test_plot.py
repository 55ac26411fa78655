"""`pretrain plot`: reading Lightning CSV logs across resumes, and what the figure draws."""

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.commands import plot as plot_command
from pretrain.errors import UserError
from pretrain.eval.metrics import headline_metric
from pretrain.plot import format_tokens, plot_runs, smooth, summarize
from pretrain.run_dir import RunDir

TOKENS_PER_STEP = 4096


def write_metrics(path: Path, rows: list[dict], partial_line: str = "") -> None:
    """Write rows the way Lightning's CSVLogger does (sorted header, empty cells), plus an unfinished line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({key for row in rows for key in row} | {"step"})
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        file.write(partial_line)


def train_row(step: int, loss: float, tokens_per_step: int = TOKENS_PER_STEP) -> dict:
    return {
        "step": step,
        "train/loss": loss,
        "train/lr": 1e-4 * step,
        "train/tokens_seen": step * tokens_per_step,
        "train/grad_norm": 1.0,
    }


def val_row(step: int, old: float, new: float) -> dict:
    return {"step": step, "val/old/loss": old, "val/old/ppl": np.exp(old), "val/new/loss": new}


@pytest.fixture
def resumed_run(tmp_path: Path) -> Path:
    """Version 0 logs steps 1-10 (val at 5 and 10); version 1 resumes at step 8, its last line cut mid-way."""
    run = tmp_path / "run-a"
    v0 = [train_row(step, 10.0 - step * 0.1) for step in range(1, 11)]
    v0 += [val_row(5, 9.5, 9.7), val_row(10, 9.0, 9.2)]
    write_metrics(run / "logs/version_0/metrics.csv", v0)
    v1 = [train_row(step, 5.0 - step * 0.1) for step in range(8, 14)] + [val_row(10, 4.5, 4.7)]
    write_metrics(run / "logs/version_1/metrics.csv", v1, partial_line="14,3.6,")
    return run


@pytest.fixture
def other_run(tmp_path: Path) -> Path:
    run = tmp_path / "run-b"
    rows = [train_row(step, 8.0 - step * 0.2, tokens_per_step=2048) for step in range(1, 7)] + [
        val_row(6, 7.0, 7.5)
    ]
    write_metrics(run / "logs/version_0/metrics.csv", rows)
    return run


def downstream_row(step: int, hellaswag: float, next_line: float) -> dict:
    """A downstream evaluation's row, logged alone (its tokens come from the train row of its step)."""
    return {
        "step": step,
        "downstream/hellaswag/acc": hellaswag - 0.05,
        "downstream/hellaswag/acc_norm": hellaswag,
        "downstream/pystdlib_next_line/acc": next_line,
    }


@pytest.fixture
def downstream_run(tmp_path: Path) -> Path:
    """Version 0 evaluates at steps 4 and 8; version 1 resumes at step 6 and evaluates at 8 again, then 12."""
    run = tmp_path / "run-d"
    v0 = [train_row(step, 3.0) for step in range(1, 10)] + [downstream_row(4, 0.30, 0.10)]
    v0 += [downstream_row(8, 0.35, 0.20)]
    write_metrics(run / "logs/version_0/metrics.csv", v0)
    v1 = [{"step": 6, "train/start_step": 6}] + [train_row(step, 2.0) for step in range(6, 14)]
    v1 += [downstream_row(8, 0.33, 0.15), downstream_row(12, 0.40, 0.25)]
    write_metrics(run / "logs/version_1/metrics.csv", v1)
    return run


def lines_by_gid(fig) -> dict[str, list]:
    lines: dict[str, list] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            lines.setdefault(line.get_gid(), []).append(line)
    return lines


def test_later_version_wins_on_overlapping_steps(resumed_run):
    run = RunDir(resumed_run).read_logs()
    loss = run.series["train/loss"]
    assert loss.steps.tolist() == list(range(1, 14))  # the cut-off step-14 line is skipped
    expected = [10.0 - s * 0.1 for s in range(1, 8)] + [5.0 - s * 0.1 for s in range(8, 14)]
    np.testing.assert_allclose(loss.values, expected)
    np.testing.assert_allclose(loss.tokens, loss.steps * TOKENS_PER_STEP)
    old = run.series["val/old/loss"]
    assert old.steps.tolist() == [5, 10]
    np.testing.assert_allclose(old.values, [9.5, 4.5])  # step 10 re-done after the resume
    assert run.resumes == [(8, 8 * TOKENS_PER_STEP)]
    assert run.name == "run-a"
    assert run.val_sources() == ["new", "old"]


def test_val_tokens_come_from_train_rows_by_step(tmp_path):
    rows = [train_row(step, 3.0) for step in (4, 6, 8)] + [val_row(step, 2.0, 2.1) for step in (2, 6, 7, 11)]
    write_metrics(tmp_path / "r/logs/version_0/metrics.csv", rows)
    val = RunDir(tmp_path / "r").read_logs().series["val/old/loss"]
    # step 6 exact; 7 interpolated; 2 and 11 extrapolated linearly from the nearest train rows
    np.testing.assert_allclose(val.tokens, np.array([2, 6, 7, 11]) * TOKENS_PER_STEP)


def test_one_train_row_extrapolates_from_step_zero(tmp_path):
    write_metrics(tmp_path / "r/logs/version_0/metrics.csv", [train_row(10, 3.0), val_row(5, 2.0, 2.1)])
    assert RunDir(tmp_path / "r").read_logs().series["val/old/loss"].tokens.tolist() == [5 * TOKENS_PER_STEP]


def test_versions_are_ordered_numerically(tmp_path):
    run = tmp_path / "r"
    write_metrics(run / "logs/version_9/metrics.csv", [train_row(step, 3.0) for step in range(1, 6)])
    write_metrics(run / "logs/version_10/metrics.csv", [train_row(step, 2.0) for step in range(4, 8)])
    loss = RunDir(run).read_logs().series["train/loss"]
    assert loss.steps.tolist() == list(range(1, 8))
    assert loss.values.tolist() == [3.0] * 3 + [2.0] * 4


def test_live_run_with_an_unwritten_new_version_still_loads(tmp_path):
    run = tmp_path / "r"
    write_metrics(run / "logs/version_0/metrics.csv", [train_row(step, 3.0) for step in range(1, 4)])
    (run / "logs/version_1").mkdir()
    (run / "logs/version_1/metrics.csv").write_text("step,train/lo")  # header being written
    loaded = RunDir(run).read_logs()
    assert loaded.series["train/loss"].steps.tolist() == [1, 2, 3]
    assert loaded.resumes == []


def test_plot_draws_exactly_the_logged_values(resumed_run, other_run, tmp_path):
    out = tmp_path / "plots/loss.png"
    fig = plot_runs([resumed_run, other_run], out, smoothing=0.5)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000

    lines = lines_by_gid(fig)
    loss_ax, lr_ax = fig.axes
    run = RunDir(resumed_run).read_logs()
    (raw,) = lines["run-a:train/loss:raw"]
    assert raw.axes is loss_ax
    np.testing.assert_allclose(raw.get_xdata(), np.arange(1, 14) * TOKENS_PER_STEP)
    np.testing.assert_allclose(raw.get_ydata(), run.series["train/loss"].values)
    (smoothed,) = lines["run-a:train/loss:smooth"]
    np.testing.assert_allclose(smoothed.get_ydata(), smooth(run.series["train/loss"].values, 0.5))

    (old,) = lines["run-a:val/old/loss"]
    np.testing.assert_allclose(old.get_xdata(), [5 * TOKENS_PER_STEP, 10 * TOKENS_PER_STEP])
    np.testing.assert_allclose(old.get_ydata(), [9.5, 4.5])
    (new_b,) = lines["run-b:val/new/loss"]
    np.testing.assert_allclose(new_b.get_xdata(), [6 * 2048])
    np.testing.assert_allclose(new_b.get_ydata(), [7.5])
    assert old.get_linestyle() != lines["run-a:val/new/loss"][0].get_linestyle()
    assert old.get_color() == raw.get_color() != new_b.get_color()

    (lr,) = lines["run-a:train/lr"]
    assert lr.axes is lr_ax
    np.testing.assert_allclose(lr.get_ydata(), 1e-4 * np.arange(1, 14))

    resume_marks = lines["run-a:resume"]
    assert {mark.axes for mark in resume_marks} == {loss_ax, lr_ax}
    assert all(list(mark.get_xdata()) == [8 * TOKENS_PER_STEP] * 2 for mark in resume_marks)
    assert "run-b:resume" not in lines
    assert lr_ax.get_xlabel() == "tokens seen"
    legend = [text.get_text() for text in loss_ax.get_legend().get_texts()]
    assert legend == [
        f"{run} {curve}"
        for run in ("run-a", "run-b")
        for curve in ("train (EMA over ~2 points)", "val/new", "val/old")
    ]


def test_runs_without_tokens_seen_are_plotted_against_steps(tmp_path):
    rows = [{"step": step, "train/loss": 2.0} for step in (1, 2, 3)]
    write_metrics(tmp_path / "r/logs/version_0/metrics.csv", rows)
    fig = plot_runs([tmp_path / "r"], tmp_path / "loss.png")
    assert lines_by_gid(fig)["r:train/loss:raw"][0].get_xdata().tolist() == [1, 2, 3]
    assert fig.axes[1].get_xlabel() == "step"


def test_smooth_is_a_bias_corrected_ema():
    np.testing.assert_allclose(smooth([4.0, 4.0, 4.0], 0.9), [4.0, 4.0, 4.0])  # no pull toward 0
    np.testing.assert_allclose(smooth([1.0, 3.0], 0.0), [1.0, 3.0])
    # weight 0.5: averages 0.5 and 0.5 * 0.5 + 0.5 * 3 = 1.75, corrected by 1 - 0.5 and 1 - 0.25
    np.testing.assert_allclose(smooth([1.0, 3.0], 0.5), [1.0, 1.75 / 0.75])
    np.testing.assert_allclose(smooth([np.nan, 2.0, np.inf, 2.0], 0.9), [np.nan, 2.0, 2.0, 2.0])
    with pytest.raises(UserError, match="smoothing"):
        smooth([1.0], 1.0)


def test_format_tokens():
    assert [format_tokens(n) for n in (0, 512, 1500, 39_321_600, 2e9, 1.1e12)] == [
        "0", "512", "1.5K", "39.32M", "2B", "1.1T",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda run: run.mkdir(),  # empty directory
        lambda run: (run / "logs").mkdir(parents=True),  # no versions
        lambda run: write_metrics(run / "logs/version_0/metrics.csv", []),  # header only
        lambda run: None,  # missing directory
    ],
    ids=["empty-dir", "no-versions", "header-only", "missing"],
)
def test_unusable_run_dirs_raise_user_error_naming_the_path(tmp_path, make):
    run = tmp_path / "bad-run"
    make(run)
    with pytest.raises(UserError, match="bad-run"):
        RunDir(run).read_logs()


def test_header_only_csv_error_names_the_file(tmp_path):
    write_metrics(tmp_path / "r/logs/version_0/metrics.csv", [])
    with pytest.raises(UserError, match=r"version_0[/\\]metrics\.csv"):
        plot_runs([tmp_path / "r"], tmp_path / "loss.png")


def test_plot_subcommand_writes_png_and_prints_a_summary_per_run(resumed_run, other_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    plot_command.add_arguments(parser)
    out = tmp_path / "curves.png"
    args = parser.parse_args([str(resumed_run), str(other_run), "-o", str(out)])
    assert args.smoothing is None  # adapts to each run's number of points
    assert plot_command.run(args) == 0
    assert out.stat().st_size > 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {out}"
    assert (
        printed[1]
        == "run-a: step 14, 53.25K tokens, train loss 3.7000, val/new loss 4.7000, val/old loss 4.5000"
    )
    assert (
        printed[2]
        == "run-b: step 7, 12.29K tokens, train loss 6.8000, val/new loss 7.5000, val/old loss 7.0000"
    )


def test_module_import_stays_light():
    code = "import sys, pretrain.plot; print(sorted({'matplotlib', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_default_smoothing_adapts_to_the_number_of_points_and_the_legend_says_so(tmp_path):
    from pretrain.plot import auto_smoothing

    assert (
        auto_smoothing(18) == 0
        and auto_smoothing(20) == 0
        and auto_smoothing(40) == 0.5
        and abs(auto_smoothing(1000) - 0.98) < 1e-12
    )
    for points, label in ((18, "r train (unsmoothed)"), (1000, "r train (EMA over ~50 points)")):
        rows = [{"step": step, "train/loss": 2.0 + step % 3} for step in range(points)]
        write_metrics(tmp_path / f"r{points}/r/logs/version_0/metrics.csv", rows)
        fig = plot_runs([tmp_path / f"r{points}/r"], tmp_path / "loss.png")
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [label]


def test_the_resume_mark_sits_where_the_launch_resumed(tmp_path):
    """With log_every_n_steps 10 a launch resumed at step 95 first logs a loss at step 99: the mark
    (and the cut of the earlier launch) belong at 95, which the launch logs as train/start_step."""
    run = tmp_path / "r"
    write_metrics(run / "logs/version_0/metrics.csv", [train_row(s, 5.0) for s in range(9, 100, 10)])
    later = [{"step": 95, "train/start_step": 95}] + [train_row(s, 4.0) for s in range(99, 150, 10)]
    write_metrics(run / "logs/version_1/metrics.csv", later)
    loaded = RunDir(run).read_logs()
    assert [step for step, _ in loaded.resumes] == [95]
    assert loaded.series["train/loss"].steps.tolist() == [*range(9, 95, 10), *range(99, 150, 10)]


def test_downstream_series_are_merged_across_resumes(downstream_run):
    downstream = RunDir(downstream_run).read_logs().downstream()
    assert {task: list(metrics) for task, metrics in downstream.items()} == {
        "hellaswag": ["acc", "acc_norm"],
        "pystdlib_next_line": ["acc"],
    }
    score = downstream["hellaswag"]["acc_norm"]
    assert score.steps.tolist() == [4, 8, 12]  # step 8 once: the resumed launch's evaluation
    np.testing.assert_allclose(score.values, [0.30, 0.33, 0.40])
    np.testing.assert_allclose(score.tokens, score.steps * TOKENS_PER_STEP)
    np.testing.assert_allclose(downstream["pystdlib_next_line"]["acc"].values, [0.10, 0.15, 0.25])


def test_plot_draws_one_panel_per_downstream_task(downstream_run, other_run, tmp_path):
    fig = plot_runs([downstream_run, other_run], tmp_path / "loss.png")
    loss_ax, lr_ax, *task_axes = fig.axes
    assert [(ax.get_title(), ax.get_ylabel()) for ax in task_axes] == [
        ("hellaswag", "acc_norm"),  # acc_norm before acc
        ("pystdlib_next_line", "acc"),
    ]
    assert all(ax.get_xlabel() == "tokens seen" for ax in task_axes)
    lines = lines_by_gid(fig)
    (hellaswag,) = lines["run-d:downstream/hellaswag/acc_norm"]
    assert hellaswag.axes is task_axes[0] and hellaswag.get_marker() == "o"
    np.testing.assert_allclose(hellaswag.get_xdata(), np.array([4, 8, 12]) * TOKENS_PER_STEP)
    np.testing.assert_allclose(hellaswag.get_ydata(), [0.30, 0.33, 0.40])
    assert hellaswag.get_color() == lines["run-d:train/loss:raw"][0].get_color()
    assert "run-d:downstream/hellaswag/acc" not in lines
    assert not any(gid.startswith("run-b:downstream/") for gid in lines)  # run-b logged none
    assert {mark.axes for mark in lines["run-d:resume"]} == {loss_ax, lr_ax, *task_axes}


def test_runs_without_downstream_scores_get_the_same_figure_as_before(resumed_run, other_run, tmp_path):
    fig = plot_runs([resumed_run, other_run], tmp_path / "loss.png")
    assert len(fig.axes) == 2 and fig.subfigs == []
    assert tuple(fig.get_size_inches()) == (11, 7)


def test_eight_downstream_tasks_fill_a_three_by_three_grid(tmp_path):
    tasks = [f"task{i}" for i in range(8)]
    rows = [train_row(step, 3.0) for step in (1, 2)]
    rows += [{"step": 2} | {f"downstream/{task}/acc": 0.5 for task in tasks}]
    write_metrics(tmp_path / "r/logs/version_0/metrics.csv", rows)
    fig = plot_runs([tmp_path / "r"], tmp_path / "loss.png")
    task_axes = fig.axes[2:]
    assert [ax.get_title() for ax in task_axes] == tasks
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in task_axes} == {(3, 3)}
    assert tuple(fig.get_size_inches()) == (11 + 3 * 3.5, 9)


def test_headline_metric_prefers_acc_norm_then_acc_then_the_first_by_name():
    assert headline_metric("mytask", {"f1", "acc", "acc_norm"}) == "acc_norm"
    assert headline_metric("mytask", {"f1", "acc"}) == "acc"
    assert headline_metric("mytask", {"f1", "exact_match"}) == "exact_match"
    assert headline_metric("winogrande", {"acc", "acc_norm"}) == "acc"  # TinyLlama's suite says acc


def test_summary_ends_with_the_latest_downstream_scores(downstream_run):
    assert summarize(RunDir(downstream_run).read_logs()) == (
        "run-d: step 14, 53.25K tokens, train loss 2.0000, "
        "downstream/hellaswag acc_norm 0.4000, downstream/pystdlib_next_line acc 0.2500"
    )


def test_a_model_at_chance_is_drawn_with_its_chance_level_and_standard_errors(tmp_path):
    """Scores of 0.300-0.315 with a standard error of 0.02 over a chance level of 0.25: the panel
    keeps 0.25 inside its y-axis and draws the error bars, so noise does not read as a trend."""
    rows = [train_row(step, 3.0) for step in range(1, 13)]
    for step, score in ((4, 0.300), (8, 0.315), (12, 0.305)):
        rows.append(
            {
                "step": step,
                "downstream/next/acc": score,
                "downstream/next/acc_stderr": 0.02,
                "downstream/next/chance": 0.25,
                "downstream/gen/exact_match": 0.01,
                "downstream/gen/exact_match_stderr": 0.01,
            }
        )
    write_metrics(tmp_path / "r/logs/version_0/metrics.csv", rows)
    log = RunDir(tmp_path / "r").read_logs()
    assert {task: list(metrics) for task, metrics in log.downstream().items()} == {
        "gen": ["exact_match"],
        "next": ["acc"],
    }  # standard errors and chance levels are not scores
    fig = plot_runs([log], tmp_path / "loss.png")
    gen_ax, next_ax = fig.axes[2:]
    lines = lines_by_gid(fig)
    (chance,) = lines["r:downstream/next/chance"]
    assert chance.axes is next_ax and list(chance.get_ydata()) == [0.25, 0.25]
    low, high = next_ax.get_ylim()
    assert low < 0.25 and high > 0.315
    (bars,) = [c for c in next_ax.collections if c.get_gid() == "r:downstream/next/acc_stderr"]
    np.testing.assert_allclose(
        [segment[:, 1] for segment in bars.get_segments()],
        [[0.28, 0.32], [0.295, 0.335], [0.285, 0.325]],
    )
    assert [text.get_text() for text in next_ax.get_legend().get_texts()] == ["chance"]
    assert "r:downstream/gen/chance" not in lines and gen_ax.get_legend() is None


def test_incidents_are_drawn_and_summarized(tmp_path):
    """A run that rolled back: its bad steps shaded, the decision marked, the skipped range barred."""
    run = tmp_path / "healed"
    write_metrics(run / "logs" / "version_0" / "metrics.csv", [train_row(step, 3.0) for step in range(30)])
    incident = {"action": "rollback", "steps": [20, 23], "skip": [256, 448], "skip_steps": [16, 28]}
    (run / "incidents.jsonl").write_text(
        json.dumps(incident) + "\n" + json.dumps(incident | {"action": "stop"})
    )
    log = RunDir(run).read_logs()
    fig = plot_runs([log], tmp_path / "plot.png")
    gids = [artist.get_gid() for ax in fig.axes for artist in ax.get_children()]
    assert gids.count("healed:incident") == 4 and gids.count("healed:incident:skipped") == 1
    assert gids.count("healed:incident:rollback") == 1 and gids.count("healed:incident:stop") == 1
    assert summarize(log).endswith("1 rollback(s), 1 divergence stop(s)")
