"""The run directory's lease: one `pretrain fit` owns a run; another launch is refused while the
owner lives and takes over only when it is provably gone. The run's other records read back
(requeue.json, slurm/jobs.jsonl, config.yaml) damaged: never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from helpers import PRETRAIN, logged_steps, recipe

from pretrain import lease
from pretrain.errors import UserError
from pretrain.lease import process_start
from pretrain.run_dir import RunDir
from pretrain.slurm.status import status


def write_lease(run: RunDir, **owner) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    run.lease_file.write_text(
        json.dumps({"host": socket.gethostname(), "since": "then", "job_id": None} | owner)
    )


def test_acquire_and_release(tmp_path):
    run = RunDir(tmp_path / "run")
    run.acquire()
    owner = json.loads(run.lease_file.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    run.acquire()  # the owner itself may take it again
    run.release()
    assert not run.lease_file.exists()
    assert not list(run.path.glob(".owner.*"))


def test_a_live_owner_keeps_the_run_and_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = RunDir(tmp_path / "run")
    other = subprocess.Popen(["sleep", "30"])
    try:
        write_lease(run, pid=other.pid, start=process_start(other.pid))
        with pytest.raises(UserError, match=rf"in use by another `pretrain fit` \(host .*, pid {other.pid}"):
            run.acquire()
        write_lease(run, host="gpu-node-7", pid=4242, start="1", job_id="900")  # elsewhere, maybe alive
        with pytest.raises(UserError, match="host gpu-node-7, pid 4242, SLURM job 900"):
            run.acquire()
        assert json.loads(run.lease_file.read_text())["host"] == "gpu-node-7"  # untouched
    finally:
        other.kill()
        other.wait()


def test_a_gone_owner_is_taken_over(tmp_path, monkeypatch, capsys):
    run = RunDir(tmp_path / "run")
    write_lease(run, pid=99999999, start="123")  # no such process on this host
    run.acquire()
    assert (
        "no longer running" in capsys.readouterr().err
        and json.loads(run.lease_file.read_text())["pid"] == os.getpid()
    )
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    write_lease(run, host="gpu-node-3", pid=1, start="5", job_id="77")  # this job, before SLURM requeued it
    run.acquire()
    assert "SLURM requeued job 77" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_launch_on_a_running_run_is_refused(tiny_dataset, tmp_path):
    run_dir = tmp_path / "shared"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=5000)  # runs until stopped
    first = subprocess.Popen([PRETRAIN, "fit", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while logged_steps(run_dir) < 1:
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    second = subprocess.run(
        [PRETRAIN, "fit", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert (
        f"is in use by another `pretrain fit` (host {socket.gethostname()}, pid {first.pid}" in second.stderr
    )
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the owner trains on, untouched
    first.send_signal(signal.SIGTERM)  # stops at the next step with a checkpoint
    assert first.wait(timeout=120) == 4, first.stderr.read()[-2000:]
    first.stderr.close()
    assert not (run_dir / "owner.json").exists()
    assert len(list((run_dir / "logs").glob("version_*"))) == 1  # the refused launch logged nothing
    assert RunDir(run_dir).latest_checkpoint() is not None


# Damaged files: zero bytes, truncated, garbage bytes, valid JSON of the wrong shape.
DAMAGED = {
    "empty": b"",
    "truncated": b'{"host": "gpu-',
    "garbage": b"\xff\xfe\x00\x9c not utf-8",
    "number": b"42",
    "list": b"[]",
    "missing key": b'{"host": "node"}',
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_lease_we_did_not_write_is_refused_by_every_launch_and_left_alone(tmp_path, content):
    """Whether its owner runs cannot be told: taking it over could make two owners."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.lease_file.write_bytes(content)
    for _ in range(2):  # a second launch (or a requeue) is refused the same way: no loop, no owner
        with pytest.raises(
            UserError, match=r"owner.json: not a lease written by `pretrain fit` \(.+\).*delete"
        ):
            run.acquire()
    run.release()
    assert run.lease_file.read_bytes() == content
    assert not list(run.path.glob(".owner.*"))


def test_a_lease_with_wrong_typed_fields_is_not_taken_for_a_gone_owner(tmp_path):
    run = RunDir(tmp_path / "run")
    write_lease(run, pid="12", start=None)  # this host, a pid that no process could have
    with pytest.raises(UserError, match="not a lease written by `pretrain fit` \\(JSON of another shape\\)"):
        run.acquire()


def test_taking_over_never_removes_a_lease_that_replaced_the_stale_one(tmp_path):
    run = RunDir(tmp_path / "run")
    write_lease(run, pid=4242, start="1")
    newer = run.lease_file.read_bytes()
    lease.remove_stale(
        run.lease_file, {"host": "judged", "pid": 1, "start": "1", "job_id": None}, run.path / ".aside"
    )
    assert run.lease_file.read_bytes() == newer and not (run.path / ".aside").exists()


