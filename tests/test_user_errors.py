"""Mistakes a user can make end in one line (exit 2) that names the file or field and the fix."""

from __future__ import annotations

import pytest
from helpers import MODEL, recipe, train_losses

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
    assert sorted(train_losses(run_dir)) == list(range(9))
