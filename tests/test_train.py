"""`pretrain fit`: exact resume after SIGKILL (1 process and FSDP2 over 2 gloo processes, and 2 -> 1),
checkpoint publishing, data/vocab checks, non-finite step skipping, config errors, HF export.

Multi-process and kill tests run the real `pretrain` command in subprocesses (Lightning
relaunches the command line for the second rank).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import (
    MODEL,
    PRETRAIN,
    STEPS,
    bare_trainer,
    logged_steps,
    recipe,
    require,
    run,
    run_and_kill_after_checkpoint,
    run_and_kill_when,
    train_losses,
)

from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.model import Llama
from pretrain.model.checkpoint import load_model_checkpoint
from pretrain.run_dir import RunDir, list_checkpoints
from pretrain.train.callbacks.periodic_checkpoint import TRAINING_CHECKPOINTS, PeriodicCheckpoint


def test_resume_with_another_attention_backend_continues_and_an_architecture_change_is_refused(
    tiny_dataset, tmp_path, capsys
):
    """The attention kernel is an execution setting: a run trained with `sdpa` resumes with
    `sdpa-math` and continues the uninterrupted run's losses; a changed architectural field is refused."""
    first = tmp_path / "sdpa"
    assert (
        main(["fit", "--config", str(recipe(tmp_path, tiny_dataset, first)), "--checkpoint.keep_last", "3"])
        == 0
    )
    uninterrupted = train_losses(first)
    step_8 = first / "checkpoints" / "step-00000008.ckpt"
    resumed = tmp_path / "math"
    config = recipe(tmp_path, tiny_dataset, resumed)
    args = ["fit", "--config", str(config), "--resume", str(step_8), "--model.attention_backend", "sdpa-math"]
    assert main(args) == 0
    continued = train_losses(resumed)
    assert sorted(continued) == list(range(8, STEPS))
    for step, loss in continued.items():  # the same weights, data and optimizer; only kernel rounding differs
        assert abs(loss - uninterrupted[step]) < 1e-5, (step, loss, uninterrupted[step])
    deeper = {**MODEL, "n_layers": 3}
    refused = tmp_path / "deeper"
    args = ["fit", "--config", str(recipe(tmp_path, tiny_dataset, refused)), "--resume", str(step_8)]
    assert main([*args, "--model.model_overrides", json.dumps(deeper)]) == 2
    assert "model config differs" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill_is_exact_single_process(tiny_dataset, tmp_path, reference):
    """Killed after a checkpoint, then killed while the next one is written in the background
    (`checkpoint.async_save`): the partial is passed over and the run ends bit-identical."""
    run_dir = tmp_path / "killed"
    config = recipe(tmp_path, tiny_dataset, run_dir)
    args = ["fit", "--config", str(config), "--checkpoint.async_save", "true"]
    run_and_kill_after_checkpoint(args, run_dir / "checkpoints" / "step-00000004.ckpt")
    partial = run_dir / "checkpoints" / ".partial-step-00000008.ckpt"
    run_and_kill_when(args, partial.exists, "the asynchronous write of step 8")
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [4]  # the partial is not listed
    resumed = run(args)  # --resume auto
    assert f"resuming from {run_dir / 'checkpoints' / 'step-00000004.ckpt'}" in resumed.stderr
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    assert losses == reference  # bit-identical per-step losses on CPU fp32
    assert len(list((run_dir / "logs").glob("version_*"))) == 3
    assert not list((run_dir / "checkpoints").glob(".partial-*"))  # no debris


@pytest.mark.slow
def test_chunked_loss_and_selective_checkpointing_train_like_the_reference(tiny_dataset, tmp_path, reference):
    run_dir = tmp_path / "savers"
    config = recipe(tmp_path, tiny_dataset, run_dir)
    savers = ["--model.loss_chunk_tokens", "100", "--model.activation_checkpointing", "selective"]
    assert main(["fit", "--config", str(config), *savers]) == 0
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    assert max(abs(losses[step] - reference[step]) for step in reference) < 1e-4  # summation order only


