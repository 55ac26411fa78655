"""Block expansion (LLaMA Pro): `pretrain expand` keeps the function exactly (dense, MoE, after
HF export), training only the new blocks leaves the rest bit-identical (1 process and FSDP2 over
2 processes) and resumes exactly; the recipes of issue 9 give the expected schedules."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import MODEL, recipe, require, run, run_and_kill_after_checkpoint, train_losses

from pretrain.cli import main
from pretrain.model import Llama, LlamaConfig
from pretrain.model.checkpoint import ModelCheckpoint, load_model_checkpoint, save_model_checkpoint
from pretrain.model.expand import RESIDUAL_WRITES, blocks_to_copy, expand
from pretrain.train.module import PretrainModule

CONFIGS = Path(__file__).parent.parent / "configs"
STEPS = 8
NEW, FROZEN = [1, 3], [0, 2]  # `--every 1` on MODEL's 2 layers: [0, copy of 0, 1, copy of 1]


def random_model(config: LlamaConfig, seed: int = 0) -> Llama:
    """A model whose every weight (norms included) is random, so that no copy is trivially equal."""
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_expansion_keeps_logits_exactly_and_places_copies(moe):
    config = LlamaConfig(**MODEL, n_experts=4 if moe else 0, moe_top_k=2)
    original = random_model(config)
    copy_after = blocks_to_copy(config.n_layers, positions=[0, 1])
    expanded_config, state, record = expand(config, original.state_dict(), copy_after)
    assert expanded_config.n_layers == 4 and record == {"new_layers": NEW, "copied_from": [0, 1]}
    expanded = Llama(expanded_config).eval()
    expanded.load_state_dict(state, strict=True)
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 48))
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, expanded(tokens).logits)  # exactly, not just < 1e-6
    zeroed = 0
    for new, source in zip(NEW, [0, 1]):
        for name, tensor in expanded.layers[new].state_dict().items():
            reference = original.layers[source].state_dict()[name]
            if RESIDUAL_WRITES.fullmatch(name):
                assert not tensor.any(), name
                zeroed += 1
            else:
                assert torch.equal(tensor, reference), name
    assert zeroed == 2 * (1 + (4 if moe else 1))  # out_proj + every expert's down projection
    for old, source in zip(FROZEN, [0, 1]):
        assert all(
            torch.equal(t, original.layers[source].state_dict()[k])
            for k, t in expanded.layers[old].state_dict().items()
        )


def test_expand_command_writes_checkpoint_that_exports_to_hf(tmp_path):
    transformers = require("transformers")
    config = LlamaConfig(**MODEL).replace(n_layers=4)
    original = random_model(config)
    meta = {"bos_id": 1, "eos_id": 2}
    save_model_checkpoint(tmp_path / "base.pt", ModelCheckpoint(config, original.state_dict(), None, meta))

    assert main(["expand", str(tmp_path / "base.pt"), "-o", str(tmp_path / "pro.pt"), "--every", "2"]) == 0
    pro = load_model_checkpoint(tmp_path / "pro.pt")
    assert pro.config.n_layers == 6
    assert pro.meta["expansion"] == {"new_layers": [2, 5], "copied_from": [1, 3]}
    assert pro.meta["eos_id"] == 2 and pro.meta["source"]["kind"] == "expand"

    assert main(["export-hf", str(tmp_path / "pro.pt"), str(tmp_path / "hf")]) == 0
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 40))
    with torch.no_grad():
        assert (original(tokens).logits - theirs(tokens).logits).abs().max() < 1e-4

    # An HF directory expands too, and explicit positions may be uneven.
    out = tmp_path / "from-hf.pt"
    assert main(["expand", str(tmp_path / "hf"), "-o", str(out), "--positions", "5,0"]) == 0
    assert load_model_checkpoint(out).meta["expansion"] == {"new_layers": [1, 7], "copied_from": [0, 5]}

    for bad in (["--positions", "6"], ["--positions", "1,1"], ["--every", "0"], ["--positions", "a"]):
        assert main(["expand", str(tmp_path / "base.pt"), "-o", str(tmp_path / "x.pt"), *bad]) == 2
    with pytest.raises(SystemExit):  # --every and --positions exclude each other
        main(
            [
                "expand",
                str(tmp_path / "base.pt"),
                "-o",
                str(tmp_path / "x.pt"),
                "--every",
                "1",
                "--positions",
                "0",
            ]
        )


@pytest.fixture(scope="module")
def expanded(tmp_path_factory) -> Path:
    """MODEL (2 layers, freshly initialized) expanded with a copy after every block."""
    tmp = tmp_path_factory.mktemp("expanded")
    torch.manual_seed(1)
    original = Llama(LlamaConfig(**MODEL))
    save_model_checkpoint(tmp / "base.pt", ModelCheckpoint(LlamaConfig(**MODEL), original.state_dict()))
    assert main(["expand", str(tmp / "base.pt"), "-o", str(tmp / "pro.pt"), "--every", "1"]) == 0
    return tmp / "pro.pt"


def expansion_recipe(tmp_path: Path, dataset: Path, expanded: Path, name: str, **changes) -> Path:
    model = {
        "model": "tiny",
        "model_overrides": {**MODEL, "n_layers": 4},
        "init_from": str(expanded),
        "trainable_blocks": "new",
        "lr_schedule": {
            "class_path": "pretrain.train.schedules.MultiStep",
            "init_args": {
                "max_lr": 3e-3,
                "warmup_steps": 2,
                "boundaries": [0.5, 0.75],
                "factors": [0.3, 0.1],
            },
        },
    }
    return recipe(tmp_path, dataset, tmp_path / name, model=model, trainer__max_steps=STEPS, **changes)


def assert_only_new_blocks_changed(final: Path, expanded: Path) -> None:
    before, after = load_model_checkpoint(expanded).state_dict, load_model_checkpoint(final).state_dict
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        new = any(name.startswith(f"layers.{i}.") for i in NEW)
        assert torch.equal(after[name], tensor) != new, name  # frozen: bit-identical; new: changed


@pytest.fixture(scope="module")
def reference(tiny_dataset, expanded, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted single-process run training the new blocks only."""
    tmp = tmp_path_factory.mktemp("reference")
    run(["fit", "--config", str(expansion_recipe(tmp, tiny_dataset, expanded, "ref"))])
    final = tmp / "ref" / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    assert_only_new_blocks_changed(final, expanded)
    checkpoint = torch.load(final, weights_only=False)
    optimizer = checkpoint["optimizer_states"][0]
    trainable = sum(
        1 for k in load_model_checkpoint(expanded).state_dict if k.startswith(("layers.1.", "layers.3."))
    )
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == trainable == len(optimizer["state"])
    lrs = (tmp / "ref" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "0.0003" in lrs  # the multi-step schedule's second factor (0.1 x 3e-3) was reached
    losses = train_losses(tmp / "ref")
    assert sorted(losses) == list(range(STEPS)) and losses[STEPS - 1] < losses[0]
    return losses


@pytest.mark.slow
def test_training_new_blocks_only_resumes_exactly(tiny_dataset, expanded, reference, tmp_path):
    config = expansion_recipe(tmp_path, tiny_dataset, expanded, "killed")
    run_and_kill_after_checkpoint(
        ["fit", "--config", str(config)], tmp_path / "killed" / "checkpoints" / "step-00000004.ckpt"
    )
    resumed = run(["fit", "--config", str(config)])
    assert "resuming from" in resumed.stderr
    assert train_losses(tmp_path / "killed") == reference  # bit-identical per-step losses
    final = tmp_path / "killed" / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    assert_only_new_blocks_changed(final, expanded)
    # The trained checkpoint keeps the expansion record: a next stage can train "new" again.
    assert load_model_checkpoint(final).meta["expansion"]["new_layers"] == NEW
    next_stage = PretrainModule(
        model="tiny", model_overrides={**MODEL, "n_layers": 4}, init_from=str(final), trainable_blocks="new"
    )
    assert next_stage._trainable_block_indices() == NEW


@pytest.mark.slow
def test_training_new_blocks_only_under_fsdp2_resumes(tiny_dataset, expanded, reference, tmp_path):
    require("torch.distributed")
    from torch.distributed.checkpoint import FileSystemReader

    config = expansion_recipe(
        tmp_path, tiny_dataset, expanded, "fsdp", trainer__devices=2, trainer__strategy="fsdp2"
    )
    checkpoints = tmp_path / "fsdp" / "checkpoints"
    run_and_kill_after_checkpoint(["fit", "--config", str(config)], checkpoints / "step-00000004.ckpt")
    run(["fit", "--config", str(config)])
    losses = train_losses(tmp_path / "fsdp")
    assert sorted(losses) == list(range(STEPS))
    assert max(abs(losses[s] - reference[s]) for s in reference) < 1e-5  # = 1 process, across the resume
    final = checkpoints / f"step-{STEPS:08d}.ckpt"
    assert final.is_dir()  # sharded
    assert_only_new_blocks_changed(final, expanded)
    keys = FileSystemReader(final).read_metadata().state_dict_metadata
    moments = [k for k in keys if k.startswith("optimizer_0.state.") and k.endswith(".exp_avg")]
    assert len(moments) == 12  # 6 parameters in each of the 2 new blocks, nothing for frozen ones
    assert all(
        k.startswith(("optimizer_0.state.model.layers.1.", "optimizer_0.state.model.layers.3."))
        for k in moments
    )


def test_trainable_blocks_freeze_the_rest_and_name_errors(expanded, tmp_path):
    def build(**kwargs) -> None:
        PretrainModule(model="tiny", model_overrides={**MODEL, "n_layers": 4}, **kwargs).configure_model()

    plain = load_model_checkpoint(expanded)
    plain.meta = {}  # the same weights, but no record of an expansion
    save_model_checkpoint(tmp_path / "plain.pt", plain)
    with pytest.raises(Exception, match="needs model.init_from"):
        build(trainable_blocks="new")
    with pytest.raises(Exception, match="records no new blocks"):
        build(trainable_blocks="new", init_from=str(tmp_path / "plain.pt"))
    with pytest.raises(Exception, match=r"indices in \[0, 3\]"):
        build(trainable_blocks=[4], init_from=str(expanded))
    with pytest.raises(Exception, match="list of block indices"):
        build(trainable_blocks="old", init_from=str(expanded))
    module = PretrainModule(
        model="tiny", model_overrides={**MODEL, "n_layers": 4}, init_from=str(expanded), trainable_blocks=[2]
    )
    module.configure_model()
    module.model(torch.randint(0, MODEL["vocab_size"], (2, 16))).logits.sum().backward()
    with_grad = {name.split(".")[1] for name, p in module.model.named_parameters() if p.grad is not None}
    trainable = {name.split(".")[1] for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == with_grad == {"2"}  # an old block: any block can be named


def schedule_of(name: str):
    config = yaml.safe_load((CONFIGS / name).read_text())
    spec = config["model"]["lr_schedule"]
    module, _, cls = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**spec["init_args"]), config


def test_recipes_say_what_they_reproduce_and_give_the_expected_schedules():
    schedule, config = schedule_of("deepseek-multistep.yaml")
    total = 1_430_512  # on top of configs/tinyllama-1.1b.yaml: 3T tokens in 2M-token batches
    checks = {0: 4e-4 / 2000, 1999: 4e-4, 1_144_409: 4e-4, 1_144_410: 0.316 * 4e-4, 1_287_460: 0.316 * 4e-4}
    checks |= {1_287_461: 4e-5, total - 1: 4e-5}
    for step, lr in checks.items():
        assert schedule(step, total) == pytest.approx(lr, rel=1e-9), step

    schedule, config = schedule_of("continual/llama-pro-expand.yaml")
    model = config["model"]
    assert model["trainable_blocks"] == "new" and model["init_from"].endswith(".pt")
    assert model["model_overrides"]["n_layers"] == 22 + len(blocks_to_copy(22, every=4)) == 27
    total = math.ceil(config["max_tokens"] / 2_097_152)
    warmup = model["lr_schedule"]["init_args"]["warmup_steps"]
    assert warmup == round(0.06 * total)
    assert schedule(warmup - 1, total) == pytest.approx(2e-4) and schedule(total - 1, total) == pytest.approx(
        2e-5
    )
    for name in ("deepseek-multistep.yaml", "continual/llama-pro-expand.yaml"):
        assert (CONFIGS / name).read_text().startswith("# ")  # says what it reproduces
