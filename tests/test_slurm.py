"""SLURM: `pretrain submit` / `pretrain status` and requeue-on-signal, against a real one-node cluster.

The module fixture starts munged + slurmctld + slurmd with `slurm/local/up.sh` in a temporary
folder (installing Debian's packages when they are missing and we are root) and stops them at the
end. Jobs are real `sbatch` jobs of a tiny CPU recipe whose steps are slowed down (`SlowSteps`)
so that signals land mid-run. Per-step losses of interrupted runs are compared with an
uninterrupted job of the same recipe. Without SLURM the cluster tests skip locally and fail in CI.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REQUIRE_ALL, recipe, train_losses

from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.recipe import check_srun_geometry
from pretrain.run_dir import list_checkpoints
from pretrain.slurm.job import render, resolve_job, time_limit_seconds
from pretrain.slurm.status import status

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(Path(sys.executable).with_name("pretrain"))
# Jobs find the venv's `pretrain` and this module (for the callbacks below) through the env setup.
ENV_SETUP = f"export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={Path(__file__).parent}"
STEPS = 16
TIMEOUT = 150.0


class SlowSteps(L.Callback):
    """Sleeps after every micro-batch, so that a tiny run lasts long enough to be signalled."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


class SignalSelf(L.Callback):
    """Sends SIGUSR1 to its own process while the recipe is being parsed (`parse`: this callback
    is built then, before the model, data and trainer), before training starts (`setup`), or
    while the first checkpoint is being written (`save`)."""

    def __init__(self, when: str) -> None:
        self.when = when
        self.sent = False
        if when == "parse":
            os.kill(os.getpid(), signal.SIGUSR1)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.when == "setup":
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.when == "save" and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.5)  # the write goes on with the signal pending in the flag


def slow_recipe(tmp_path: Path, dataset: Path, name: str, **changes) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    callbacks = [{"class_path": "test_slurm.SlowSteps"}]
    config = recipe(
        tmp_path, dataset, run_dir, trainer__max_steps=STEPS, trainer__callbacks=callbacks, **changes
    )
    return config, run_dir


# ---- rendering and geometry (no cluster) -----------------------------------------------------