@pytest.mark.slow
def test_fsdp2_two_processes_resume_exactly_and_continue_on_one(tiny_dataset, tmp_path, reference, capsys):
    require("torch.distributed")
    assert torch.distributed.is_gloo_available()
    run_dir = tmp_path / "fsdp"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__devices=2, trainer__strategy="fsdp2")
    args = ["fit", "--config", str(config)]
    run_and_kill_after_checkpoint(args, run_dir / "checkpoints" / "step-00000004.ckpt")
    checkpoint = run_dir / "checkpoints" / "step-00000004.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()  # sharded
    run(args)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    # Killed and resumed = uninterrupted, bit for bit, on 2 FSDP2 processes too.
    uninterrupted = tmp_path / "fsdp-uninterrupted"
    run(
        [
            "fit",
            "--config",
            str(recipe(tmp_path, tiny_dataset, uninterrupted, trainer__devices=2, trainer__strategy="fsdp2")),
        ]
    )
    assert losses == train_losses(uninterrupted)
    # Same global batch, same order: FSDP2 over 2 ranks matches the single-process run.
    assert max(abs(losses[s] - reference[s]) for s in reference) < 1e-5

    # Resume the 2-process run's step-8 checkpoint on ONE process: same data order continues.
    one = tmp_path / "one"
    sharded = ["--resume", str(run_dir / "checkpoints" / "step-00000008.ckpt")]
    plain = recipe(tmp_path, tiny_dataset, tmp_path / "plain", trainer__devices=1)
    assert main(["fit", "--config", str(plain), *sharded]) == 2  # not without FSDP2
    assert (
        "is a sharded FSDP2 checkpoint (a folder): resume it with trainer.strategy: fsdp2"
        in capsys.readouterr().err
    )
    config_one = recipe(tmp_path, tiny_dataset, one, trainer__devices=1, trainer__strategy="fsdp2")
    run(["fit", "--config", str(config_one), "--resume", str(run_dir / "checkpoints" / "step-00000008.ckpt")])
    continued = train_losses(one)
    assert sorted(continued) == list(range(8, STEPS))
    assert max(abs(continued[s] - reference[s]) for s in continued) < 1e-5

    # The sharded checkpoint converts to a Hugging Face model on the CPU without any process group.
    transformers = require("transformers")
    final = run_dir / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    assert main(["export-hf", str(final), str(tmp_path / "hf")]) == 0
    ours = Llama(load_model_checkpoint(final).config).eval()
    ours.load_state_dict(load_model_checkpoint(final).state_dict)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max() < 1e-4
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_fsdp2_killed_ten_times_at_random_points_ends_as_an_uninterrupted_run(tiny_dataset, tmp_path):
    """Fault injection: a 2-process FSDP2 run is SIGKILLed 10 times, after a random number of new
    steps or (every third time) while a checkpoint is being written in the background
    (`checkpoint.async_save`, DCP's async_save); relaunched, it ends with the per-step losses of
    an uninterrupted run."""
    import random

    require("torch.distributed")
    rng = random.Random(0)
    changes = {
        "trainer__devices": 2,
        "trainer__strategy": "fsdp2",
        "trainer__max_steps": 160,  # more than 10 kills of at most 8 steps each can reach
        "validate_every_steps": 40,
        "checkpoint": {"every_n_steps": 1, "keep_last": 2, "async_save": True},
    }
    uninterrupted = tmp_path / "uninterrupted"
    run(["fit", "--config", str(recipe(tmp_path, tiny_dataset, uninterrupted, **changes))])
    run_dir = tmp_path / "faulty"
    args = [PRETRAIN, "fit", "--config", str(recipe(tmp_path, tiny_dataset, run_dir, **changes))]
    during_writes = 0
    for kill in range(10):
        log = open(tmp_path / f"launch-{kill}.err", "w+b")  # a file: a full pipe would block the run
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        target = logged_steps(run_dir) + rng.randint(1, 8)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / f"launch-{kill}.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "no progress"
            if kill % 3 == 0 and list((run_dir / "checkpoints").glob(".partial-*")):
                during_writes += 1  # a checkpoint is being written right now
                break
            if kill % 3 and logged_steps(run_dir) >= target:
                break
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    run(args[1:])
    assert during_writes == 4
    assert train_losses(run_dir) == train_losses(uninterrupted)  # every step, bit for bit


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_dataset, tmp_path, reference):
    run_dir = tmp_path / "ddp"
    run(
        [
            "fit",
            "--config",
            str(recipe(tmp_path, tiny_dataset, run_dir, trainer__devices=2, trainer__strategy="ddp")),
        ]
    )
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    assert max(abs(losses[s] - reference[s]) for s in reference) < 1e-5