REQUEUE_EVENT = {
    "time": "t",
    "job_id": "7",
    "restart_count": 0,
    "signal": "USR1",
    "step": 30,
    "action": "requeued",
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_requeue_record_is_named_and_kept_aside_at_the_next_signal(tmp_path, capsys, content):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.requeue_file.write_bytes(content)
    assert run.latest_job_id() is None
    _, problem = run.read_requeue_record()
    summary = status(run.path)
    if content == b'{"host": "node"}':  # an object without our fields: nothing to read, nothing wrong
        assert problem is None and "requeue.json" not in summary
    else:
        assert problem and f"{run.requeue_file}: {problem}" in summary
    run.update_requeue_record(job_id="7", events=[*run.requeue_record().get("events", []), REQUEUE_EVENT])
    assert json.loads(run.requeue_file.read_text())["events"] == [REQUEUE_EVENT]
    if problem:
        aside = run.path / "requeue.json.damaged"
        assert aside.read_bytes() == content
        assert (
            capsys.readouterr().err.strip()
            == f"{run.requeue_file}: {problem}; kept as {aside}, a new record started"
        )


def test_wrong_typed_requeue_fields_are_left_out_and_the_rest_kept(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    record = {
        "job_id": 7,
        "requeues": "two",
        "updated": "noon",
        "max_requeues": 3,
        "events": [42, [], {"signal": "USR1"}, REQUEUE_EVENT],
    }
    run.requeue_file.write_text(json.dumps(record))
    assert run.read_requeue_record() == (
        {"job_id": 7, "max_requeues": 3, "events": [REQUEUE_EVENT]},
        "wrong-typed requeues, updated, events left out",
    )
    assert run.latest_job_id() == "7"
    assert "last signal: USR1 at step 30" in status(run.path)
    run.requeue_file.write_text(json.dumps({"events": {"signal": "USR1"}}))
    assert run.requeue_record() == {"events": []}


def test_damaged_job_records_are_passed_over_and_the_next_one_is_readable(tmp_path):
    run = RunDir(tmp_path / "run")
    run.slurm.mkdir(parents=True)
    good = json.dumps({"job_id": "11", "time": 5.0}).encode()
    damaged = [
        b"42",
        b"[]",
        b'{"job_id": "12"}',
        b'{"job_id": "13", "time": "late"}',
        b"\xff\xfe",
        b'{"job_id": "1',
    ]
    run.jobs_file.write_bytes(b"\n".join([good, *damaged]))  # the last line cut off by a crash
    assert run.latest_job_id() == "11"
    run.record_job("14")
    assert run.latest_job_id() == "14"
    assert run.jobs_file.read_bytes().splitlines()[-2:] == [
        b'{"job_id": "1',
        run.jobs_file.read_bytes().splitlines()[-1],
    ]
    for content in DAMAGED.values():
        run.jobs_file.write_bytes(content)
        assert run.latest_job_id() is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe",
        b"42",
        b"[]",
        b"trainer: 5\ndata: {global_batch_tokens: many}\n",
        b"trainer: {max_steps: 0",
    ],
)
def test_a_damaged_launch_config_leaves_status_without_its_numbers(tmp_path, content):
    run = RunDir(tmp_path / "run")
    (run.logs / "version_0").mkdir(parents=True)
    (run.logs / "version_0" / "config.yaml").write_bytes(content)
    summary = run.summary()
    assert summary.max_steps is None and summary.global_batch_tokens is None
    assert "no training step logged yet" in status(run.path)


def test_the_run_directory_judges_checkpoints_with_the_check_it_is_given(tmp_path):
    """run_dir opens no weights: whether a checkpoint is usable, foreign or damaged is the caller's check."""
    from pretrain.run_dir import CheckpointCheck

    problems = {"step-00000002.ckpt": "theirs", "step-00000006.ckpt": "broken"}
    check = CheckpointCheck(lambda path: problems.get(path.name), foreign="theirs", diverged="diverged")
    run = RunDir(tmp_path, check)
    run.checkpoints.mkdir()
    for step in (2, 4, 6):
        run.checkpoint(step).write_bytes(b"x")
    assert run.resolve_resume("auto") == run.checkpoint(4)  # 6 is passed over
    run.prune_checkpoints(keep_last=1, pinned=lambda step: False)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-00000002.ckpt", "step-00000006.ckpt"]
    with pytest.raises(TypeError, match="without a CheckpointCheck"):
        RunDir(tmp_path).prune_checkpoints(keep_last=1, pinned=lambda step: False)
