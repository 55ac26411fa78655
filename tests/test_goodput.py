"""Goodput accounting (`pretrain.run_dir.goodput`, `GoodputRecorder`) and profiling on request."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import PRETRAIN, STEPS, logged_steps, recipe, run, train_losses

from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.files import write_json_atomic
from pretrain.run_dir import RunDir
from pretrain.run_dir.goodput import ELAPSED, KIND, PHASES, read_goodput, record_path
from pretrain.slurm.status import status
from pretrain.train.callbacks.goodput import process_start_time
from pretrain.train.callbacks.profiler import parse_steps

# ---- the record and its accounting ------------------------------------------------------------


def launch_record(launch: int, start: float, steps: tuple[int, int], step_s: float, ended: bool) -> dict:
    first, last = steps
    phases = dict.fromkeys(PHASES, 1.0) | {"steps": step_s}
    return {
        "kind": KIND,
        "launch": launch,
        "process_start": start,
        "updated": start + sum(phases.values()),
        "ended": ended,
        "start_step": first,
        "last_step": last,
        "phases": phases,
        "marks": [[first, 0.0, 1.0], [last, step_s, 1.0 + step_s]],
        "rollbacks": [],
    }


def write_launches(run_dir: Path) -> None:
    """Launch 0: steps 0->8 in 80 s, killed; launch 1 resumed at 4 (so 4 steps, 40 s lost), ended."""
    write_json_atomic_mkdir(record_path(run_dir, 0), launch_record(0, 1000.0, (0, 8), 80.0, ended=False))
    write_json_atomic_mkdir(record_path(run_dir, 1), launch_record(1, 1100.0, (4, 12), 80.0, ended=True))


def write_json_atomic_mkdir(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, value)


def test_lost_work_is_the_step_time_past_the_next_launchs_resume_step(tmp_path):
    write_launches(tmp_path)
    report = read_goodput(tmp_path)
    first, second = report.launches
    assert (first.lost_steps, first.lost_seconds) == (4, pytest.approx(40.0))
    assert first.gap_after is None  # killed: the gap is unknown, left out of the sum
    assert second.lost_steps == 0 and second.wall == pytest.approx(85.0)
    assert report.wall == pytest.approx(185.0)  # 1000 -> 1185
    assert report.goodput == pytest.approx((80 - 40 + 80) / 185)
    lines = status(tmp_path)
    assert "lost 4 step(s) 40.0s" in lines and "1 gap(s) unknown" in lines
    assert f"goodput {report.goodput:.1%}" in lines


def test_a_killed_launchs_last_logged_steps_count_from_the_metrics_log(tmp_path):
    write_launches(tmp_path)
    log = tmp_path / "logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    with open(log, "w", newline="") as f:  # steps 9 and 10 logged after the record's last write
        writer = csv.DictWriter(f, ["step", ELAPSED])
        writer.writeheader()
        writer.writerows([{"step": 8, ELAPSED: 91.0}, {"step": 9, ELAPSED: 101.0}])
    first = read_goodput(tmp_path).launches[0]
    assert first.last_step == 10 and first.lost_steps == 6
    assert first.lost_seconds == pytest.approx(40.0 + 20.0)  # ran 20 s past its last write


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"kind": "pretrain-goodput", "launch"',
        b"\xff\xfe garbage",
        b"42",
        b"[]",
        b'{"kind": "pretrain-goodput"}',
    ],
    ids=["empty", "truncated", "garbage", "number", "list", "missing-fields"],
)
def test_a_damaged_goodput_record_is_one_line_and_status_still_works(tmp_path, content):
    write_launches(tmp_path)
    damaged = record_path(tmp_path, 2)
    damaged.write_bytes(content)
    report = read_goodput(tmp_path)
    assert len(report.launches) == 2 and len(report.problems) == 1
    assert report.problems[0].startswith(f"{damaged}: ") and "left out" in report.problems[0]
    assert f"{damaged}: " in status(tmp_path)


def test_a_foreign_file_under_a_record_name_is_never_taken_as_ours(tmp_path):
    write_launches(tmp_path)
    write_json_atomic(record_path(tmp_path, 3), {"launch": 3, "phases": {}})
    write_json_atomic(record_path(tmp_path, 4), launch_record(7, 0.0, (0, 1), 1.0, ended=True))
    report = read_goodput(tmp_path)
    assert [t.launch for t in report.launches] == [0, 1]
    assert "not a goodput record written by `pretrain fit`" in report.problems[0]
    assert "records launch 7, not 4" in report.problems[1]


def test_the_process_start_is_before_this_tests_start():
    assert time.time() - 3 * 3600 < process_start_time() < time.time()


# ---- profiling on request ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["5:3", "a:b", "-1:2", "0:2", "3", ""])
def test_bad_profile_steps_name_the_field(text):
    with pytest.raises(UserError, match=r"profile\.steps"):
        parse_steps(text)


def test_profiling_is_off_by_default_and_creates_no_profiler(tiny_dataset, tmp_path, monkeypatch):
    from pretrain.train.callbacks.profiler import StepProfiler
    from pretrain.train.fit import FitCLI

    def refuse(*args, **kwargs):
        raise AssertionError("a profiler was created")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    cli = FitCLI(["--config", str(recipe(tmp_path, tiny_dataset, tmp_path / "run"))])
    assert not any(isinstance(cb, StepProfiler) for cb in cli.trainer.callbacks)


def test_profile_steps_writes_a_trace_prints_the_top_operations_and_times_the_launch(
    tiny_dataset, tmp_path, capsys
):
    run_dir = tmp_path / "profiled"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=3)
    started = time.time()
    assert main(["fit", "--config", str(config), "--profile.steps", "2:3"]) == 0
    ended = time.time()
    err = capsys.readouterr().err
    assert "profile: top 8 operations by self CPU time, steps 2-3:" in err
    trace = run_dir / "profile" / "trace-steps-2-3.json"
    assert json.loads(trace.read_text())["traceEvents"]
    # The record: every phase of this in-process launch, summing to its wall time.
    record = json.loads(record_path(run_dir, 0).read_text())
    assert record["ended"] and record["start_step"] == 0 and record["last_step"] == 3
    phases = record["phases"]
    assert phases["steps"] > 0 and phases["validation"] > 0 and phases["startup"] > ended - started - 60
    assert sum(phases.values()) == pytest.approx(record["updated"] - record["process_start"], abs=0.05)
    logged = RunDir(run_dir).read_logs().series
    assert logged["goodput/run"].values[-1] > 0 and len(logged[ELAPSED].values) == 3  # one per step
    assert main(["fit", "--config", str(config), "--profile.steps", "5:3"]) == 2
    assert "profile.steps '5:3': need 1 <= A <= B" in capsys.readouterr().err


# ---- a run with kills and a requeue-like stop -------------------------------------------------


def signal_after(args: list[str], run_dir: Path, steps: int, signum: int) -> float:
    """Start `pretrain ARGS`, send `signum` once the run has logged `steps` steps; returns the
    launch's wall seconds (spawn to exit)."""
    started = time.time()
    process = subprocess.Popen([PRETRAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while logged_steps(run_dir) < steps:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=120)
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 4  # USR1: checkpointed and stopped
    assert process.returncode == expected, err.decode()[-2000:]
    return time.time() - started


def logged_in(run_dir: Path, version: int) -> list[int]:
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        return sorted({int(row["step"]) + 1 for row in csv.DictReader(f) if row.get("train/loss")})


def elapsed_in(run_dir: Path, version: int) -> dict[int, float]:
    """Optimizer step -> seconds from the process start, as launch `version` logged them."""
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        return {int(row["step"]) + 1: float(row[ELAPSED]) for row in csv.DictReader(f) if row.get(ELAPSED)}


@pytest.mark.slow
def test_two_kills_and_a_requeue_report_the_steps_redone_and_phases_sum_to_the_wall_time(
    tiny_dataset, tmp_path
):
    run_dir = tmp_path / "interrupted"
    config = [
        "fit",
        "--config",
        str(recipe(tmp_path, tiny_dataset, run_dir, checkpoint={"every_n_steps": 3})),
    ]
    signal_after(config, run_dir, 5, signal.SIGKILL)  # past the checkpoint of step 3
    signal_after(config, run_dir, 8, signal.SIGKILL)  # past the checkpoint of step 6
    stopped_wall = signal_after(config, run_dir, 10, signal.SIGUSR1)  # like a requeue: saves, then stops
    started = time.time()
    run(config)
    last_wall = time.time() - started
    assert sorted(train_losses(run_dir)) == list(range(STEPS))

    report = read_goodput(run_dir)
    launches = report.launches
    assert [t.launch for t in launches] == [0, 1, 2, 3]
    resumed_at = [t.start_step for t in launches]
    assert (
        resumed_at[:3] == [0, 3, 6] and resumed_at[3] == launches[2].last_step
    )  # USR1 saved where it stopped
    for i in (0, 1):  # the steps actually redone: logged by launch i past where launch i+1 resumed
        redone = [s for s in logged_in(run_dir, i) if s > resumed_at[i + 1]]
        assert launches[i].lost_steps == len(redone) > 0
        # consistent with the wall clock the log holds: within the span from the resume step to the
        # last step launch i logged (which also holds any validation there), and not far below it
        elapsed = elapsed_in(run_dir, i)
        span = elapsed[max(redone)] - elapsed[resumed_at[i + 1]]
        assert 0.3 * span < launches[i].lost_seconds <= span + 0.05
    assert launches[2].lost_steps == 0 and launches[3].lost_steps == 0
    assert report.lost_steps == launches[0].lost_steps + launches[1].lost_steps
    # Phases sum to each launch's wall time from its process start to its last write (to 0.05 s), and
    # that is the wall time measured here (spawn to exit) less the process's exit after the last write
    # (interpreter and torch shut-down, not counted): tolerance 3 s.
    for launch, wall in ((launches[2], stopped_wall), (launches[3], last_wall)):
        assert launch.ended and sum(launch.phases.values()) == pytest.approx(launch.wall, abs=0.05)
        assert 0 <= wall - launch.wall < 3.0
    text = subprocess.run(
        [PRETRAIN, "status", str(run_dir)], capture_output=True, text=True, check=True
    ).stdout
    assert f"lost {report.lost_steps} step(s)" in text and f"goodput {report.goodput:.1%}" in text


# ---- where the time went, drawn ---------------------------------------------------------------


def test_plot_time_draws_a_stacked_bar_per_launch(tmp_path):
    from pretrain.plot import plot_time, time_segments

    run_dir = tmp_path / "run"
    write_launches(run_dir)
    fig = plot_time([run_dir], tmp_path / "time.png")
    assert (tmp_path / "time.png").stat().st_size > 0
    heights = {patch.get_gid(): patch.get_height() for patch in fig.axes[0].patches}
    assert heights["run:0:lost steps"] == pytest.approx(40.0) and heights[
        "run:0:useful steps"
    ] == pytest.approx(40.0)
    first = read_goodput(run_dir).launches[0]
    assert sum(time_segments(first).values()) == pytest.approx(first.wall)
    assert "goodput" in fig.axes[0].get_title()
    with pytest.raises(UserError, match="no goodput/launch-<k>.json records"):
        plot_time([tmp_path / "empty"], tmp_path / "none.png")


def test_a_record_that_cannot_be_written_is_one_line_once_and_training_goes_on(tmp_path, capsys):
    from types import SimpleNamespace

    from pretrain.train.callbacks.goodput import GoodputRecorder

    (tmp_path / "goodput").write_text("a file where the folder belongs")
    recorder = GoodputRecorder(tmp_path, 0)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    recorder.write(trainer, force=True)  # type: ignore[arg-type]
    recorder.write(trainer, force=True)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.count(f"goodput: cannot write {tmp_path / 'goodput' / 'launch-0.json'}") == 1


def test_a_rollback_records_the_steps_past_its_checkpoint_and_keeps_the_marks_rising(tmp_path):
    from types import SimpleNamespace

    from pretrain.train.callbacks.goodput import GoodputRecorder

    recorder = GoodputRecorder(tmp_path, 0)
    trainer = SimpleNamespace(global_step=0, callbacks=[], is_global_zero=False, loggers=[])

    def train(first: int, last: int) -> None:
        trainer.global_step = first
        recorder.on_train_start(trainer, None)  # type: ignore[arg-type]
        for step in range(first + 1, last + 1):
            time.sleep(0.01)
            trainer.global_step = step
            recorder.on_optimizer_step(trainer, None, step)  # type: ignore[arg-type]

    train(0, 8)
    before = recorder.phases["steps"]
    train(4, 6)  # rolled back to the checkpoint of step 4
    [rollback] = recorder.rollbacks
    assert (rollback["from_step"], rollback["to_step"]) == (8, 4)
    assert 0 < rollback["seconds"] < before  # the time of steps 5-8
    steps = [mark[0] for mark in recorder.record()["marks"]]
    assert steps == sorted(steps) and steps[-1] == 6