@pytest.mark.slow
def test_hybrid_sharding_over_two_nodes_matches_one_process(tiny_dataset, tmp_path, reference):
    """`model.sharding: hybrid` on 2 nodes x 1 device (two `pretrain fit` launched by hand, as a
    cluster launcher would): replicate across nodes, shard within; same losses as one process."""
    run_dir = tmp_path / "hybrid"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__num_nodes=2, trainer__strategy="fsdp2")
    args = [PRETRAIN, "fit", "--config", str(config), "--model.sharding", "hybrid"]
    port = str(29_500 + os.getpid() % 1000)
    nodes = [
        subprocess.Popen(
            args,
            env=os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert "FSDP2: hybrid sharding: replicate over 2 node(s), shard over 1 device(s)" in errors[0]
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS))
    assert max(abs(losses[s] - reference[s]) for s in reference) < 1e-5


class RecordGradients(L.Callback):
    """Per micro-batch: did any (sharded) parameter hold a gradient after backward; per step: the loss."""

    def __init__(self) -> None:
        self.reduced: list[bool] = []
        self.losses: list[float] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.reduced.append(any(p.grad is not None for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if len(self.reduced) % 4 == 0:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def test_fsdp2_reduces_gradients_once_per_accumulated_step(tiny_dataset):
    """Under FSDP2, micro-batches before a step's last keep their gradients unsharded (no
    reduce-scatter: no sharded .grad appears), and the losses equal single-device accumulation."""
    from pretrain.train.datamodule import PretrainDataModule, Source
    from pretrain.train.module import PretrainModule

    records = {}
    for strategy in ("auto", "fsdp2"):
        module = PretrainModule(model="tiny", model_overrides=MODEL)
        data = PretrainDataModule(
            {"stdlib": Source(str(tiny_dataset))}, seq_len=64, global_batch_tokens=2048, micro_batch_size=8
        )
        records[strategy] = RecordGradients()
        trainer = bare_trainer(
            max_steps=3,
            strategy=strategy,
            devices=1,
            accumulate_grad_batches=4,
            callbacks=[records[strategy]],
        )
        trainer.fit(module, datamodule=data)
    assert records["fsdp2"].reduced == [False, False, False, True] * 3
    torch.testing.assert_close(records["fsdp2"].losses, records["auto"].losses, atol=1e-6, rtol=0)


def test_a_tensorboard_logger_records_beside_the_csv_log(tiny_dataset, tmp_path):
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tb"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=4)
    logger = ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger"]
    assert (
        main(["fit", "--config", str(config), *logger, "--trainer.logger.save_dir", str(run_dir / "tb")]) == 0
    )
    [events] = list((run_dir / "tb").rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(events.parent)).Reload()
    logged = {e.step: e.value for e in scalars.Scalars("train/loss")}
    assert logged == pytest.approx(train_losses(run_dir))  # the same values as the CSV log
    assert "val/stdlib/loss" in scalars.Tags()["scalars"]


def test_final_weights_are_validated_and_precision_defaults_to_the_device(
    tiny_dataset, tmp_path, monkeypatch
):
    from pretrain.train import fit as fit_cli

    run_dir = tmp_path / "final"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=6)  # validate_every_steps: 4
    text = yaml.safe_load(config.read_text())
    del text["trainer"]["precision"]
    config.write_text(yaml.safe_dump(text))
    assert main(["fit", "--config", str(config)]) == 0
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        validated = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/stdlib/loss")]
    assert len(validated) == 2 and validated[0] < validated[1]  # at step 4, and the final step 6
    assert (
        yaml.safe_load((run_dir / "logs" / "version_0" / "config.yaml").read_text())["trainer"]["precision"]
        == "32-true"
    )
    # `pretrain plot` on this real run draws what it logged: 6 training losses, 2 validations.
    from pretrain.run_dir import RunDir

    run = RunDir(run_dir).read_logs()
    assert len(run.series["train/loss"].values) == 6 and len(run.series["val/stdlib/loss"].values) == 2
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert fit_cli.default_precision("gpu") == fit_cli.default_precision("auto") == "bf16-mixed"
    assert fit_cli.default_precision("cpu") == "32-true"
    # A GPU that only emulates bf16 (V100, T4) trains in float32 by default.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert fit_cli.default_precision("gpu") == "32-true"


def test_checkpoints_keep_last_k_plus_pinned_and_ignore_partials(tiny_dataset, tmp_path):
    run_dir = tmp_path / "keep"
    config = recipe(
        tmp_path, tiny_dataset, run_dir, checkpoint={"every_n_steps": 2, "keep_last": 2, "pin_steps": [2]}
    )
    assert main(["fit", "--config", str(config)]) == 0
    steps = [step for step, _ in list_checkpoints(run_dir / "checkpoints")]
    assert steps == [2, 10, 12]
    # A crash mid-write leaves only a partial, which --resume auto never picks.
    (run_dir / "checkpoints" / ".partial-step-00000014.ckpt").write_bytes(b"half")
    assert RunDir(run_dir, TRAINING_CHECKPOINTS).resolve_resume("auto").name == "step-00000012.ckpt"
    with pytest.raises(UserError, match=r"--resume none: .* already holds checkpoints .*step 12"):
        RunDir(run_dir, TRAINING_CHECKPOINTS).resolve_resume("none")  # a new run would mix with this one
    assert RunDir(tmp_path / "empty", TRAINING_CHECKPOINTS).resolve_resume("none") is None
    checkpoint = torch.load(run_dir / "checkpoints" / "step-00000012.ckpt", weights_only=False)
    info = checkpoint["pretrain"]
    assert info["model_config"]["dim"] == 64 and info["tokens_seen"] == 12 * 1024
    assert info["tokenizer"] and checkpoint["PretrainDataModule"]["fingerprint"]


def slow_background_writes(monkeypatch, seconds: float, observe=None) -> list:
    """Make each background checkpoint write take `seconds` longer (training goes on meanwhile);
    `observe(path)` runs in the writer thread as the write starts; what it returns is collected."""
    from pretrain.train.callbacks import checkpoint_writer

    real, seen = checkpoint_writer._save_file, []

    def slow(checkpoint, path):
        seen.append(observe(path) if observe else path)
        time.sleep(seconds)
        real(checkpoint, path)

    monkeypatch.setattr(checkpoint_writer, "_save_file", slow)
    return seen


def test_an_asynchronous_checkpoint_holds_the_state_of_its_step(tiny_dataset, tmp_path, monkeypatch):
    """The staged copy is taken at the step boundary: written while later steps change the weights,
    an asynchronous checkpoint equals a synchronous one of the same step, tensor by tensor."""
    checkpoints = {}
    for mode in ("false", "true"):
        run_dir = tmp_path / f"async-{mode}"
        config = recipe(
            tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 2}
        )
        if mode == "true":
            slow_background_writes(monkeypatch, 0.5)
        assert main(["fit", "--config", str(config), "--checkpoint.async_save", mode]) == 0
        checkpoints[mode] = [
            torch.load(run_dir / "checkpoints" / f"step-{step:08d}.ckpt", weights_only=False)
            for step in (2, 4)
        ]
    for sync, background in zip(checkpoints["false"], checkpoints["true"]):
        assert sync["global_step"] == background["global_step"]
        assert sync["state_dict"].keys() == background["state_dict"].keys()
        for name, tensor in sync["state_dict"].items():
            assert torch.equal(tensor, background["state_dict"][name]), name
        for (_, a), (_, b) in zip(
            sync["optimizer_states"][0]["state"].items(), background["optimizer_states"][0]["state"].items()
        ):
            assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_checkpoint_in_flight_is_never_listed_and_never_leaves_zero_complete_ones(
    tiny_dataset, tmp_path, monkeypatch
):
    """keep_last 1 and a checkpoint every step, each write slowed: while one is written, the
    previous complete one is still there, the partial is not listed, and training goes on."""
    run_dir = tmp_path / "in-flight"
    folder = run_dir / "checkpoints"

    def observe(partial: Path) -> tuple:
        """What is listed as the write starts; whether the loop logs the step's row meanwhile."""
        listed = [step for step, _ in list_checkpoints(folder)]
        step, deadline = int(partial.name.split("-")[2].split(".")[0]), time.monotonic() + 60
        while logged_steps(run_dir) < step and time.monotonic() < deadline:  # blocked if written in the loop
            time.sleep(0.01)
        return partial.name, listed, logged_steps(run_dir) >= step

    seen = slow_background_writes(monkeypatch, 0.0, observe)
    finished, teardown = [], PeriodicCheckpoint.teardown

    def keep(self, *args, **kwargs):
        finished.append(self)
        teardown(self, *args, **kwargs)

    monkeypatch.setattr(PeriodicCheckpoint, "teardown", keep)
    config = recipe(
        tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 1, "keep_last": 1}
    )
    assert main(["fit", "--config", str(config), "--checkpoint.async_save", "true"]) == 0
    assert [(name, listed) for name, listed, _ in seen] == [
        (".partial-step-00000001.ckpt", []),
        (".partial-step-00000002.ckpt", [1]),
        (".partial-step-00000003.ckpt", [2]),
        (".partial-step-00000004.ckpt", [3]),
    ]
    assert [step for step, _ in list_checkpoints(folder)] == [4] and not list(folder.glob(".partial-*"))
    # Each write overlapped training: the loop went on to log the step's row while it was in flight.
    assert all(went_on for *_, went_on in seen)
    (checkpoint,) = finished
    assert checkpoint.saves == 4 and checkpoint.stall_seconds > 0


