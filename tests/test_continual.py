"""Continual pretraining: init_from (ours and HF), replay and ramped mixtures, branching an anneal,
recipe schedules, and exact resume in the middle of a continual stage."""

from __future__ import annotations

import glob
import importlib
import json
import math
import sysconfig
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from helpers import MODEL, recipe, require, run, run_and_kill_after_checkpoint, train_losses

from pretrain.cli import main
from pretrain.data.mixture import Mixture
from pretrain.data.ramp import RampedMixture
from pretrain.model.checkpoint import load_model_checkpoint
from pretrain.train.module import PretrainModule

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def corpus_b(tiny_dataset, tmp_path_factory) -> Path:
    """A second dataset (other stdlib modules) tokenized with the same tokenizer as `tiny_dataset`."""
    root = tmp_path_factory.mktemp("corpus_b")
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[150:260]
    with open(root / "b.jsonl", "w") as f:
        for path in files:
            f.write(json.dumps({"text": Path(path).read_text(errors="replace")}) + "\n")
    tokenizer = str(tiny_dataset / "tokenizer.json")
    args = [
        "data",
        "prepare",
        "--input",
        str(root / "b.jsonl"),
        "--tokenizer",
        tokenizer,
        "--output",
        str(root / "out"),
    ]
    assert main(args + ["--val-fraction", "0.1", "--num-proc", "1"]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def stage_a(tiny_dataset, tmp_path_factory) -> Path:
    """The step-4 checkpoint of a short pretraining run on corpus A."""
    tmp = tmp_path_factory.mktemp("stage_a")
    run(["fit", "--config", str(recipe(tmp, tiny_dataset, tmp / "a", trainer__max_steps=4))])
    return tmp / "a" / "checkpoints" / "step-00000004.ckpt"


def mixture_recipe(tmp_path, tiny_dataset, corpus_b, name, **changes):
    sources = {
        "new": {"path": str(corpus_b), "weight": 0.75},
        "old": {"path": str(tiny_dataset), "weight": 0.25},
    }
    data = {
        "sources": sources,
        "seq_len": 64,
        "global_batch_tokens": 1024,
        "micro_batch_size": 8,
        "num_workers": 0,
        "val_tokens": 4096,
    }
    return recipe(tmp_path, tiny_dataset, tmp_path / name, data=data | changes.pop("data", {}), **changes)


@pytest.mark.slow
def test_init_from_loads_exact_weights_and_resets_optimizer_step_and_schedule(
    tiny_dataset, corpus_b, stage_a, tmp_path
):
    module = PretrainModule(model="tiny", model_overrides=MODEL, init_from=str(stage_a))
    module.configure_model()
    saved = load_model_checkpoint(stage_a).state_dict
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in saved.items())

    config = mixture_recipe(tmp_path, tiny_dataset, corpus_b, "b", trainer__max_steps=4)
    text = yaml.safe_load(config.read_text())
    text["model"]["init_from"] = str(stage_a)
    config.write_text(yaml.safe_dump(text))
    result = run(["fit", "--config", str(config)])
    assert "initial weights from" in result.stderr
    losses = train_losses(tmp_path / "b")
    assert sorted(losses) == [0, 1, 2, 3]  # a fresh step counter
    checkpoint = torch.load(tmp_path / "b" / "checkpoints" / "step-00000004.ckpt", weights_only=False)
    adam_steps = {float(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4.0}  # a fresh optimizer: stage A's 4 steps are not counted
    assert checkpoint["pretrain"]["init_from"]["path"] == str(stage_a.resolve())
    assert checkpoint["pretrain"]["init_from"]["global_step"] == 4
    with open(next((tmp_path / "b" / "logs").glob("version_0")) / "metrics.csv") as f:
        first_lr = next(float(r["train/lr"]) for r in __import__("csv").DictReader(f) if r["train/lr"])
    assert first_lr == pytest.approx(3e-3 / 3)  # the schedule re-warms from its first step

    # init_from and an explicit --resume PATH cannot be combined by mistake.
    assert main(["fit", "--config", str(config), "--resume", str(stage_a)]) == 2


def test_validation_only_source_is_logged_but_never_trained_on(tiny_dataset, corpus_b, tmp_path, capsys):
    only_new = {"sources": {"new": {"path": str(corpus_b), "weight": 1.0}}}
    watched = mixture_recipe(
        tmp_path,
        tiny_dataset,
        corpus_b,
        "watched",
        data=only_new | {"val_sources": {"old": str(tiny_dataset)}},
        trainer__max_steps=4,
    )
    plain = mixture_recipe(tmp_path, tiny_dataset, corpus_b, "plain", data=only_new, trainer__max_steps=4)
    for config in (watched, plain):
        assert main(["fit", "--config", str(config)]) == 0
    assert train_losses(tmp_path / "watched") == train_losses(tmp_path / "plain")  # same training
    with open(tmp_path / "watched" / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert any(r["val/old/loss"] for r in rows) and any(r["val/new/loss"] for r in rows)
    assert {k for k in rows[0] if "old" in k} == {"val/old/loss", "val/old/ppl"}  # only evaluated
    twice = ["--data.val_sources", json.dumps({"new": str(tiny_dataset)})]
    assert main(["fit", "--config", str(plain), "--resume", "auto", *twice]) == 2
    assert "data.val_sources ['new'] are also training sources" in capsys.readouterr().err


@pytest.mark.slow
def test_init_from_hf_directory_reproduces_hf_logits(stage_a, tmp_path):
    transformers = require("transformers")
    assert main(["export-hf", str(stage_a), str(tmp_path / "hf")]) == 0
    module = PretrainModule(model="tiny", model_overrides=MODEL, init_from=str(tmp_path / "hf"))
    module.configure_model()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert (module.model.eval()(tokens).logits - theirs(tokens).logits).abs().max() < 1e-4
    wrong = PretrainModule(
        model="tiny", model_overrides={**MODEL, "n_layers": 3}, init_from=str(tmp_path / "hf")
    )
    with pytest.raises(Exception, match="model config differs"):
        wrong.configure_model()


@pytest.mark.parametrize("weights", [[0.95, 0.05], [0.75, 0.25], [0.99, 0.01]])
def test_replay_share_is_exact_over_every_window(weights):
    source, _ = Mixture(weights).assign(np.arange(4000))
    replay = np.concatenate([[0], np.cumsum(source == 1)])
    n = np.arange(len(replay))
    counts = replay[None, :] - replay[:, None]  # replay samples in every window [a, b)
    target = (n[None, :] - n[:, None]) * weights[1] / sum(weights)
    upper = np.triu(np.ones_like(counts, dtype=bool))
    assert np.abs(counts - target)[upper].max() < 1


def test_ramp_is_linear_exact_and_pure():
    ramp = RampedMixture([0.75, 0.25], ramped=0, start_share=0.0, ramp_samples=2000)
    indices = np.arange(5000)
    source, counter = ramp.assign(indices)
    # Each source's counter walks 0, 1, 2, ... through its own samples: nothing lost or repeated.
    for s in (0, 1):
        assert np.array_equal(counter[source == s], np.arange((source == s).sum()))
    # Within 1 of the linear ramp's expected count over every window.
    taken = np.concatenate([[0], np.cumsum(source == 0)])
    expected = ramp._target(np.arange(5001))
    deviation = (taken[None, :] - taken[:, None]) - (expected[None, :] - expected[:, None])
    assert np.abs(np.triu(deviation)).max() <= 1
    assert (source[:200] == 0).mean() < 0.1 and abs((source[4000:] == 0).mean() - 0.75) < 0.01
    # Pure in the index: any chunking (a resume) gives the same assignment.
    parts = [ramp.assign(chunk) for chunk in np.array_split(indices[1234:], 7)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), source[1234:])
    assert np.array_equal(ramp.consumed(3333), np.bincount(source[:3333], minlength=2))


@pytest.mark.slow
def test_continual_stage_with_replay_and_ramp_resumes_exactly(tiny_dataset, corpus_b, stage_a, tmp_path):
    data = {"ramp": {"source": "new", "start_share": 0.1, "tokens": 6 * 1024}}
    reference_config = mixture_recipe(
        tmp_path, tiny_dataset, corpus_b, "ref", data=data, trainer__max_steps=8
    )
    killed_config = mixture_recipe(
        tmp_path, tiny_dataset, corpus_b, "killed", data=data, trainer__max_steps=8
    )
    for config in (reference_config, killed_config):
        text = yaml.safe_load(config.read_text())
        text["model"]["init_from"] = str(stage_a)
        config.write_text(yaml.safe_dump(text))
    run(["fit", "--config", str(reference_config)])
    run_and_kill_after_checkpoint(
        ["fit", "--config", str(killed_config)], tmp_path / "killed" / "checkpoints" / "step-00000004.ckpt"
    )
    resumed = run(["fit", "--config", str(killed_config)])
    assert "resuming from" in resumed.stderr and "initial weights" not in resumed.stderr
    reference, continued = train_losses(tmp_path / "ref"), train_losses(tmp_path / "killed")
    assert sorted(continued) == list(range(8)) and continued == reference
    # Validation is logged per source: forgetting (old) and adaptation (new) are both visible.
    header = (tmp_path / "ref" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/old/loss" in header and "val/new/loss" in header and "train/epoch/old" in header


class RecordAppliedLR(L.Callback):
    """Writes {step: LR the optimizer applies at that step} to `path` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.applied: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.applied[trainer.global_step] = optimizer.param_groups[0]["lr"]

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.applied))


@pytest.mark.slow
def test_anneal_branch_starts_from_the_constant_lr_without_rewarm(tiny_dataset, tmp_path):
    schedule = {
        "class_path": "pretrain.train.schedules.Infinite",
        "init_args": {"max_lr": 3e-3, "constant_lr": 1e-3, "warmup_steps": 2, "cooldown_steps": 2},
    }
    model = {"model": "tiny", "model_overrides": MODEL, "lr_schedule": schedule}
    constant = recipe(tmp_path, tiny_dataset, tmp_path / "constant", model=model, trainer__max_steps=8)
    run(["fit", "--config", str(constant)])
    anneal = {**schedule, "init_args": {**schedule["init_args"], "anneal_steps": 4, "min_lr": 0.0}}
    branch = recipe(
        tmp_path,
        tiny_dataset,
        tmp_path / "branch",
        model={**model, "lr_schedule": anneal},
        trainer__max_steps=8,
        branch_from=str(tmp_path / "constant" / "checkpoints" / "step-00000004.ckpt"),
    )
    applied = tmp_path / "applied_lr.json"
    record = {"class_path": "test_continual.RecordAppliedLR", "init_args": {"path": str(applied)}}
    assert main(["fit", "--config", str(branch), "--trainer.callbacks+", json.dumps(record)]) == 0
    lrs = {}
    for run_dir in ("constant", "branch"):
        with open(tmp_path / run_dir / "logs" / "version_0" / "metrics.csv") as f:
            lrs[run_dir] = {
                int(r["step"]): float(r["train/lr"]) for r in __import__("csv").DictReader(f) if r["train/lr"]
            }
    assert lrs["constant"][3] == pytest.approx(1e-3)  # the constant phase at the branch point
    assert sorted(lrs["branch"]) == [4, 5, 6, 7]  # the branch continues the step counter
    assert [lrs["branch"][s] for s in range(4, 8)] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert max(lrs["branch"].values()) <= 1e-3  # no re-warm spike
    # The LR the optimizer applied is the logged one, from the branch's first step on.
    assert {int(k): v for k, v in json.loads(applied.read_text()).items()} == pytest.approx(lrs["branch"])
    # Branching keeps the optimizer state: Adam's step counter continues from the branch point.
    checkpoint = torch.load(tmp_path / "branch" / "checkpoints" / "step-00000008.ckpt", weights_only=False)
    assert {float(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()} == {8.0}
    assert checkpoint["pretrain"]["branched_from"].endswith("constant/checkpoints/step-00000004.ckpt")


def schedule_of(recipe_path: Path):
    config = yaml.safe_load(recipe_path.read_text())
    spec = config["model"]["lr_schedule"]
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec["init_args"]), config


@pytest.mark.parametrize(
    "name,checks",
    [
        ("rewarm-cosine-replay5", {0: 4e-4 / 477, 476: 4e-4, 47683: 4e-5}),
        ("rewarm-cosine-replay25", {0: 4e-4 / 477, 476: 4e-4, 47683: 4e-5}),
        ("tinyllama-domain-ramp", {239: 4e-4, 23841: 4e-5}),
        ("infinite-constant", {1999: 4e-4, 21999: 1e-4, 1_000_000: 1e-4}),
        ("infinite-anneal", {199_999: 1e-4, 200_000: 1e-4 * (1 - 1 / 10_000), 209_999: 0.0}),
        ("wsd-decay-branch", {99_999: 4e-4, 100_000: 4e-4 * (1 - math.sqrt(1 / 15_000)), 114_999: 0.0}),
    ],
)
def test_recipe_schedules(name, checks):
    schedule, config = schedule_of(CONFIGS / "continual" / f"{name}.yaml")
    total = math.ceil(config["max_tokens"] / 2_097_152)  # the TinyLlama recipe's global batch
    for step, lr in checks.items():
        assert schedule(step, total) == pytest.approx(lr, rel=1e-6, abs=1e-12), (name, step)
    assert (
        "#" in (CONFIGS / "continual" / f"{name}.yaml").read_text().splitlines()[0]
    )  # says what it reproduces
