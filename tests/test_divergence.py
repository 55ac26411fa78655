"""Self-healing runs: the spike guard's rule (spikes, new levels, divergences), the skip list,
incidents, automatic rollback (one process, two FSDP2 processes, killed right after a rollback),
continual stages through every door without a skipped step, and --resume auto never resuming into
a known-bad state."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MODEL, PRETRAIN, recipe, run, train_losses

from pretrain.cli import main
from pretrain.data.loader import build_train_dataset
from pretrain.data.shards import content_fingerprint, load_manifest, sha256_file
from pretrain.data.skips import SkipList
from pretrain.data.tokens import TokenStream
from pretrain.errors import UserError
from pretrain.files import write_json_atomic
from pretrain.run_dir import RunDir, list_checkpoints
from pretrain.run_dir.goodput import read_goodput, record_path
from pretrain.train.callbacks.periodic_checkpoint import TRAINING_CHECKPOINTS
from pretrain.train.spike_guard import SpikeGuard

# ---- the guard's rule ------------------------------------------------------------------------------


def primed(guard: SpikeGuard, steps: int = 20, loss: float = 3.0, norm: float = 1.0) -> int:
    """Feed `steps` ordinary steps (small noise, weights moving 0.1% a step); the next step number."""
    rng = np.random.default_rng(0)
    for step in range(steps):
        noise = rng.standard_normal(2)
        judgment = guard.judge(step, loss + 0.02 * noise[0], norm + 0.05 * noise[1], 100.0 * 1.001**step)
        assert not judgment.skip
    return steps


def test_a_gradient_norm_outlier_with_a_normal_loss_is_kept_and_counted():
    guard = SpikeGuard(vocab_size=512)
    step = primed(guard)
    judgment = guard.judge(step, 3.0, 50.0, 100.0 * 1.001**step)
    assert judgment.grad_norm_outlier and not judgment.skip and not judgment.message


def test_a_transient_loss_spike_is_skipped_in_one_line_and_the_run_goes_on():
    guard = SpikeGuard(vocab_size=512)
    step = primed(guard)
    judgment = guard.judge(step, 4.0, 1.0, 100.0 * 1.001**step)
    assert judgment.skip and judgment.verdict is None
    assert judgment.message.startswith(f"step {step}: skipped, a loss spike (4, z-score")
    assert guard.suspect_since == step
    assert not guard.judge(step + 1, 3.0, 1.0, 100.0 * 1.001**step).skip  # back to normal: streak over
    assert guard.suspect_since is None


def test_a_flat_new_level_is_accepted_after_patience_steps_and_becomes_the_history():
    guard = SpikeGuard(vocab_size=512, patience=5)
    step = primed(guard)
    verdicts = [
        guard.judge(step + i, 4.5 + 0.01 * i % 2, 1.0, 100.0 * 1.001 ** (step + i)).verdict for i in range(5)
    ]
    assert verdicts == [None, None, None, None, "new level"]
    assert guard.suspect_since is None and len(guard.history) == 5
    assert not guard.judge(
        step + 5, 4.5, 1.0, 100.0 * 1.001 ** (step + 5)
    ).skip  # judged against the new level now


def test_a_streak_no_better_than_chance_is_a_divergence():
    guard = SpikeGuard(vocab_size=512, patience=3)
    step = primed(guard)
    worse_than_uniform = math.log(512) + 0.5
    verdicts = [
        guard.judge(step + i, worse_than_uniform, 1.0, 100.0 * 1.001 ** (step + i)).verdict for i in range(3)
    ]
    assert verdicts == [None, None, "divergence"]


def test_a_weight_jump_before_a_spike_is_a_divergence_at_the_first_bad_step():
    guard = SpikeGuard(vocab_size=512, patience=10)
    step = primed(guard)
    judgment = guard.judge(step, 5.0, 1.0, 100.0 * 1.001**step * 3)  # the last update tripled the norm
    assert judgment.skip and judgment.verdict == "divergence"
    assert "changed the weight norm by 200%" in judgment.message


def test_a_small_bump_in_a_smooth_history_is_not_a_spike():
    guard = SpikeGuard(vocab_size=512)
    for step in range(20):
        guard.judge(step, 3.0 + 1e-4 * (step % 2), 1.0, 100.0)  # std 5e-5: a 6-sigma rule alone would fire
    assert not guard.judge(20, 3.02, 1.0, 100.0).skip  # under 1% of the mean


def test_the_guard_state_round_trips_and_restart_forgets():
    guard = SpikeGuard(vocab_size=512)
    step = primed(guard)
    guard.judge(step, 4.0, 1.0, 100.0)
    copy = SpikeGuard(vocab_size=512)
    copy.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert copy.state_dict() == guard.state_dict()
    copy.restart()
    assert not copy.history and copy.suspect_since is None and not copy.judge(0, 9.0, 9.0, 1.0).skip


# ---- the skip list ---------------------------------------------------------------------------------


def test_the_skip_list_maps_stream_positions_past_skipped_ranges():
    skips = SkipList([(10, 20)])
    assert skips.index(np.arange(12)).tolist() == [*range(10), 20, 21]
    # A second rollback, from position 12 back to 5: the range read there joins (and merges).
    second = skips.union(SkipList([skips.skip_positions(5, 12)]))
    assert second.ranges == [(5, 22)] and second.index(np.arange(7)).tolist() == [0, 1, 2, 3, 4, 22, 23]
    assert SkipList([(5, 8), (7, 12), (20, 21)]).ranges == [(5, 12), (20, 21)]
    assert second.skipped_before(30) == 17
    with pytest.raises(ValueError):
        SkipList([(3, 3)])


# ---- incidents and --resume auto -------------------------------------------------------------------


@pytest.mark.parametrize("damage", [b"\xff\xfe garbage", b"42\n", b'{"action": "rollback", "skip": [5]}\n'])
def test_a_damaged_incidents_file_stops_training_in_one_line_and_status_reads_past_it(tmp_path, damage):
    run_dir = RunDir(tmp_path)
    run_dir.incidents_file.write_bytes(damage)
    with pytest.raises(UserError, match="incidents.jsonl"):
        run_dir.skipped_samples()
    assert run_dir.incidents(strict=False) == []


def test_every_checkpoint_damaged_is_one_line_nothing_renamed_and_resume_none_starts_over(tmp_path, capsys):
    run_dir = RunDir(tmp_path, TRAINING_CHECKPOINTS)
    run_dir.checkpoints.mkdir()
    for step, damage in ((4, b""), (8, b"PK\x03\x04 truncated")):
        run_dir.checkpoint(step).write_bytes(damage)
    with pytest.raises(UserError) as error:
        run_dir.resolve_resume("auto", set_aside=True)
    message = str(error.value)
    assert "no usable checkpoint" in message and "step-00000004.ckpt (an empty file)" in message
    assert "--resume none" in message
    assert [step for step, _ in run_dir.list_checkpoints()] == [4, 8]  # nothing renamed or deleted
    assert run_dir.resolve_resume("none", set_aside=True) is None  # deliberately: set aside, start over
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == [
        "damaged-step-00000004.ckpt",
        "damaged-step-00000008.ckpt",
    ]


# ---- datasets for the training tests -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shifted_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """Another corpus, tokenized with the same tokenizer: base64 text (nothing like Python source,
    though learnable: a large domain shift for a model trained on the stdlib)."""
    root = tmp_path_factory.mktemp("shifted")
    rng = np.random.default_rng(0)
    with open(root / "base64.jsonl", "w") as f:
        for _ in range(300):
            text = base64.encodebytes(rng.bytes(3000)).decode()
            f.write(json.dumps({"text": text}) + "\n")
    args = ["data", "prepare", "--input", str(root / "base64.jsonl"), "--output", str(root / "out")]
    tokenizer = str(tiny_dataset / "tokenizer.json")
    assert main([*args, "--tokenizer", tokenizer, "--val-fraction", "0.1", "--num-proc", "1"]) == 0
    return root / "out"


POISONED_STEPS = range(20, 24)
BATCH = 16  # sequences per optimizer step in the helpers' recipe (1024 tokens / 64)


def poison(clean: Path, out: Path, steps: range, seed: int = 42) -> list[dict]:
    """A copy of `clean` whose windows read at `steps` (by the default data order) are uniformly random
    tokens (no better than chance for any model); returns where those samples lie."""
    shutil.copytree(clean, out)
    manifest = load_manifest(out)
    dataset = build_train_dataset(
        {"stdlib": str(out)}, seq_len=64, global_batch_size=BATCH, micro_batch_size=8, seed=seed
    )
    origins = dataset.origins(steps.start * BATCH, steps.stop * BATCH)
    stream = TokenStream(manifest, "train")
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for sample in origins:
        shard_start = stream.starts[[str(p.relative_to(out)) for p in stream.paths].index(sample["shard"])]
        for position in range(shard_start + sample["offset"], shard_start + sample["offset"] + 65):
            shard, offset = stream.locate(position)
            array = arrays.setdefault(shard, np.fromfile(out / shard, dtype=manifest.dtype))
            array[offset] = rng.integers(0, 512)
    data = json.loads((out / "manifest.json").read_text())
    for shard, array in arrays.items():
        array.tofile(out / shard)
        sidecar = (out / shard).with_suffix(".json")
        if sidecar.is_file():
            write_json_atomic(sidecar, json.loads(sidecar.read_text()) | {"sha256": sha256_file(out / shard)})
        for entry in data["splits"]["train"]["shards"]:
            if entry["file"] == shard:
                entry["sha256"] = sha256_file(out / shard)
    splits = {name: split["shards"] for name, split in data["splits"].items()}
    data["content_fingerprint"] = content_fingerprint(splits, data["tokenizer"]["fingerprint"], data["dtype"])
    write_json_atomic(out / "manifest.json", data)
    return origins


@pytest.fixture(scope="module")
def poisoned(tiny_dataset, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("poisoned") / "data"
    return out, poison(tiny_dataset, out, POISONED_STEPS)


def poisoned_recipe(tmp_path: Path, dataset: Path, run_dir: Path, **changes) -> Path:
    model = {"model": "tiny", "model_overrides": MODEL, "max_bad_steps": 4, "rollback_skip_margin": 4}
    return recipe(
        tmp_path,
        dataset,
        run_dir,
        trainer__max_steps=40,
        model=recipe_model() | model,
        checkpoint={"every_n_steps": 4, "keep_last": 2},
        **changes,
    )


def recipe_model() -> dict:
    return {
        "lr_schedule": {
            "class_path": "pretrain.train.schedules.WarmupCosine",
            "init_args": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
        }
    }


def lr_by_step(run_dir: Path) -> dict[int, float]:
    series = RunDir(run_dir).read_logs().series["train/lr"]
    return dict(zip(series.steps.tolist(), series.values.tolist(), strict=True))


def last_val_loss(run_dir: Path) -> float:
    log = RunDir(run_dir).read_logs()
    return float(log.series["val/stdlib/loss"].values[-1])


# ---- rollback --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_poisoned_window_is_rolled_back_and_skipped_and_the_run_finishes(
    tiny_dataset, poisoned, tmp_path, capsys
):
    dataset, origins = poisoned
    run_dir = tmp_path / "healed"
    config = poisoned_recipe(tmp_path, dataset, run_dir)
    assert main(["fit", "--config", str(config), "--model.rollback_lr_scale", "0.5"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped, a loss spike") == 4  # the 4 poisoned steps, and no other
    assert "no better than guessing uniformly" in err
    assert "rolled back to" in err and "(step 16) and skipping global samples [256, 448)" in err
    (incident,) = RunDir(run_dir).incidents()
    assert incident["action"] == "rollback" and incident["steps"] == [20, 23]
    assert incident["skip"] == [256, 448] and incident["checkpoint"]["step"] == 16
    recorded = [sample for step in incident["bad_samples"] for sample in step["samples"]]
    assert recorded == origins  # each bad sample's source, shard and token offset
    # The text of a recorded sample is one command away.
    sample = recorded[0]
    assert (
        main(["data", "show", str(dataset), "--shard", sample["shard"], "--offset", str(sample["offset"])])
        == 0
    )
    assert f"{sample['shard']} tokens [{sample['offset']:,}" in capsys.readouterr().out
    # Against the same data without the poisoned region: the same quality.
    clean = tmp_path / "clean"
    assert main(["fit", "--config", str(poisoned_recipe(tmp_path, tiny_dataset, clean))]) == 0
    assert abs(last_val_loss(run_dir) - last_val_loss(clean)) < 0.15
    # The re-done steps 16-27 ran at half the schedule's LR, the rest at the schedule's.
    lrs, clean_lrs = lr_by_step(run_dir), lr_by_step(clean)
    assert all(lrs[s] == pytest.approx(clean_lrs[s] * (0.5 if 16 <= s < 28 else 1.0)) for s in range(40))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(40)) and all(math.isfinite(v) for v in losses.values())
    status = subprocess.run([PRETRAIN, "status", str(run_dir)], capture_output=True, text=True)
    assert (
        "divergence  0 step(s) skipped on the path kept, 1 rollback(s) (of 4 bad step(s)), 0 stop(s)"
        in status.stdout
    )
    assert "samples [256, 448) skipped" in status.stdout
    # Lost work: the steps done past the rollback checkpoint (logged by version 0 before the rollback).
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        redone = {int(row["step"]) + 1 for row in csv.DictReader(f) if row.get("train/loss")} - set(range(17))
    (launch,) = read_goodput(run_dir).launches
    (rolled,) = json.loads(record_path(run_dir, 0).read_text())["rollbacks"]
    assert (rolled["from_step"], rolled["to_step"]) == (16 + len(redone), 16) and rolled["seconds"] > 0
    assert launch.lost_steps == len(redone) > 0 and launch.lost_seconds == rolled["seconds"]


@pytest.mark.slow
def test_on_divergence_stop_stops_and_the_same_command_resumes_from_the_kept_checkpoint(
    poisoned, tmp_path, capsys
):
    dataset, _ = poisoned
    run_dir = tmp_path / "stopping"
    config = poisoned_recipe(tmp_path, dataset, run_dir)
    assert main(["fit", "--config", str(config), "--model.on_divergence", "stop"]) == 3
    err = capsys.readouterr().err
    kept = run_dir / "checkpoints" / "step-00000016.ckpt"
    assert (
        "stopped because model.on_divergence is stop" in err
        and f"the same command resumes from {kept}" in err
    )
    assert [entry["action"] for entry in RunDir(run_dir).incidents()] == ["stop"]
    assert (run_dir / "checkpoints" / "diverged-step-00000024.ckpt").is_file()
    assert main(["fit", "--config", str(config)]) == 0  # rollback now: heals from the kept checkpoint
    err = capsys.readouterr().err
    assert f"resuming from {kept}" in err and "rolled back to" in err


@pytest.mark.slow
def test_every_checkpoint_of_a_run_damaged_stops_fit_in_one_line_and_deletes_nothing(
    tiny_dataset, tmp_path, capsys
):
    run_dir = tmp_path / "damaged"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 2})
    assert main(["fit", "--config", str(config)]) == 0
    for _, path in list_checkpoints(run_dir / "checkpoints"):
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "--resume none" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before
    assert main(["fit", "--config", str(config), "--resume", "none"]) == 0  # deliberately over
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("damaged-*")) == [
        "damaged-step-00000002.ckpt",
        "damaged-step-00000004.ckpt",
    ]


def test_the_skip_list_is_the_same_global_order_on_any_number_of_ranks_and_travels_in_checkpoints(
    tiny_dataset,
):
    from pretrain.train.datamodule import PretrainDataModule, Source

    skips = SkipList([(40, 100), (130, 150)])
    read = {}
    for world in (1, 2, 4):
        samples: list[int] = []
        for rank in range(world):
            dataset = build_train_dataset(
                {"stdlib": str(tiny_dataset)},
                seq_len=64,
                global_batch_size=BATCH,
                micro_batch_size=4,
                rank=rank,
                world_size=world,
                start_sample=2 * BATCH,
                skips=skips,
            )
            micro_batches = np.arange(dataset.first, dataset.first + 8 * BATCH // (world * 4))
            samples += dataset.skips.index(dataset.layout.sample_indices(micro_batches)).ravel().tolist()
        read[world] = sorted(samples)
    assert read[1] == read[2] == read[4]
    assert read[1][:8] == [*range(32, 40)] and read[1][8] == 100 and 130 not in read[1]
    assert len(read[1]) == 8 * BATCH and read[1][-1] == 239
    data = PretrainDataModule({"stdlib": Source(str(tiny_dataset))}, seq_len=64, global_batch_tokens=1024)
    data.skips = skips
    branch = PretrainDataModule({"stdlib": Source(str(tiny_dataset))}, seq_len=64, global_batch_tokens=1024)
    branch.load_state_dict(data.state_dict())  # what a resume or branch_from reads from a checkpoint
    assert branch.skips == skips


@pytest.mark.slow
def test_a_run_killed_right_after_a_rollback_resumes_bit_identical(poisoned, tmp_path):
    dataset, _ = poisoned
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run(["fit", "--config", str(poisoned_recipe(tmp_path, dataset, uninterrupted))])
    config = poisoned_recipe(tmp_path, dataset, killed)
    process = subprocess.Popen(
        [PRETRAIN, "fit", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not RunDir(killed).incidents_file.exists():
        assert process.poll() is None and time.monotonic() < deadline, "no rollback happened"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run(["fit", "--config", str(config)])  # the same command, as a requeue runs it
    assert train_losses(killed) == train_losses(uninterrupted)
    assert RunDir(killed).incidents()[0]["skip"] == RunDir(uninterrupted).incidents()[0]["skip"]
    assert len(RunDir(killed).incidents()) == 1


@pytest.mark.slow
def test_two_fsdp2_processes_roll_back_alike(poisoned, tmp_path):
    dataset, _ = poisoned
    run_dir = tmp_path / "fsdp2"
    config = poisoned_recipe(tmp_path, dataset, run_dir, trainer__devices=2, trainer__strategy="fsdp2")
    result = run(["fit", "--config", str(config)], timeout=400)
    assert result.stderr.count("rolled back to") == 1
    (incident,) = RunDir(run_dir).incidents()
    assert incident["steps"] == [20, 23] and incident["skip"] == [256, 448]
    assert sorted(train_losses(run_dir)) == list(range(40))


# ---- continual stages: no skipped step, no rollback ----------------------------------------------------


@pytest.fixture(scope="module")
def stage_one(tiny_dataset, tmp_path_factory) -> Path:
    """A run trained 60 steps on the stdlib corpus, its guard judging by the last 20 steps (a settled
    loss: the old guard's history), checkpoints every 20."""
    tmp = tmp_path_factory.mktemp("stage_one")
    model = {"model": "tiny", "model_overrides": MODEL, "spike_window": 20} | recipe_model()
    config = recipe(
        tmp,
        tiny_dataset,
        tmp / "one",
        trainer__max_steps=60,
        model=model,
        checkpoint={"every_n_steps": 20, "keep_last": 5},
    )
    run(["fit", "--config", str(config)])
    return tmp / "one"


def first_loss_z_against_the_saved_history(checkpoint: Path, loss: float) -> float:
    """How many standard deviations above the checkpoint's saved guard history `loss` lies."""
    history = torch.load(checkpoint, weights_only=True)["pretrain"]["spike_guard"]["history"]
    losses = np.array([entry[0] for entry in history])
    return float((loss - losses.mean()) / losses.std())


def shifted_sources(shifted: Path, old: Path | None = None, ramp: bool = False) -> dict:
    sources = {"shifted": {"path": str(shifted), "weight": 0.9 if old else 1.0}}
    if old:
        sources["stdlib"] = {"path": str(old), "weight": 0.1}
    data = {
        "sources": sources,
        "seq_len": 64,
        "global_batch_tokens": 1024,
        "micro_batch_size": 8,
        "num_workers": 0,
        "val_tokens": 4096,
    }
    if ramp:
        data["ramp"] = {"source": "shifted", "start_share": 0.2, "tokens": 10 * 1024}
    return data


def assert_no_guard_action(run_dir: Path, err: str) -> None:
    assert "skipped," not in err and "rolled back" not in err and "divergence" not in err
    assert not RunDir(run_dir).incidents_file.exists()


@pytest.mark.slow
@pytest.mark.parametrize("door", ["allow_data_change", "branch_from", "init_from", "ramp", "rewarm"])
def test_a_continual_stage_on_another_corpus_skips_nothing(
    door, stage_one, tiny_dataset, shifted_dataset, tmp_path, capsys
):
    checkpoint = stage_one / "checkpoints" / "step-00000060.ckpt"
    run_dir = tmp_path / door
    data = shifted_sources(shifted_dataset, tiny_dataset if door == "ramp" else None, ramp=door == "ramp")
    changes: dict = {"data": data, "trainer__max_steps": 75}
    args: list[str] = []
    if door in ("allow_data_change", "ramp", "rewarm"):
        shutil.copytree(stage_one, run_dir)  # the same run, continued
        data["allow_data_change"] = True
        if door == "rewarm":  # the LR climbs from the cosine's floor back to its peak, on the new data
            changes["model"] = {
                "model": "tiny",
                "model_overrides": MODEL,
                "lr_schedule": {
                    "class_path": "pretrain.train.schedules.WarmupCosine",
                    "init_args": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 70},
                },
            }
    elif door == "branch_from":  # new data in a branch: allowed explicitly, as the recipes say
        changes["branch_from"] = str(checkpoint)
        data["allow_data_change"] = True
    else:
        changes["model"] = {"model": "tiny", "model_overrides": MODEL, "init_from": str(checkpoint)}
        changes["trainer__max_steps"] = 15
    config = recipe(tmp_path, tiny_dataset, run_dir, **changes)
    assert main(["fit", "--config", str(config), *args]) == 0
    err = capsys.readouterr().err
    assert_no_guard_action(run_dir, err)
    if door != "init_from":
        assert "spike guard: history restarts" in err
    # The shift is real: the new stage's first loss lies far above the history the old guard judged by.
    losses = train_losses(run_dir)
    first_new = losses[60] if door != "init_from" else losses[0]
    assert first_loss_z_against_the_saved_history(checkpoint, first_new) > 6