def test_a_write_in_flight_at_a_divergence_is_let_end_and_removed(tmp_path, capsys):
    """A rollback goes back to a published checkpoint: the write still in flight belongs to the
    abandoned path, so it ends (no thread outlives `fit`) and its partial is removed, nothing else."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from pretrain.train.callbacks.periodic_checkpoint import PendingWrite

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-00000004.ckpt").write_bytes(b"published")
    partial = folder / ".partial-step-00000008.ckpt"

    def write() -> None:
        time.sleep(0.3)
        partial.write_bytes(b"late")

    checkpoint = PeriodicCheckpoint(run_dir=tmp_path / "run", async_save=True)
    module = SimpleNamespace(divergence=SimpleNamespace(action="rollback"))
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(barrier=lambda name: None), is_global_zero=True, lightning_module=module
    )
    with ThreadPoolExecutor(max_workers=1) as executor:
        checkpoint._pending = PendingWrite(folder / "step-00000008.ckpt", partial, executor.submit(write))
        checkpoint.on_train_end(trainer, module)  # type: ignore[arg-type]
    assert [p.name for p in folder.iterdir()] == ["step-00000004.ckpt"]
    assert "divergence: discarded step-00000008.ckpt, still being written" in capsys.readouterr().err
    assert checkpoint.stall_seconds >= 0.25  # waiting for the write blocked the loop


def test_checkpoints_are_not_staged_in_tmpdir(tiny_dataset, tmp_path, monkeypatch):
    """A small or unusable $TMPDIR (a RAM-backed /tmp on a cluster) must not matter: checkpoints are
    written beside their destination."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    run_dir = tmp_path / "tmpdir"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 2})
    assert main(["fit", "--config", str(config)]) == 0
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]
    assert load_model_checkpoint(run_dir / "checkpoints" / "step-00000004.ckpt").meta["global_step"] == 4


