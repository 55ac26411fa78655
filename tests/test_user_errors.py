"""Mistakes a user can make end in one line (exit 2) that names the file or field and the fix."""

from __future__ import annotations

import pytest
from helpers import MODEL, recipe, require, train_losses

from pretrain.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--trainer.max_step", "3"],
            "unrecognized arguments: --trainer.max_step 3 (see `pretrain fit --help`)",
        ),
        (["--data.micro_batch_size", "x"], 'Parser key "data.micro_batch_size": Expected'),
        (["--data.micro_batch_size", "0"], "data.micro_batch_size must be positive, got 0"),
        (
            ["--data.seq_len", "128", "--data.global_batch_tokens", "1024"],
            "data.seq_len 128 exceeds the model's context of 64",
        ),
        (["--max_tokens", "2048"], "give either max_tokens or trainer.max_steps, not both"),
    ],
)
def test_fit_mistakes_are_one_line(tiny_dataset, tmp_path, capsys, args, message):
    config = recipe(tmp_path, tiny_dataset, tmp_path / "run")
    assert main(["fit", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage:" not in err and len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "run" / "logs").exists()  # nothing left behind


def test_a_launch_that_fails_before_its_first_step_leaves_no_empty_log_version(
    tiny_dataset, tmp_path, capsys
):
    config = recipe(
        tmp_path,
        tiny_dataset,
        tmp_path / "run",
        model={"model": "tiny", "model_overrides": MODEL | {"vocab_size": 300}},
    )
    assert main(["fit", "--config", str(config)]) == 2
    assert "vocab_size is 300" in capsys.readouterr().err
    assert not list((tmp_path / "run" / "logs").glob("version_*"))


def test_no_progress_bar_and_extending_a_run_with_a_note_on_the_lr(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = recipe(tmp_path, tiny_dataset, run_dir, trainer__max_steps=6, checkpoint={"every_n_steps": 3})
    assert main(["fit", "--config", str(config), "--trainer.enable_progress_bar", "false"]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "9"]) == 0  # extend the finished run
    err = capsys.readouterr().err
    assert "the run's length changed from 6 to 9 steps" in err and "the LR at step 6 goes from" in err
    assert "litlogger" not in err and "FLOPs" not in err  # Lightning's tip and its "FLOPs 0" summary
    assert "model: tiny preset, 139,584 parameters, " in err and "GFLOP per token" in err
    assert sorted(train_losses(run_dir)) == list(range(9))


def prepare_args(dataset, output) -> list[str]:
    """`pretrain data prepare` of the tiny dataset's corpus with its tokenizer into `output`."""
    corpus, tokenizer = dataset.parent / "corpus.jsonl", dataset / "tokenizer.json"
    return ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--output", str(output)]


def hf_dir(tmp_path, **config_changes):
    """A small HF-format model directory written by `save_hf`."""
    import json

    from pretrain.model import Llama, LlamaConfig
    from pretrain.model.hf import save_hf

    config = LlamaConfig(**MODEL)
    out = save_hf(tmp_path / "hf", Llama(config).state_dict(), config)
    if config_changes:
        hf = json.loads((out / "config.json").read_text()) | config_changes
        (out / "config.json").write_text(json.dumps(hf))
    return out


def test_output_paths_that_cannot_be_written_are_one_line(tiny_dataset, tmp_path, capsys):
    corpus = tiny_dataset.parent / "corpus.jsonl"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for output in (a_file, a_file / "below"):
        assert main(prepare_args(tiny_dataset, output)) == 2
        assert f"--output {output}: {a_file} is a file where a folder is needed" in capsys.readouterr().err
        args = [
            "data",
            "train-tokenizer",
            "--input",
            str(corpus),
            "--vocab-size",
            "300",
            "--output",
            str(a_file / "t.json"),
        ]
        assert main(args) == 2
        assert "is a file where a folder is needed" in capsys.readouterr().err
        assert main(["export-hf", str(hf_dir(tmp_path)), str(output)]) == 2
        assert f"OUT_DIR {output}: {a_file} is a file where a folder is needed" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
    for bad in ("0", "-1"):
        assert main([*prepare_args(tiny_dataset, tmp_path / "o"), "--num-proc", bad]) == 2
        assert f"--num-proc must be at least 1 (or left out: all CPUs), got {bad}" in capsys.readouterr().err


def test_a_full_disk_during_prepare_is_one_line_and_the_rerun_resumes(
    tiny_dataset, tmp_path, capsys, monkeypatch
):
    import errno

    from pretrain.data.prepare import pipeline, state, writer

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        for module in (pipeline, state, writer):  # every module that writes the preparation's files
            patch.setattr(module, "write_json_atomic", disk_full)
        args = prepare_args(tiny_dataset, tmp_path / "o")
        assert main([*args, "--num-proc", "1"]) == 2
        assert "no space left on the device" in capsys.readouterr().err
    assert main([*args, "--num-proc", "1"]) == 0


def test_broken_hugging_face_folders_are_refused_at_import(tmp_path, capsys):
    out = hf_dir(tmp_path)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["import-hf", str(out), str(tmp_path / "x.pt")]) == 2
    assert f"{weights}: not a readable weights file" in capsys.readouterr().err
    wrong = hf_dir(tmp_path / "wrong", intermediate_size=MODEL["mlp_hidden"] * 2)
    assert main(["import-hf", str(wrong), str(tmp_path / "y.pt")]) == 2
    err = capsys.readouterr().err
    assert "the config gives" in err and "but the weights hold" in err and "do not belong together" in err
    assert not (tmp_path / "y.pt").exists()


def test_an_unusable_newest_checkpoint_is_passed_over_and_named(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = recipe(
        tmp_path, tiny_dataset, run_dir, trainer__max_steps=4, checkpoint={"every_n_steps": 2, "keep_last": 5}
    )
    assert main(["fit", "--config", str(config)]) == 0
    checkpoints = run_dir / "checkpoints"
    newest = checkpoints / "step-00000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    (checkpoints / "step-00000009.ckpt").mkdir()  # an empty folder
    (checkpoints / "step-00000010.ckpt").write_bytes(b"")  # a zero-byte file
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "step-00000010.ckpt: an empty file; passed over" in err
    assert "step-00000009.ckpt: an incomplete sharded checkpoint" in err
    assert "step-00000004.ckpt: not a complete torch file (truncated?); passed over, kept as" in err
    assert f"resuming from {checkpoints / 'step-00000002.ckpt'}" in err
    assert (checkpoints / "damaged-step-00000004.ckpt").exists()
    assert sorted(train_losses(run_dir)) == list(range(6))
    import torch

    foreign = checkpoints / "step-00000099.ckpt"
    torch.save({"state_dict": {}}, foreign)  # someone else's Lightning checkpoint
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "7"]) == 0
    assert (
        "step-00000099.ckpt: not a checkpoint written by `pretrain fit`; passed over"
        in capsys.readouterr().err
    )
    assert foreign.exists()  # not ours: left where it is