def test_dry_run_renders_tinyllama_on_two_nodes_of_eight_gpus(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    run_dir_existed = (ROOT / "runs" / "tinyllama-1.1b").exists()
    assert main(["submit", "--config", "configs/tinyllama-1.1b.yaml", "--dry-run"]) == 0
    assert (ROOT / "runs" / "tinyllama-1.1b").exists() == run_dir_existed  # nothing written
    script = capsys.readouterr().out
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8"):
        assert line in lines
    assert "#SBATCH --signal=USR1@300" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --open-mode=append" in lines
    assert "#SBATCH --output=runs/tinyllama-1.1b/slurm/%x-%j.out" in lines
    srun = script[script.index("\nsrun ") :]
    assert "pretrain fit --config configs/tinyllama-1.1b.yaml" in srun

    # The committed example is this rendering (plus comments, and a placeholder working directory).
    def commands(text: str) -> list[str]:
        kept = [
            line
            for line in text.splitlines()
            if line and (not line.startswith("#") or line.startswith("#SBATCH"))
        ]
        return [line for line in kept if not line.startswith(("#SBATCH --chdir", "source "))]

    example = (ROOT / "slurm" / "tinyllama-1.1b-2x8.sbatch").read_text()
    assert commands(example) == commands(script)


def test_render_takes_cli_over_recipe_slurm_section(tmp_path, tiny_dataset):
    config, run_dir = slow_recipe(
        tmp_path,
        tiny_dataset,
        "render",
        trainer__devices=2,
        slurm={
            "partition": "cpu",
            "time": "1:00:00",
            "account": "lab",
            "max_requeues": 5,
            "cpus_per_task": 3,
        },
    )
    cli = {"time": "0:30:00", "qos": "high", "max_requeues": 2, "signal_margin": 90}
    job = resolve_job(str(config), cli, ["--data.seed", "7"], workdir=tmp_path)
    lines = render(job).splitlines()
    for line in (
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",  # a CPU recipe: one task per trainer device
        "#SBATCH --cpus-per-task=3",
        "#SBATCH --time=0:30:00",
        "#SBATCH --partition=cpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --signal=USR1@90",
        f"#SBATCH --chdir={tmp_path}",
        f"#SBATCH --error={run_dir}/slurm/%x-%j.err",
    ):
        assert line in lines
    assert not any(line.startswith("#SBATCH --gres") for line in lines)
    assert f"  pretrain fit --config {config} --slurm.max_requeues 2 --data.seed 7" in lines
    assert job.script_path == run_dir / "slurm" / "train.sbatch"


@pytest.mark.parametrize(
    "cli, overrides, trainer, message",
    [
        ({"nodes": 2}, [], {}, "asks for 2 node(s) but the recipe's trainer.num_nodes is 1"),
        ({"gpus_per_node": 4}, [], {"accelerator": "gpu", "devices": 8}, "trainer.devices is 8"),
        ({"gpus_per_node": 2}, [], {}, "trains on the CPU"),
        ({}, [], {"accelerator": "gpu", "devices": "auto"}, "give --gpus-per-node"),
        ({}, ["--trainer.devices", "x"], {}, "trainer.devices must be a whole number"),
        ({"gpus_per_node": 0}, [], {"accelerator": "gpu", "devices": 8}, "asks for no GPU per node"),
        ({}, ["--resume", "none"], {}, "resume: none cannot be submitted"),
    ],
)
def test_geometry_mismatch_is_a_clear_error(tmp_path, tiny_dataset, cli, overrides, trainer, message):
    config, _ = slow_recipe(tmp_path, tiny_dataset, "bad", **{f"trainer__{k}": v for k, v in trainer.items()})
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_job(str(config), cli, overrides, workdir=tmp_path)


def test_geometry_agrees_through_fit_overrides_and_unknown_settings_fail(tmp_path, tiny_dataset):
    config, _ = slow_recipe(tmp_path, tiny_dataset, "ok")
    # 3 nodes of one process each: a global batch that splits over 3 (what `pretrain fit` will check)
    overrides = ["--trainer.num_nodes=3", "--data.global_batch_tokens", "1536"]
    job = resolve_job(str(config), {"nodes": 3}, overrides, workdir=tmp_path)
    assert (job.nodes, job.ntasks_per_node, job.gpus_per_node) == (3, 1, 0)
    typo, _ = slow_recipe(tmp_path, tiny_dataset, "typo", slurm={"partiton": "gpu"})
    with pytest.raises(UserError, match=r"unknown slurm setting\(s\) \['partiton'\]"):
        resolve_job(str(typo), {}, workdir=tmp_path)
    # YAML reads an unquoted 48:00:00 as the number 172800, and "2" is text: both named clearly.
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text(config.read_text() + "slurm:\n  time: 48:00:00\n")
    with pytest.raises(UserError, match=r"slurm.time: YAML read an unquoted time limit as the number 172800"):
        resolve_job(str(unquoted), {}, workdir=tmp_path)
    text_nodes, _ = slow_recipe(tmp_path, tiny_dataset, "text", slurm={"nodes": "2"})
    with pytest.raises(UserError, match=r"slurm.nodes: expected a whole number, got '2'"):
        resolve_job(str(text_nodes), {}, workdir=tmp_path)


HOSTILE = "gpu\n#SBATCH --wrap=touch /tmp/pwned\ntouch /tmp/pwned"


@pytest.mark.parametrize(
    "option", ["--partition", "--account", "--qos", "--constraint", "--time", "--job-name"]
)
def test_hostile_values_never_reach_the_job_script(tmp_path, tiny_dataset, capsys, option):
    config, _ = slow_recipe(tmp_path, tiny_dataset, "hostile")
    args = ["submit", "--config", str(config), "--dry-run"]
    assert main([*args, option, HOSTILE]) == 2
    err = capsys.readouterr().err
    refused = "contains white space or a control character" in err and "#SBATCH line" in err
    assert refused or (option == "--time" and "time limit 'gpu\\n#SBATCH" in err), err
    in_recipe, _ = slow_recipe(tmp_path, tiny_dataset, "hostile-recipe", slurm={"account": "lab\nrm -rf ~"})
    assert main(["submit", "--config", str(in_recipe), "--dry-run"]) == 2
    assert "slurm.account" in capsys.readouterr().err


def test_a_hostile_recipe_path_or_override_cannot_inject_lines(tmp_path, tiny_dataset, capsys):
    config, _ = slow_recipe(tmp_path, tiny_dataset, "named")
    odd = tmp_path / "a\ntouch pwned.yaml"
    odd.write_text(config.read_text())
    assert main(["submit", "--config", str(odd), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "recipe path" in err and "control character" in err
    override = f"1e-3\ntouch {tmp_path}/pwned"  # after `--`: passed to `pretrain fit` as one argument
    args = ["submit", "--config", str(config), "--dry-run", "--", "--model.lr_schedule.init_args.max_lr"]
    assert main([*args, override]) == 0
    script = tmp_path / "job.sbatch"
    script.write_text(capsys.readouterr().out)
    fake = tmp_path / "bin"  # run the script with an `srun` that only records its arguments
    fake.mkdir()
    (fake / "srun").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {tmp_path}/argv\n')
    (fake / "srun").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, check=True, capture_output=True)
    argv = (tmp_path / "argv").read_text().split("\0")
    assert argv[argv.index("--model.lr_schedule.init_args.max_lr") + 1] == override
    assert not (tmp_path / "pwned").exists()


def test_time_limits_and_a_margin_longer_than_the_limit(tmp_path, tiny_dataset):
    assert time_limit_seconds("90") == 5400 and time_limit_seconds("5:30") == 330
    assert time_limit_seconds("48:00:00") == 172800 and time_limit_seconds("2-00:00:00") == 172800
    assert time_limit_seconds("1-12") == 129600 and time_limit_seconds("UNLIMITED") is None
    with pytest.raises(UserError, match="time limit '1:2:3:4'"):
        time_limit_seconds("1:2:3:4")
    config, _ = slow_recipe(tmp_path, tiny_dataset, "margin")
    with pytest.raises(UserError, match=r"signal margin \(300 s\) must be shorter than the time limit"):
        resolve_job(str(config), {"time": "5"}, workdir=tmp_path)


def test_srun_geometry_check():
    check_srun_geometry(8, 2, {"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"})
    with pytest.raises(UserError, match="SLURM started 1 task\\(s\\) on 1 node\\(s\\).*= 2 processes"):
        check_srun_geometry(2, 1, {"SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1"})
    with pytest.raises(UserError, match="--ntasks-per-node"):
        check_srun_geometry(2, 1, {"SLURM_NTASKS": "2", "SLURM_NNODES": "1"})


def test_status_of_a_run_without_job_or_logs(tmp_path):
    (tmp_path / "empty").mkdir()
    report = status(tmp_path / "empty")
    assert "job         none recorded" in report and "no training step logged yet" in report
    assert "checkpoint  none yet" in report
    with pytest.raises(UserError, match="no such run directory"):
        status(tmp_path / "missing")


# ---- signals without SLURM --------------------------------------------------------------------


def fit_with_signal(tmp_path: Path, dataset: Path, when: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / when
    callbacks = [{"class_path": "test_slurm.SignalSelf", "init_args": {"when": when}}]
    config = recipe(tmp_path, dataset, run_dir, trainer__max_steps=8, trainer__callbacks=callbacks)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    result = subprocess.run(
        [PRETRAIN, "fit", "--config", str(config)], capture_output=True, text=True, env=env, timeout=240
    )
    return result, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("when", ["parse", "setup"])
def test_signal_before_training_starts_stops_cleanly_with_a_loadable_checkpoint(tmp_path, tiny_dataset, when):
    result, run_dir = fit_with_signal(tmp_path, tiny_dataset, when)
    assert result.returncode == 4, result.stderr[-3000:]  # stopped by a signal, not requeued
    assert "SIGUSR1: saved step 0 and stopped without requeueing (not running under SLURM)" in result.stderr
    assert train_losses(run_dir) == {}
    [(step, path)] = list_checkpoints(run_dir / "checkpoints")
    assert step == 0 and torch.load(path, weights_only=False)["global_step"] == 0
    assert json.loads((run_dir / "requeue.json").read_text())["events"][0]["action"] == "stopped"


@pytest.mark.slow
def test_signal_during_a_checkpoint_write_is_handled_after_it(tmp_path, tiny_dataset):
    result, run_dir = fit_with_signal(tmp_path, tiny_dataset, "save")
    assert result.returncode == 4, result.stderr[-3000:]
    # The periodic save at step 4 completed; then, at the same step boundary, the flag was read.
    assert "SIGUSR1: saved step 4 and stopped" in result.stderr
    [(step, path)] = list_checkpoints(run_dir / "checkpoints")
    assert step == 4 and torch.load(path, weights_only=False)["pretrain"]["global_step"] == 4
    assert not list((run_dir / "checkpoints").glob(".partial-*"))
    assert sorted(train_losses(run_dir)) == list(range(4))


# ---- the real cluster --------------------------------------------------------------------------


def _unavailable(message: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"the local SLURM cluster is required in CI: {message}")
    pytest.skip(message)


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 60000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", port))
                b.bind(("0.0.0.0", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


@pytest.fixture(scope="module")
def cluster():
    """A running one-node cluster; SLURM_CONF points client commands (and `pretrain`) at it."""
    # Not under pytest's private tmp folder: munged wants every folder above its socket a+x.
    directory = Path(tempfile.mkdtemp(prefix="pretrain-slurm-"))
    directory.chmod(0o755)
    env = {**os.environ, "SLURM_LOCAL_PORT": str(_free_port_pair())}
    up = subprocess.run(
        ["bash", str(ROOT / "slurm/local/up.sh"), str(directory)], capture_output=True, text=True, env=env
    )
    if up.returncode != 0:
        logs = "".join(p.read_text()[-1500:] for p in sorted((directory / "log").glob("*.log")))
        subprocess.run(
            ["bash", str(ROOT / "slurm/local/down.sh"), str(directory), "--rm"], capture_output=True
        )
        _unavailable(f"slurm/local/up.sh failed ({up.returncode}): {up.stderr[-2000:]}\n{logs}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(directory / "etc" / "slurm.conf")
    yield directory
    subprocess.run(["bash", str(ROOT / "slurm/local/down.sh"), str(directory), "--rm"], capture_output=True)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def submit(config: Path, run_dir: Path, *extra: str) -> str:
    args = ["submit", "--config", str(config), "--cpus-per-task", "1", "--env-setup", ENV_SETUP, *extra]
    assert main(args) == 0
    return json.loads((run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay listed for MinJobAge)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def job_logs(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace")[-4000:] for p in sorted((run_dir / "slurm").glob("*.err")))


def wait_until_ended(job_id: str, run_dir: Path) -> dict[str, str]:
    deadline = time.monotonic() + TIMEOUT
    while (info := job_info(job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')}:\n{job_logs(run_dir)}"
        time.sleep(0.5)
    return info


def logged_steps(run_dir: Path, launch: int) -> int:
    """Training steps logged by one launch of a run (its logs/version_<launch>)."""
    try:
        with open(run_dir / "logs" / f"version_{launch}" / "metrics.csv") as f:
            return sum(1 for row in csv.DictReader(f) if row.get("train/loss"))
    except (OSError, ValueError):
        return 0


def wait_for_steps(run_dir: Path, launch: int, steps: int, job_id: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while logged_steps(run_dir, launch) < steps:
        state = job_info(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING"), (
            f"job {job_id} is {state} before launch {launch} logged {steps} step(s):\n{job_logs(run_dir)}"
        )
        assert time.monotonic() < deadline, f"launch {launch} logged no {steps} steps:\n{job_logs(run_dir)}"
        time.sleep(0.2)


def usr1(job_id: str) -> None:
    """What `--signal=USR1@margin` does before the time limit: USR1 to every task of the job's steps."""
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)


@pytest.fixture(scope="module")
def reference(cluster, tiny_dataset, tmp_path_factory) -> dict:
    """An uninterrupted job of the slow recipe, run to completion."""
    tmp = tmp_path_factory.mktemp("reference")
    config, run_dir = slow_recipe(tmp, tiny_dataset, "reference")
    job_id = submit(config, run_dir)
    info = wait_until_ended(job_id, run_dir)
    return {"job_id": job_id, "run_dir": run_dir, "info": info, "losses": train_losses(run_dir)}


@pytest.mark.slow
def test_job_runs_to_completion_with_logs_and_checkpoints(reference):
    run_dir, info = reference["run_dir"], reference["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_logs(run_dir)
    assert sorted(reference["losses"]) == list(range(STEPS))
    assert reference["losses"][STEPS - 1] < reference["losses"][0] - 0.3  # it learns
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [12, 16]
    script = (run_dir / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --requeue" in script and f"PYTHONPATH={Path(__file__).parent}" in script
    out = run_dir / "slurm" / f"pretrain-reference-{reference['job_id']}.out"
    assert f"job {reference['job_id']} (restart 0) on localhost" in out.read_text()
    assert "done: checkpoints in" in job_logs(run_dir)
    report = status(run_dir)
    assert f"{reference['job_id']}: COMPLETED" in report
    assert f"step {STEPS} of {STEPS} (100.0%), 16.38K tokens seen" in report
    assert f"step-{STEPS:08d}.ckpt" in report and "training finished" in report


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_exactly(reference, tiny_dataset, tmp_path):
    config, run_dir = slow_recipe(tmp_path, tiny_dataset, "usr1")
    job_id = submit(config, run_dir)
    wait_for_steps(run_dir, 0, 2, job_id)
    usr1(job_id)
    info = wait_until_ended(job_id, run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_logs(run_dir)
    [event] = json.loads((run_dir / "requeue.json").read_text())["events"]
    assert event["signal"] == "SIGUSR1" and event["action"] == "requeued" and 2 <= event["step"] < STEPS
    assert f"resuming from {run_dir}/checkpoints/step-{event['step']:08d}.ckpt" in job_logs(run_dir)
    assert train_losses(run_dir) == reference["losses"]  # bit-identical per-step losses


@pytest.mark.slow
def test_scontrol_requeue_without_warning_resumes_and_finishes(reference, tiny_dataset, tmp_path):
    config, run_dir = slow_recipe(tmp_path, tiny_dataset, "preempted")
    job_id = submit(config, run_dir)
    wait_for_steps(run_dir, 0, 5, job_id)  # the periodic checkpoint of step 4 exists
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    info = wait_until_ended(job_id, run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_logs(run_dir)
    resumed = [line for line in job_logs(run_dir).splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1 and int(resumed[0].rsplit("step-", 1)[1][:8]) >= 4
    assert train_losses(run_dir) == reference["losses"]


@pytest.mark.slow
def test_three_requeues_then_max_requeues_stops_the_job(reference, tiny_dataset, tmp_path):
    config, run_dir = slow_recipe(tmp_path, tiny_dataset, "thrice")
    job_id = submit(config, run_dir, "--max-requeues", "3")
    for launch in range(4):
        wait_for_steps(run_dir, launch, 1, job_id)  # each launch trains before it is signalled
        usr1(job_id)
    info = wait_until_ended(job_id, run_dir)
    # The fourth signal: checkpoint saved, no requeue, the run is not finished (exit code 4).
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "4:0" and info["Restarts"] == "3"
    record = json.loads((run_dir / "requeue.json").read_text())
    assert record["requeues"] == 3 and record["max_requeues"] == 3
    actions = [event["action"] for event in record["events"]]
    assert actions == ["requeued", "requeued", "requeued", "stopped"]
    last = record["events"][-1]["step"]
    assert list_checkpoints(run_dir / "checkpoints")[-1][0] == last < STEPS
    assert "already requeued 3 times, max_requeues is 3" in job_logs(run_dir)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(last)) and all(losses[s] == reference["losses"][s] for s in losses)
    with open(run_dir / "logs" / "version_3" / "metrics.csv") as f:
        assert {row["train/requeues"] for row in csv.DictReader(f) if row.get("train/requeues")} == {"3.0"}
    report = status(run_dir)
    assert f"{job_id}: FAILED" in report and "requeues    3 (max 3)" in report
    assert f"step {last} of {STEPS}" in report and "ETA" in report


@pytest.mark.slow
def test_sigterm_at_the_time_limit_checkpoints_requeues_and_resumes(cluster, tiny_dataset, tmp_path):
    """A job whose USR1 warning never comes (its line removed from the script): the SIGTERM that
    SLURM sends at the 1-minute time limit checkpoints and requeues the job, which then resumes
    and finishes. 46 steps of 2 s outlast one launch (SLURM enforces the limit 60-90 s in) and the
    rest fit in the second."""
    run_dir, steps = tmp_path / "timelimit", 46
    slow = [{"class_path": "test_slurm.SlowSteps", "init_args": {"seconds": 1.0}}]
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=steps, trainer__callbacks=slow)
    cli = {"time": "1", "cpus_per_task": 1, "env_setup": ENV_SETUP, "signal_margin": 30}
    job = resolve_job(str(config), cli, workdir=ROOT)
    script = "\n".join(line for line in render(job).splitlines() if not line.startswith("#SBATCH --signal"))
    job.log_dir.mkdir(parents=True)
    job.script_path.write_text(script + "\n")
    submitted = subprocess.run(["sbatch", "--parsable", str(job.script_path)], capture_output=True, text=True)
    job_id = submitted.stdout.strip().split(";")[0]
    assert job_id.isdigit(), submitted.stderr
    deadline = time.monotonic() + 240
    while (info := job_info(job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')}:\n{job_logs(run_dir)}"
        time.sleep(1)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_logs(run_dir)
    [event] = json.loads((run_dir / "requeue.json").read_text())["events"]
    assert event["signal"] == "SIGTERM" and event["action"] == "requeued" and 0 < event["step"] < steps
    assert f"resuming from {run_dir}/checkpoints/step-{event['step']:08d}.ckpt" in job_logs(run_dir)
    assert sorted(train_losses(run_dir)) == list(range(steps))


@pytest.mark.slow
def test_fsdp2_two_tasks_via_srun_complete_and_resume(reference, tiny_dataset, tmp_path):
    config, run_dir = slow_recipe(
        tmp_path, tiny_dataset, "fsdp2", trainer__devices=2, trainer__strategy="fsdp2"
    )
    job_id = submit(config, run_dir)
    assert "#SBATCH --ntasks-per-node=2" in (run_dir / "slurm" / "train.sbatch").read_text()
    wait_for_steps(run_dir, 0, 2, job_id)
    usr1(job_id)
    info = wait_until_ended(job_id, run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_logs(run_dir)
    logs = job_logs(run_dir)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    final = run_dir / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    assert final.is_dir()  # sharded over the two ranks
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    assert max(abs(losses[s] - reference["losses"][s]) for s in losses) < 1e-5


@pytest.mark.slow
def test_fit_under_srun_refuses_a_task_count_that_differs_from_the_recipe(cluster, tiny_dataset, tmp_path):
    config = recipe(tmp_path, tiny_dataset, tmp_path / "geometry", trainer__devices=2)
    result = subprocess.run(
        ["srun", "--ntasks-per-node=1", "--cpus-per-task=1", PRETRAIN, "fit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "SLURM started 1 task(s) on 1 node(s), but the recipe trains on" in result.stderr


@pytest.mark.slow
def test_anneal_submit_runs_a_probe_as_a_requeueable_job(cluster, tiny_dataset, tmp_path):
    """`pretrain anneal --submit`: the probe of a WSD run's checkpoint is a real job in the probe's
    own run directory; the next `pretrain anneal` finds it finished and writes its record."""
    from pretrain.anneal.result import probe_dir, read_results

    wsd = {
        "class_path": "pretrain.train.schedules.WarmupStableDecay",
        "init_args": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_fraction": 0.0},
    }
    run_dir = tmp_path / "wsd"
    slurm = {"env_setup": ENV_SETUP, "cpus_per_task": 1}
    config = recipe(
        tmp_path, tiny_dataset, run_dir, model__lr_schedule=wsd, trainer__max_steps=4, slurm=slurm
    )
    subprocess.run([PRETRAIN, "fit", "--config", str(config)], check=True, capture_output=True)
    assert main(["anneal", str(run_dir), "--steps", "4", "--fraction", "0.5", "--submit"]) == 0
    probe = probe_dir(run_dir, 4)
    assert "--branch_from" in (probe / "slurm" / "train.sbatch").read_text()
    job_id = json.loads((probe / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]
    assert wait_until_ended(job_id, probe)["JobState"] == "COMPLETED", job_logs(probe)
    assert main(["anneal", str(run_dir), "--steps", "4", "--fraction", "0.5"]) == 0
    (result,) = read_results(run_dir)
    assert (result.step, result.anneal_tokens) == (4, 2048) and result.val_loss > 0
