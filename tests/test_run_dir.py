"""The run directory's lease: one `pretrain fit` owns a run; another launch is refused while the
owner lives and takes over only when it is provably gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from helpers import PRETRAIN, logged_steps, recipe

from pretrain.errors import UserError
from pretrain.lease import process_start
from pretrain.run_dir import RunDir


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
    run.lease_file.write_text('{"host": "gpu-')  # a crash while the lease was written
    run.acquire()
    assert json.loads(run.lease_file.read_text())["pid"] == os.getpid()


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