@contextlib.contextmanager
def small_filesystem(path: Path, size: str, monkeypatch):
    """A real tmpfs of `size` at `path` where this process may mount one (root, as in CI); elsewhere
    torch's zip writer is made to fail as it does on a full disk (a RuntimeError without an errno)
    and the filesystem to report no free space."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode == 0:
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(path)], check=True)
        return
    from pretrain.train.callbacks import periodic_checkpoint

    real_save, saves = torch.save, []

    def save_until_full(obj, target, *args, **kwargs):
        saves.append(target)
        if len(saves) > 1:
            Path(target).write_bytes(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(periodic_checkpoint.torch, "save", save_until_full)
    monkeypatch.setattr(periodic_checkpoint.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    yield "simulated"


@pytest.mark.slow
def test_a_real_full_disk_in_torchs_zip_writer_is_one_line_without_a_partial(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    """torch.save on a full filesystem raises RuntimeError("... unexpected pos ..."), no OSError."""
    run_dir = tmp_path / "full"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 2})
    with small_filesystem(run_dir / "checkpoints", "2500k", monkeypatch):  # one checkpoint fits (~1.7 MB)
        assert main(["fit", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "no space left on the device writing checkpoint" in err and "Traceback" not in err
        assert "the partial file is removed and the earlier checkpoints are intact" in err
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002.ckpt"]


def test_a_file_under_a_run_checkpoint_name_that_the_run_did_not_write_is_set_aside(
    tiny_dataset, tmp_path, capsys
):
    """`pretrain average A B -o B` is refused; a model file copied in as step-N.ckpt never stands in
    for the run's own checkpoint: it is set aside and the run writes its own."""
    run_dir = tmp_path / "run"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 2})
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "2"]) == 0
    step2 = run_dir / "checkpoints" / "step-00000002.ckpt"
    before = step2.read_bytes()
    assert main(["average", str(step2), str(step2), "-o", str(step2)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err and step2.read_bytes() == before
    step4 = run_dir / "checkpoints" / "step-00000004.ckpt"
    assert main(["average", str(step2), "-o", str(step4)]) == 2
    assert "a run's checkpoint name in a checkpoints folder" in capsys.readouterr().err
    assert main(["average", str(step2), "-o", str(tmp_path / "model.pt")]) == 0
    shutil.copy(tmp_path / "model.pt", step4)  # as a sync tool or a careless cp would
    assert main(["fit", "--config", str(config)]) == 0
    assert "step-00000004.ckpt: not written by this run; set aside as" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "foreign-step-00000004.ckpt").read_bytes() == (
        tmp_path / "model.pt"
    ).read_bytes()
    assert load_model_checkpoint(step4).meta["global_step"] == 4  # the run's own


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_earlier_checkpoints(
    tiny_dataset, tmp_path, monkeypatch, capsys, async_save
):
    """Also when the write fails in the background (`async_save`): the error surfaces at the next
    step boundary (here the end of training) as the same one line."""
    import errno
    import threading

    from pretrain.train.callbacks import periodic_checkpoint

    real_save, saves, threads = torch.save, [], []

    def save_until_full(obj, path, *args, **kwargs):
        saves.append(path)
        threads.append(threading.current_thread() is threading.main_thread())
        if len(saves) > 1:
            Path(path).write_bytes(b"half")  # the disk fills up mid-write
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(periodic_checkpoint.torch, "save", save_until_full)
    run_dir = tmp_path / "full"
    config = recipe(
        tmp_path,
        tiny_dataset,
        run_dir,
        trainer__max_steps=4,
        checkpoint={"every_n_steps": 2, "async_save": async_save == "true"},
    )
    assert main(["fit", "--config", str(config)]) == 2
    assert threads[1] == (async_save == "false")  # the failing write ran in the background thread
    err = capsys.readouterr().err
    assert "no space left on the device writing checkpoint" in err and "step-00000004.ckpt" in err
    assert "earlier checkpoints are intact (newest: " in err and "step-00000002.ckpt" in err
    assert "Traceback" not in err
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002.ckpt"]  # no partial left
    monkeypatch.setattr(periodic_checkpoint.torch, "save", real_save)
    assert main(["fit", "--config", str(config)]) == 0  # space freed: resumes from step 2
    assert sorted(train_losses(run_dir)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "change,field",
    [
        (["--data.seed", "7"], "data.seed 42 -> 7"),
        (["--data.global_batch_tokens", "2048"], "data.global_batch_tokens 1024 -> 2048"),
        (["--data.seq_len", "32", "--data.global_batch_tokens", "1024"], "data.seq_len 64 -> 32"),
    ],
)
def test_resume_refuses_a_changed_data_order_unless_allowed(tiny_dataset, tmp_path, capsys, change, field):
    run_dir = tmp_path / "order-change"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 4})
    assert main(["fit", "--config", str(config)]) == 0
    capsys.readouterr()
    longer = ["--trainer.max_steps", "6"]
    assert main(["fit", "--config", str(config), *longer, *change]) == 2
    err = capsys.readouterr().err
    assert "data order changed" in err and field in err and "--data.allow_data_change true" in err
    assert main(["fit", "--config", str(config), *longer, *change, "--data.allow_data_change", "true"]) == 0
    assert sorted(train_losses(run_dir)) == list(range(6))


