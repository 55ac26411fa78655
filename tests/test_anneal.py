"""`pretrain anneal`: the plan and its refusals, pinning, records, `--submit` rendering, the
automatic-probes callback (fast, on hand-made run directories), and real probes beside a real
parent (slow: one parent per module)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import PRETRAIN, recipe, require, run, train_losses

from pretrain.anneal.plan import Settings, make_plan, probe_config
from pretrain.anneal.probe import existing_probe, pin, run_probe
from pretrain.anneal.result import ProbeResult, probe_dir, write_result
from pretrain.cli import main
from pretrain.commands.fit import main as fit_main
from pretrain.errors import UserError
from pretrain.run_dir import RunDir

WSD = {
    "class_path": "pretrain.train.schedules.WarmupStableDecay",
    "init_args": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_fraction": 0.0},
}
COSINE = {
    "class_path": "pretrain.train.schedules.WarmupCosine",
    "init_args": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
}


def fake_run(
    tmp_path: Path, schedule: dict, steps: tuple[int, ...] = (4, 8), name: str = "parent run"
) -> Path:
    """A run directory with a resolved config and (unloadable) checkpoint files at `steps`."""
    run_dir = tmp_path / name
    version = run_dir / "logs" / "version_0"
    version.mkdir(parents=True)
    config = {
        "run_dir": str(run_dir),
        "trainer": {"max_steps": 12, "accelerator": "cpu", "devices": 1, "callbacks": None},
        "model": {"model": "tiny", "lr_schedule": schedule},
        "data": {"global_batch_tokens": 1024, "micro_batch_size": 8, "seq_len": 64, "num_workers": 0},
        "checkpoint": {"every_n_steps": 4, "keep_last": 2},
        "slurm": {"job_name": "parent", "max_requeues": None},
    }
    (version / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "checkpoints").mkdir()
    for step in steps:
        (run_dir / "checkpoints" / f"step-{step:08d}.ckpt").write_bytes(b"weights %d" % step)
    return run_dir


def test_plan_probes_the_constant_phase_with_an_exact_decay(tmp_path):
    run_dir = fake_run(tmp_path, WSD)
    (run_dir / "checkpoints" / ".partial-step-00000012.ckpt").write_bytes(b"being written")
    plan = make_plan(run_dir, Settings(fraction=0.5))
    assert [(p.step, p.decay_steps) for p in plan.probes] == [(4, 2), (8, 4)]  # never the partial
    branch = plan.branch(plan.probes[1])["init_args"]
    assert branch["decay_steps"] == 4 and branch["decay_shape"] == "1-sqrt"
    config = probe_config(plan.config, run_dir, plan.probes[1], plan.branch(plan.probes[1]), Path("pin"))
    assert config["trainer"]["max_steps"] == 12 and config["branch_from"] == "pin"
    assert config["run_dir"] == str(probe_dir(run_dir, 8)) and config["slurm"]["job_name"].endswith("step-8")
    automatic = {"class_path": "pretrain.train.callbacks.anneal_probes.AnnealProbes", "init_args": {}}
    plan.config["trainer"]["callbacks"] = [automatic, {"class_path": "other"}]
    config = probe_config(plan.config, run_dir, plan.probes[1], plan.branch(plan.probes[1]), Path("pin"))
    assert config["trainer"]["callbacks"] == [{"class_path": "other"}]  # a probe launches no probes
    assert "2 probe(s) to run, 6,144 tokens" in plan.describe()


def test_plan_of_an_infinite_schedule_anneals_from_its_constant_lr(tmp_path):
    infinite = {
        "class_path": "pretrain.train.schedules.Infinite",
        "init_args": {
            "max_lr": 3e-3,
            "constant_lr": 1e-3,
            "warmup_steps": 1,
            "cooldown_steps": 2,
            "min_lr": 0.0,
        },
    }
    plan = make_plan(fake_run(tmp_path, infinite), Settings(tokens=3072, shape="linear"))
    assert [p.step for p in plan.probes] == [4, 8]
    assert plan.branch(plan.probes[0])["init_args"] | {} == infinite["init_args"] | {
        "anneal_steps": 3,
        "anneal_shape": "linear",
    }


def test_a_step_in_the_decay_phase_is_left_out_or_refused(tmp_path):
    decaying = WSD | {"init_args": WSD["init_args"] | {"decay_fraction": 0.5}}  # decays from step 6 of 12
    run_dir = fake_run(tmp_path, decaying)
    assert [p.step for p in make_plan(run_dir, Settings()).probes] == [4]
    with pytest.raises(UserError, match="not in its constant-LR phase"):
        make_plan(run_dir, Settings(steps=(8,)))


@pytest.mark.parametrize(
    "schedule, settings, message",
    [
        (COSINE, Settings(), "WarmupCosine has no constant phase.*WarmupStableDecay or Infinite"),
        (WSD, Settings(fraction=0.0), r"--fraction 0.0: must be in \(0, 1\]"),
        (WSD, Settings(fraction=1.5), r"--fraction 1.5: must be in \(0, 1\]"),
        (WSD, Settings(steps=(6,)), "step-6 is not among .* pruned by the parent's retention"),
        (WSD, Settings(tokens=0), "--tokens 0: must be a positive number of tokens"),
        (WSD, Settings(every=0), "--every 0: must be a positive number of steps"),
        (WSD, Settings(shape="exp"), "--shape exp: choose one of linear, cosine, 1-sqrt"),
    ],
)
def test_refusals_are_one_line(tmp_path, schedule, settings, message):
    with pytest.raises(UserError, match=message):
        make_plan(fake_run(tmp_path, schedule), settings)


def test_a_run_with_no_checkpoints_is_refused(tmp_path, capsys):
    run_dir = fake_run(tmp_path, WSD, steps=())
    assert main(["anneal", str(run_dir)]) == 2
    assert "no published checkpoint to probe yet" in capsys.readouterr().err


def test_a_checkpoint_pruned_before_its_pin_is_named(tmp_path):
    run_dir = fake_run(tmp_path, WSD)
    probe = make_plan(run_dir, Settings(steps=(4,))).probes[0]
    probe.checkpoint.unlink()  # the parent's retention, between the plan and the pin
    with pytest.raises(UserError, match="checkpoint step-4 was pruned by the parent's retention"):
        pin(probe, probe_dir(run_dir, 4))


def test_a_pin_is_a_hard_link_that_outlives_the_parents_name(tmp_path):
    run_dir = fake_run(tmp_path, WSD)
    probe = make_plan(run_dir, Settings(steps=(4,))).probes[0]
    pinned = pin(probe, probe_dir(run_dir, 4))
    assert pinned.stat().st_ino == probe.checkpoint.stat().st_ino
    probe.checkpoint.unlink()
    assert pinned.read_bytes() == b"weights 4"
    plan = make_plan(run_dir, Settings(steps=(4,)))  # the unfinished probe resumes from its pin
    assert [p.checkpoint for p in plan.probes] == [pinned]


def test_a_probe_pinned_from_a_since_rewritten_checkpoint_is_named(tmp_path):
    run_dir = fake_run(tmp_path, WSD)
    pin(make_plan(run_dir, Settings(steps=(4,))).probes[0], probe_dir(run_dir, 4))
    rewritten = run_dir / "checkpoints" / "step-00000004.ckpt"
    rewritten.unlink()
    rewritten.write_bytes(b"weights after a rollback")  # another checkpoint under the same name
    probe = make_plan(run_dir, Settings(steps=(4,))).probes[0]
    with pytest.raises(UserError, match="was started from another checkpoint step-4 .* move .* aside"):
        pin(probe, probe_dir(run_dir, 4))


def test_done_probes_are_skipped_and_a_damaged_record_is_redone(tmp_path, capsys):
    run_dir = fake_run(tmp_path, WSD)
    plan = make_plan(run_dir, Settings())
    first, second = plan.probes
    write_result(run_dir, ProbeResult(4, first.checkpoint_id, 4096, 1024, 5.0))
    write_result(run_dir, ProbeResult(8, "another checkpoint", 8192, 2048, 5.0))  # stale: redone
    plan = make_plan(run_dir, Settings())
    assert [r.step for r in plan.done] == [4] and [p.step for p in plan.probes] == [8]
    (probe_dir(run_dir, 4) / "probe.json").write_text("[]")
    assert existing_probe(run_dir, 4)[0] is None
    assert "not a probe record" in capsys.readouterr().err
    assert (probe_dir(run_dir, 4) / "probe.json.damaged").read_text() == "[]"
    assert [p.step for p in make_plan(run_dir, Settings()).probes] == [4, 8]


def test_the_second_anneal_on_a_probe_says_it_is_in_use(tmp_path):
    run_dir = fake_run(tmp_path, WSD)
    plan = make_plan(run_dir, Settings(steps=(4,)))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = {"host": os.uname().nodename, "pid": other.pid, "start": None, "job_id": None}
        from pretrain.lease import process_start

        lease["start"] = process_start(other.pid)
        probe_dir(run_dir, 4).mkdir(parents=True)
        RunDir(probe_dir(run_dir, 4)).lease_file.write_text(json.dumps(lease))
        with pytest.raises(UserError, match="is in use by another"):
            run_probe(plan, plan.probes[0], fit_main, [])
    finally:
        other.kill()
        other.wait()
    assert not (probe_dir(run_dir, 4) / "parent").exists()  # nothing pinned by the loser


def test_submit_dry_run_renders_one_job_per_probe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = fake_run(tmp_path, WSD, name="parent")
    assert main(["anneal", str(run_dir), "--submit", "--dry-run", "--gpus", "0"]) == 0
    out = capsys.readouterr().out
    for step in (4, 8):
        pinned = probe_dir(run_dir, step) / "parent" / f"step-{step:08d}.ckpt"
        assert f"--config {probe_dir(run_dir, step)}/probe.yaml --branch_from {pinned}" in out
        assert f"--job-name=anneal-parent-step-{step}" in out
    assert out.count("#!/bin/bash") == 2
    assert not (run_dir / "anneal").exists()  # a dry run writes nothing


def test_the_callback_launches_a_detached_probe_for_a_published_checkpoint(tmp_path, capsys):
    from pretrain.train.callbacks.anneal_probes import launch

    run_dir = fake_run(tmp_path, COSINE)  # the child refuses it: the launch itself is what is tested
    launch(run_dir, 4, ["--steps", "4"])
    assert "launched the probe of step 4, locally at low priority" in capsys.readouterr().err
    log = probe_dir(run_dir, 4) / "launch.log"
    deadline = time.monotonic() + 60
    while "no constant phase" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "pretrain anneal: error:" in log.read_text() and "no constant phase" in log.read_text()


# ---- real probes (slow): one parent per module ---------------------------------------------------


@pytest.fixture(scope="module")
def parent(tiny_dataset, tmp_path_factory) -> Path:
    """A 12-step WSD run in its constant phase, checkpoints every 2 steps (all kept)."""
    tmp = tmp_path_factory.mktemp("anneal")
    config = recipe(
        tmp,
        tiny_dataset,
        tmp / "parent",
        model__lr_schedule=WSD,
        checkpoint={"every_n_steps": 2, "keep_last": 6},
    )
    run(["fit", "--config", str(config)])
    return tmp / "parent"


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of the run outside anneal/, by content."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.relative_to(run_dir).parts[0] != "anneal"
    }


def kill_after_checkpoint(args: list[str], checkpoint: Path, timeout: float = 240) -> None:
    """Start `pretrain ARGS`; SIGKILL its process group once `checkpoint` (of a probe, whose log
    starts at its branch step) is published with every step before it logged."""
    process = subprocess.Popen(
        [PRETRAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    step = int(checkpoint.name.split("-")[1].split(".")[0])
    deadline = time.monotonic() + timeout
    while not (checkpoint.exists() and max(_losses(checkpoint.parent.parent), default=-1) >= step - 1):
        assert process.poll() is None, "the probe exited before the checkpoint to kill at"
        assert time.monotonic() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _losses(run_dir: Path) -> dict[int, float]:
    try:
        return train_losses(run_dir)
    except (OSError, ValueError, KeyError):  # the first rows are being written
        return {}


@pytest.mark.slow
def test_killed_probe_resumes_and_equals_a_hand_made_branch(parent, tiny_dataset, tmp_path):
    before = snapshot(parent)
    (parent / "checkpoints" / ".partial-step-00000016.ckpt").write_bytes(b"half written")
    probe_checkpoint = probe_dir(parent, 8) / "checkpoints" / "step-00000010.ckpt"
    kill_after_checkpoint(["anneal", str(parent), "--steps", "8", "--fraction", "0.5"], probe_checkpoint)
    require("lm_eval")  # the rerun also scores the annealed model through `pretrain eval`'s path
    tasks = ["--tasks", "pystdlib_next_line", "--limit", "8"]
    result = run(["anneal", str(parent), "--steps", "8", "--fraction", "0.5", *tasks])
    assert "step-8: 8,192 tokens so far, decay 4 steps (4,096 tokens), resumes" in result.stdout
    (parent / "checkpoints" / ".partial-step-00000016.ckpt").unlink()
    assert snapshot(parent) == before  # the parent is untouched outside anneal/

    decay = WSD | {"init_args": WSD["init_args"] | {"decay_steps": 4}}
    hand_made = recipe(
        tmp_path,
        tiny_dataset,
        tmp_path / "branch",
        model__lr_schedule=decay,
        trainer__max_steps=12,
        branch_from=str(parent / "checkpoints" / "step-00000008.ckpt"),
        validate_every_steps=4,
    )
    branched = run(["fit", "--config", str(hand_made)])
    assert "length changed" not in branched.stderr  # a branch's decay is no stretched schedule
    assert train_losses(probe_dir(parent, 8)) == train_losses(tmp_path / "branch")  # bit for bit
    record = json.loads((probe_dir(parent, 8) / "probe.json").read_text())
    assert record["step"] == 8 and record["anneal_tokens"] == 4096 and record["stable_val_loss"] is not None
    assert record["val_loss"] < record["stable_val_loss"]  # the decay lowers the loss
    assert set(record["downstream"]) == {"pystdlib_next_line/acc", "pystdlib_next_line/acc_norm"}
    again = run(["anneal", str(parent), "--steps", "8", "--fraction", "0.5"])
    assert "step-8: done" in again.stdout and "0 probe(s) to run" in again.stdout


@pytest.mark.slow
def test_a_probe_beside_the_training_parent_changes_nothing_of_it(parent, tmp_path):
    """Runs after the test above (same parent): the parent trains on from 12 to 20 steps while the
    probe of step 4 runs; retention (keep_last 6) prunes step 4, which the probe pinned first."""
    logs_before = snapshot(parent / "logs")
    probe = subprocess.Popen(
        [PRETRAIN, "anneal", str(parent), "--steps", "4", "--fraction", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pinned = probe_dir(parent, 4) / "parent" / "step-00000004.ckpt"
    deadline = time.monotonic() + 120
    while not pinned.exists():
        assert probe.poll() is None and time.monotonic() < deadline, (
            probe.stderr.read() if probe.stderr else ""
        )
        time.sleep(0.05)
    config = parent / "logs" / "version_0" / "config.yaml"
    run(["fit", "--config", str(config), "--trainer.max_steps", "20"])
    out, err = probe.communicate(timeout=240)
    assert probe.returncode == 0, err[-3000:]
    assert not (parent / "checkpoints" / "step-00000004.ckpt").exists()  # pruned by the parent...
    assert json.loads((probe_dir(parent, 4) / "probe.json").read_text())["step"] == 4  # ...after its pin
    assert snapshot(parent / "logs").items() >= logs_before.items()  # earlier launches' files as they were
    outside = {p.relative_to(parent).parts[0] for p in parent.iterdir()} - {"anneal"}
    assert outside == {"checkpoints", "goodput", "logs", "verified-shards.json"}  # no lease, no probe debris
    assert sorted(p.name for p in (parent / "checkpoints").iterdir()) == [
        f"step-{step:08d}.ckpt" for step in range(10, 21, 2)
    ]


def test_the_callback_waits_for_the_published_checkpoint_of_a_constant_phase_step(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pretrain.train.callbacks import anneal_probes
    from pretrain.train.schedules import WarmupStableDecay

    launched = []
    monkeypatch.setattr(anneal_probes, "launch", lambda run_dir, step, args: launched.append((step, args)))
    callback = anneal_probes.AnnealProbes(every_n_steps=4, fraction=0.25, shape="linear")
    trainer = SimpleNamespace(is_global_zero=True, max_steps=20, default_root_dir=str(tmp_path))
    module = SimpleNamespace(lr_schedule=WarmupStableDecay(3e-3, 3e-4, warmup_steps=2, decay_fraction=0.2))
    checkpoint = RunDir(tmp_path).checkpoint(4)
    callback.on_optimizer_step(trainer, module, 4)
    assert launched == []  # not before the checkpoint of step 4 is published
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"published")
    callback.on_optimizer_step(trainer, module, 5)
    assert launched == [(4, ["--steps", "4", "--fraction", "0.25", "--shape", "linear"])]
    for step in (8, 12, 16, 20):  # the decay runs from step 16 to 20: the last checkpoint is not probed
        RunDir(tmp_path).checkpoint(step).write_bytes(b"published")
        callback.on_optimizer_step(trainer, module, step)
    assert [step for step, _ in launched] == [4, 8, 12, 16]


def test_a_shard_folder_is_pinned_file_by_file_and_copied_where_links_fail(tmp_path, monkeypatch, capsys):
    import errno

    run_dir = fake_run(tmp_path, WSD, steps=(8,))
    folder = run_dir / "checkpoints" / "step-00000004.ckpt"  # an FSDP2 checkpoint: a folder of shards
    (folder / "shards").mkdir(parents=True)
    (folder / "meta.pt").write_bytes(b"meta")
    (folder / "shards" / "0.distcp").write_bytes(b"shard 0")
    probe = make_plan(run_dir, Settings(steps=(4,))).probes[0]
    pinned = pin(probe, probe_dir(run_dir, 4))
    assert (pinned / "shards" / "0.distcp").stat().st_ino == (folder / "shards" / "0.distcp").stat().st_ino

    def no_links(source, destination):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    import torch

    # a copy keeps the identity `pretrain fit` writes into a checkpoint (not its inode)
    torch.save({"pretrain": {"checkpoint_id": "id-8"}}, run_dir / "checkpoints" / "step-00000008.ckpt")
    monkeypatch.setattr(os, "link", no_links)
    probe = make_plan(run_dir, Settings(steps=(8,))).probes[0]
    copied = pin(probe, probe_dir(run_dir, 8))
    assert copied.read_bytes() == probe.checkpoint.read_bytes()
    assert copied.stat().st_ino != probe.checkpoint.stat().st_ino
    assert "cannot hard-link" in capsys.readouterr().err
