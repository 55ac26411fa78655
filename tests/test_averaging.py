"""Weight averaging: `pretrain average` (elementwise mean, weighted, LaWA selection, sharded FSDP2
checkpoints equal to their consolidated forms, refusals), the EMA callback (update rule, exact
resume, FSDP2), online LaWA, and the averaging-quality measurement script.

One single-process run and one 2-process FSDP2 run with the EMA and online-LaWA callbacks
(checkpoints every 2 steps, all kept) serve most tests; two resumed runs check exact resume.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import MODEL, bare_trainer, recipe, require, run

from pretrain.cli import main
from pretrain.model import Llama, LlamaConfig
from pretrain.model.average import average_checkpoints, open_checkpoint
from pretrain.model.checkpoint import (
    EMA_STATE_KEY,
    LAWA_STATE_KEY,
    ModelCheckpoint,
    load_model_checkpoint,
    save_model_checkpoint,
)
from pretrain.train.callbacks.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = [
    {"class_path": "pretrain.train.callbacks.ema.EMA", "init_args": {"decay": 0.8}},
    {
        "class_path": "pretrain.train.callbacks.lawa.OnlineLaWA",
        "init_args": {"every_n_steps": 2, "last_k": 3},
    },
]
KEEP_ALL = {"every_n_steps": 2, "keep_last": 2, "pin_every_n_steps": 2}


def averaging_recipe(tmp_path: Path, dataset: Path, run_dir: Path, **changes) -> Path:
    return recipe(tmp_path, dataset, run_dir, checkpoint=KEEP_ALL, trainer__callbacks=CALLBACKS, **changes)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}.ckpt"


def weights(path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    return average_checkpoints([path], ema=ema).state_dict


def validation_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every val*/ metric of a run's first launch."""
    values: dict[str, float] = {}
    with open(run_dir / "logs" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values |= {k: float(v) for k, v in row.items() if k.startswith("val") and v}
    return values


@pytest.fixture(scope="module")
def single(tiny_dataset, tmp_path_factory) -> Path:
    """12 steps in one process with EMA (decay 0.8) and online LaWA (every 2, last 3)."""
    tmp = tmp_path_factory.mktemp("single")
    assert main(["fit", "--config", str(averaging_recipe(tmp, tiny_dataset, tmp / "run"))]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def fsdp(tiny_dataset, tmp_path_factory) -> Path:
    """The same run under FSDP2 over 2 gloo processes (sharded checkpoints)."""
    require("torch.distributed")
    tmp = tmp_path_factory.mktemp("fsdp")
    config = averaging_recipe(tmp, tiny_dataset, tmp / "run", trainer__devices=2, trainer__strategy="fsdp2")
    run(["fit", "--config", str(config)])
    return tmp / "run"


# ---- pretrain average ------------------------------------------------------------------------


def test_average_of_two_checkpoints_is_the_elementwise_mean_weighted_too(single, tmp_path):
    a, b = weights(ckpt(single, 2)), weights(ckpt(single, 12))
    assert (
        main(["average", str(ckpt(single, 2)), str(ckpt(single, 12)), "-o", str(tmp_path / "mean.pt")]) == 0
    )
    mean = load_model_checkpoint(tmp_path / "mean.pt")
    assert mean.config.dim == MODEL["dim"] and mean.tokenizer_json and mean.meta["eos_id"] == 0
    for name in a:
        assert torch.equal(mean.state_dict[name], (a[name] + b[name]) / 2)
    out = tmp_path / "weighted.pt"
    assert (
        main(["average", str(ckpt(single, 2)), str(ckpt(single, 12)), "--weights", "1,3", "-o", str(out)])
        == 0
    )
    weighted = load_model_checkpoint(out).state_dict
    for name in a:
        torch.testing.assert_close(weighted[name], 0.25 * a[name] + 0.75 * b[name], rtol=1e-6, atol=1e-7)
    # The output is a normal model checkpoint: it averages again, exports and generates.
    assert torch.equal(weights(out)["norm.weight"], weighted["norm.weight"])
    assert main(["export-hf", str(out), str(tmp_path / "hf")]) == 0
    assert (
        main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    )


def test_lawa_picks_the_latest_k_checkpoints_at_multiples_of_s(single, tmp_path, capsys):
    assert main(["average", "--last", "3", "--every", "4", str(single), "-o", str(tmp_path / "lawa.pt")]) == 0
    assert [line.split("/")[-1] for line in capsys.readouterr().out.splitlines()[1:4]] == [
        "step-00000004.ckpt",
        "step-00000008.ckpt",
        "step-00000012.ckpt",
    ]
    lawa = load_model_checkpoint(tmp_path / "lawa.pt").state_dict
    expected = average_checkpoints([ckpt(single, s) for s in (4, 8, 12)]).state_dict
    assert all(torch.equal(lawa[k], expected[k]) for k in lawa)
    assert main(["average", "--last", "7", "--every", "2", str(single), "-o", str(tmp_path / "x.pt")]) == 2
    assert "--last 7 needs 7 checkpoints at multiples of 2 steps, but" in capsys.readouterr().err


def test_mismatched_configs_and_tokenizers_are_refused(single, tmp_path, capsys):
    out = str(tmp_path / "out.pt")
    other = load_model_checkpoint(ckpt(single, 12))
    small = LlamaConfig(**{**MODEL, "dim": 32, "n_heads": 2, "n_kv_heads": 1})
    save_model_checkpoint(
        tmp_path / "small.pt", ModelCheckpoint(small, Llama(small).state_dict(), other.tokenizer_json)
    )
    assert main(["average", str(ckpt(single, 12)), str(tmp_path / "small.pt"), "-o", out]) == 2
    err = capsys.readouterr().err
    assert "cannot average checkpoints of different architectures" in err and "dim 64 vs 32" in err
    save_model_checkpoint(tmp_path / "untokenized.pt", ModelCheckpoint(other.config, other.state_dict, None))
    assert main(["average", str(ckpt(single, 12)), str(tmp_path / "untokenized.pt"), "-o", out]) == 2
    assert "cannot average checkpoints with different tokenizers" in capsys.readouterr().err
    assert main(["average", str(ckpt(single, 12)), str(ckpt(single, 10)), "--weights", "1", "-o", out]) == 2
    assert "--weights has 1 values for 2 checkpoints" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.mark.slow
def test_averaging_sharded_fsdp2_checkpoints_equals_averaging_their_consolidated_forms(fsdp, tmp_path):
    sharded = [ckpt(fsdp, 8), ckpt(fsdp, 12)]
    assert all(p.is_dir() and (p / "meta.pt").is_file() for p in sharded)
    consolidated = []
    for path in sharded:  # gathered whole on the CPU, saved as model files
        consolidated.append(save_model_checkpoint(tmp_path / f"{path.name}.pt", load_model_checkpoint(path)))
    from_shards = average_checkpoints(sharded, [2, 1])
    from_files = average_checkpoints(consolidated, [2, 1])
    assert from_shards.config == from_files.config and from_shards.tokenizer_json == from_files.tokenizer_json
    assert all(
        torch.equal(from_shards.state_dict[k], from_files.state_dict[k]) for k in from_files.state_dict
    )
    # The lazy reader never needs the EMA or optimizer entries stored beside the model's shards.
    assert sorted(open_checkpoint(sharded[0]).names) == sorted(from_files.state_dict)


# ---- EMA ---------------------------------------------------------------------------------------


class RecordWeights(L.Callback):
    """The weights after every optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.model.named_parameters()
        }


def test_ema_update_rule(tiny_dataset):
    from pretrain.train.datamodule import PretrainDataModule, Source
    from pretrain.train.module import PretrainModule

    record, ema = RecordWeights(), EMA(decay=0.7, every_n_steps=2, start_step=3, validate=False)
    trainer = bare_trainer(
        max_steps=9,
        accumulate_grad_batches=2,
        callbacks=[record, ema],
    )
    data = PretrainDataModule({"stdlib": Source(str(tiny_dataset))}, 64, 1024, 8, num_workers=0)
    trainer.fit(PretrainModule(model="tiny", model_overrides=MODEL), datamodule=data)
    # Starts as the weights after step 3, then ema <- 0.7 ema + 0.3 w after steps 4, 6 and 8.
    expected = {k: v.clone() for k, v in record.after[3].items()}
    for step in (4, 6, 8):
        for k in expected:
            expected[k].mul_(0.7).add_(record.after[step][k], alpha=0.3)
    assert ema.updates == 3 and ema.last_step == 9
    assert all(torch.equal(ema.copies["ema"][k], expected[k]) for k in expected)
    assert not torch.equal(expected["norm.weight"], record.after[9]["norm.weight"])


def test_resumed_run_continues_ema_and_lawa_exactly(single, tiny_dataset, tmp_path):
    resumed = tmp_path / "resumed"
    config = averaging_recipe(tmp_path, tiny_dataset, resumed)
    assert main(["fit", "--config", str(config), "--resume", str(ckpt(single, 4))]) == 0
    for step in (8, 12):
        for ema in (False, True):
            a, b = weights(ckpt(single, step), ema), weights(ckpt(resumed, step), ema)
            assert all(torch.equal(a[k], b[k]) for k in a), (step, ema)
    lawa = [
        torch.load(ckpt(r, 12), weights_only=True)["callbacks"][LAWA_STATE_KEY] for r in (single, resumed)
    ]
    assert list(lawa[0]["copies"]) == list(lawa[1]["copies"]) == ["8", "10", "12"]
    for copy in lawa[0]["copies"]:
        assert all(torch.equal(t, lawa[1]["copies"][copy][k]) for k, t in lawa[0]["copies"][copy].items())


@pytest.mark.slow
def test_fsdp2_keeps_sharded_ema_that_matches_one_process_and_resumes_exactly_on_one(
    single, fsdp, tiny_dataset, tmp_path
):
    ema_sharded, ema_single = weights(ckpt(fsdp, 12), ema=True), weights(ckpt(single, 12), ema=True)
    assert max((ema_sharded[k] - ema_single[k]).abs().max() for k in ema_single) < 1e-5
    # Validation on the EMA and LaWA weights is the same with sharded parameters.
    logged_fsdp, logged_single = validation_metrics(fsdp), validation_metrics(single)
    for metric in ("val/stdlib/loss", "val_ema/stdlib/loss", "val_lawa/stdlib/loss"):
        assert abs(logged_fsdp[metric] - logged_single[metric]) < 1e-4, metric
    # The 2-process sharded EMA resumes on one process (resharded) and continues exactly.
    one = tmp_path / "one"
    config = averaging_recipe(tmp_path, tiny_dataset, one, trainer__strategy="fsdp2")
    run(["fit", "--config", str(config), "--resume", str(ckpt(fsdp, 4))])
    continued = weights(ckpt(one, 12), ema=True)
    assert all(torch.equal(continued[k], ema_sharded[k]) for k in continued)


def test_ema_is_exported_from_checkpoints_and_refused_where_absent(single, tmp_path, capsys):
    out = tmp_path / "ema.pt"
    assert main(["average", "--ema", str(ckpt(single, 12)), "-o", str(out)]) == 0
    state = torch.load(ckpt(single, 12), weights_only=True)["callbacks"][EMA_STATE_KEY]["copies"]["ema"]
    assert all(torch.equal(load_model_checkpoint(out).state_dict[k], v) for k, v in state.items())
    assert main(["export-hf", str(out), str(tmp_path / "hf")]) == 0
    assert main(["average", "--ema", str(out), "-o", str(tmp_path / "again.pt")]) == 2
    assert "--ema needs a training checkpoint" in capsys.readouterr().err


# ---- online LaWA and the measurement -----------------------------------------------------------


def test_online_lawa_and_ema_validation_match_the_offline_measurement(single, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "averaging_quality", ROOT / "benchmarks" / "averaging_quality.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["averaging_quality.py", str(single), "--last", "3", "--every", "2"])
    script.main()
    rows = {line[:10]: float(line.split()[-2]) for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == ["last check", "LaWA: last", "EMA at ste"]
    logged = validation_metrics(single)
    assert logged["val_lawa/copies"] == 3  # at step 12: the copies of steps 8, 10, 12
    assert abs(rows["last check"] - logged["val/stdlib/loss"]) < 1e-4
    assert abs(rows["LaWA: last"] - logged["val_lawa/stdlib/loss"]) < 1e-4
    assert abs(rows["EMA at ste"] - logged["val_ema/stdlib/loss"]) < 1e-4
    assert len({round(v, 4) for v in rows.values()}) == 3