def test_resume_refuses_changed_data_unless_allowed(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "data-change"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=4)
    assert main(["fit", "--config", str(config)]) == 0
    # A different dataset under the same source name: first 60 documents only.
    corpus = tmp_path / "changed.jsonl"
    corpus.write_text("".join((tiny_dataset.parent / "corpus.jsonl").read_text().splitlines(True)[:60]))
    changed = tmp_path / "changed"
    tokenizer = str(tiny_dataset / "tokenizer.json")
    prepare = ["data", "prepare", "--input", str(corpus), "--tokenizer", tokenizer, "--output", str(changed)]
    assert main(prepare + ["--val-fraction", "0.1", "--num-proc", "1"]) == 0
    capsys.readouterr()
    override = [
        "--data.sources",
        f'{{"stdlib": {{"path": "{changed}", "weight": 1.0}}}}',
        "--trainer.max_steps",
        "8",
    ]
    assert main(["fit", "--config", str(config), *override]) == 2
    assert "training data changed since this checkpoint" in capsys.readouterr().err
    # The same documents under another tokenizer: named as such.
    retokenized, other_tokenizer = tmp_path / "retokenized", str(tmp_path / "other.json")
    train = [
        "data",
        "train-tokenizer",
        "--input",
        str(corpus),
        "--vocab-size",
        "400",
        "--output",
        other_tokenizer,
    ]
    assert main(train) == 0
    prepare = [
        "data",
        "prepare",
        "--input",
        str(corpus),
        "--tokenizer",
        other_tokenizer,
        "--output",
        str(retokenized),
    ]
    assert main(prepare + ["--val-fraction", "0.1", "--num-proc", "1"]) == 0
    capsys.readouterr()
    other = ["--data.sources", json.dumps({"stdlib": {"path": str(retokenized), "weight": 1.0}})]
    assert main(["fit", "--config", str(config), *other, "--trainer.max_steps", "8"]) == 2
    assert "tokenized with another tokenizer than this checkpoint was trained on" in capsys.readouterr().err
    assert main(["fit", "--config", str(config), *override, "--data.allow_data_change", "true"]) == 0
    assert sorted(train_losses(run_dir)) == list(range(8))