def test_train_tokenizer_on_nothing_and_skipped_records(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["data", "train-tokenizer", "--vocab-size", "300", "--output", str(tmp_path / "t.json")]
    assert main([*args, "--input", str(empty)]) == 2
    assert "no document to train on" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
    some = tmp_path / "some.jsonl"
    some.write_text('{"text": "hello world"}\n{"body": "no text field"}\nnot json\n')
    assert main([*args, "--input", str(some)]) == 0
    assert "trained on 1 documents; 2 record(s) left out, e.g." in capsys.readouterr().err


def test_a_validation_split_too_small_for_one_batch_is_named(tmp_path, capsys):
    from helpers import write_dataset

    data = write_dataset(tmp_path / "d", [5000], val_sizes=(40,), tokenizer="t")
    from pretrain.data.loader import build_val_datasets
    from pretrain.errors import UserError

    with pytest.raises(UserError, match=r"validation of 'd' .*holds 40 tokens .*larger --val-fraction"):
        build_val_datasets({"d": data}, seq_len=16, micro_batch_size=8)
    assert (
        build_val_datasets({"d": write_dataset(tmp_path / "e", [5000])}, seq_len=16, micro_batch_size=8) == {}
    )


def test_a_truncated_zst_file_is_reported_as_truncated(tmp_path, tiny_dataset):
    import json as jsonlib

    zstandard = require("zstandard")
    from pretrain.data.prepare.pipeline import prepare
    from pretrain.data.prepare.settings import PrepareOptions
    from pretrain.errors import UserError

    data = "".join(jsonlib.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(400)).encode()
    path = tmp_path / "part.jsonl.zst"
    packed = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(UserError, match="the file ends inside a compressed frame: it is truncated"):
        prepare(
            [str(path)],
            tiny_dataset / "tokenizer.json",
            tmp_path / "out",
            options=PrepareOptions(strict=True, show_progress=False),
        )


def test_a_missing_dataset_names_the_recipe_that_prepares_it(tmp_path):
    from pretrain.data.shards import load_manifest
    from pretrain.errors import UserError

    recipe_dir = tmp_path / "data" / "corpus"
    recipe_dir.mkdir(parents=True)
    (recipe_dir / "prepare.py").write_text("")
    with pytest.raises(UserError, match=rf"prepare it with: python {recipe_dir / 'prepare.py'}"):
        load_manifest(recipe_dir / "out")