def test_vocab_smaller_than_tokenizer_is_a_clear_error(tiny_dataset, tmp_path, capsys):
    config = recipe(
        tmp_path,
        tiny_dataset,
        tmp_path / "vocab",
        model={"model": "tiny", "model_overrides": {**MODEL, "vocab_size": 300}},
    )
    assert main(["fit", "--config", str(config)]) == 2
    assert "tokenizer has 512 tokens but the model's vocab_size is 300" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe_path",
    sorted(str(p) for p in Path(__file__).parents[1].glob("pretrain/recipes/**/*.yaml")),
    ids=Path,
)
def test_every_shipped_recipe_parses(recipe_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe_path, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    assert yaml.safe_load(capsys.readouterr().out)["model"]["model"]


def test_batch_geometry_and_config_errors(tiny_dataset, tmp_path, capsys):
    config = recipe(tmp_path, tiny_dataset, tmp_path / "geometry")
    assert main(["fit", "--config", str(config), "--data.global_batch_tokens", "1280"]) == 2
    assert "must be a multiple of micro_batch_size x seq_len" in capsys.readouterr().err
    assert (
        main(["fit", "--config", str(config), "--model.learning_rate", "3"]) == 2
    )  # one line, no usage dump
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["global_batch_tokens"] == 1024 and printed["model"]["model"] == "tiny"
    assert main(["fit", "--config", str(config), "--resume", str(tmp_path / "nope.ckpt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


class PoisonGradients(L.Callback):
    """Makes the gradients of the given optimizer steps non-finite."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.params_before: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.params_before[step] = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])
        if step in self.steps:
            next(pl_module.parameters()).grad[0] = float("nan")


def test_pretrain_fit_stops_on_nonfinite_steps_with_exit_code_3(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    config = recipe(tmp_path, tiny_dataset, run_dir)
    poison = {"class_path": "test_train.PoisonGradients", "init_args": {"steps": [3, 4]}}
    args = ["--model.max_bad_steps", "2", "--trainer.callbacks+", json.dumps(poison)]
    assert main(["fit", "--config", str(config), *args]) == 3
    err = capsys.readouterr().err
    assert "step 3: skipped, a non-finite loss or gradient" in err and "step 4: skipped" in err
    assert "divergence from step 3 (2 steps in a row with a non-finite loss or gradient)" in err
    assert "no checkpoint from before step 3 exists to roll back to" in err
    # The state at the stop is kept for inspection under a name --resume auto never picks.
    assert list_checkpoints(run_dir / "checkpoints") == []
    assert (run_dir / "checkpoints" / "diverged-step-00000005.ckpt").is_file()
    assert [entry["action"] for entry in RunDir(run_dir).incidents()] == ["stop"]


def test_a_learning_rate_raised_mid_run_rolls_back_then_stops_and_the_same_command_resumes(
    tiny_dataset, tmp_path, capsys
):
    """The LR jumps x10,000 at step 16: the next step spikes and the weights jumped, so the guard
    judges a divergence at once and rolls back to the kept checkpoint (keep_last 1), max_rollbacks
    times; the LR is still in force, so the run stops naming that checkpoint. The same command with
    a sane LR then resumes from it (no --resume PATH) and finishes."""
    run_dir = tmp_path / "lr-jump"

    def schedule(factor: float) -> dict:
        args = {"max_lr": 3e-3, "warmup_steps": 3, "boundaries": [0.67], "factors": [factor]}
        return {"class_path": "pretrain.train.schedules.MultiStep", "init_args": args}

    model = {"model": "tiny", "model_overrides": MODEL, "lr_schedule": schedule(1e4)}
    checkpoints = {"every_n_steps": 2, "keep_last": 1}
    config = recipe(
        tmp_path, tiny_dataset, run_dir, trainer__max_steps=24, model=model, checkpoint=checkpoints
    )
    args = ["--model.max_bad_steps", "3", "--model.max_rollbacks", "2"]
    assert main(["fit", "--config", str(config), *args]) == 3
    err = capsys.readouterr().err
    kept = run_dir / "checkpoints" / "step-00000016.ckpt"
    assert err.count(f"rolled back to {kept} (step 16)") == 2
    assert "changed the weight norm by" in err and "the learning rate is too large" in err
    assert "divergence from step 17" in err and "2 rollbacks in a row did not get past it" in err
    assert f"the same command resumes from {kept}" in err
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [16]  # kept; the stop aside
    incidents = RunDir(run_dir).incidents()
    assert [entry["action"] for entry in incidents] == ["rollback", "rollback", "stop"]
    assert all(entry["steps"] == [17, 17] for entry in incidents)  # detected at the first bad step
    losses = train_losses(run_dir)
    sane = recipe(
        tmp_path,
        tiny_dataset,
        run_dir,
        trainer__max_steps=24,
        checkpoint=checkpoints,
        model=model | {"lr_schedule": schedule(1.0)},
    )
    assert main(["fit", "--config", str(sane)]) == 0
    assert f"resuming from {kept}" in capsys.readouterr().err
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(24))
    assert all(math.isfinite(resumed[s]) and resumed[s] < losses[15] + 0.5 for s in range(16, 24))


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tiny_dataset, tmp_path):
    from pretrain.train.datamodule import PretrainDataModule, Source
    from pretrain.train.module import PretrainModule

    module = PretrainModule(model="tiny", model_overrides=MODEL, max_bad_steps=3)
    data = PretrainDataModule(
        {"stdlib": Source(str(tiny_dataset))},
        seq_len=64,
        global_batch_tokens=1024,
        micro_batch_size=8,
        num_workers=0,
    )
    poison = PoisonGradients({2, 5, 6, 7})
    checkpoints = PeriodicCheckpoint(tmp_path, every_n_steps=None)
    trainer = bare_trainer(
        max_steps=20,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        callbacks=[poison, checkpoints],
    )
    trainer.fit(module, datamodule=data)
    params = poison.params_before
    # Step 2 was skipped: parameters after it equal those before it. Step 3 (finite) changed them.
    assert torch.equal(params[2], params[3]) and not torch.equal(params[3], params[4])
    # Steps 5, 6, 7 non-finite in a row -> stopped after step 7 with the last good weights saved.
    assert (
        module.skipped_steps == 4
        and module.stop_reason
        and "3 steps in a row with a non-finite loss or gradient" in module.stop_reason
    )
    assert trainer.global_step == 8
    saved = load_model_checkpoint(tmp_path / "checkpoints" / "diverged-step-00000008.ckpt")
    good = torch.cat([v.flatten() for v in saved.state_dict.values()])
    assert torch.isfinite(good).all()
    assert torch.equal(torch.sort(good).values, torch.sort(params[5]).values)
