"""The recipe's one owner (`pretrain.recipe`): defaults, overrides and the batch geometry, read
the same way by `pretrain fit` and `pretrain submit`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pretrain import recipe
from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.recipe import BatchGeometry, Recipe, override_pairs


def write_recipe(tmp_path: Path, **changes) -> Path:
    """A tiny CPU recipe without run_dir, resume or num_workers (left to the defaults)."""
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4},
        "model": {"model": "tiny"},
        "data": {
            "sources": {"a": {"path": str(tmp_path / "data")}},
            "seq_len": 64,
            "global_batch_tokens": 1024,
            "micro_batch_size": 8,
        },
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        config[section][name] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_geometry_derives_accumulation_batches_and_length():
    geometry = BatchGeometry(
        devices=2, nodes=3, micro_batch_size=4, seq_len=128, global_batch_tokens=3 * 2**12
    )
    assert (geometry.world_size, geometry.tokens_per_micro_step, geometry.accumulation) == (6, 3072, 4)
    geometry = BatchGeometry(devices=2, nodes=2, micro_batch_size=4, seq_len=128, global_batch_tokens=2**14)
    assert (geometry.world_size, geometry.accumulation) == (4, 8)
    assert (geometry.global_batch_size, geometry.per_rank_batch) == (128, 32)
    assert geometry.max_steps(10**6, None) == 62 and geometry.max_steps(None, 7) == 7
    assert geometry.max_steps(2**14, -1) == 1
    assert "16,384 tokens = 4 sequences x 128 tokens x 2 device(s) x 2 node(s) x 8 accumulation" in (
        geometry.describe(3)
    )


def test_geometry_is_not_built_from_invalid_numbers():
    with pytest.raises(UserError, match=r"must be a multiple of .* = 8 x 64 x 2 x 1 = 1,024"):
        BatchGeometry(devices=2, nodes=1, micro_batch_size=8, seq_len=64, global_batch_tokens=1536)
    with pytest.raises(UserError, match="data.seq_len must be positive, got 0"):
        BatchGeometry(devices=1, nodes=1, micro_batch_size=8, seq_len=0, global_batch_tokens=1024)
    with pytest.raises(UserError, match="at least one node and one device per node, got 0 x 1"):
        BatchGeometry(devices=1, nodes=0, micro_batch_size=8, seq_len=64, global_batch_tokens=1024)
    geometry = BatchGeometry(devices=1, nodes=1, micro_batch_size=8, seq_len=64, global_batch_tokens=1024)
    with pytest.raises(UserError, match="give either max_tokens or trainer.max_steps, not both"):
        geometry.max_steps(4096, 9)
    with pytest.raises(UserError, match="set max_tokens \\(or trainer.max_steps\\)"):
        geometry.max_steps(None, -1)


def test_overrides_are_read_as_fit_reads_them(tmp_path):
    pairs = override_pairs(
        ["--a.b", "7", "--c=x y", "--print_config", "--a.b=null", "--d", '"7"', "--config", "7"]
    )
    assert pairs == [("a.b", 7), ("c", "x y"), ("a.b", None), ("d", "7"), ("config", "7")]
    loaded = Recipe.load(str(write_recipe(tmp_path)), ["--data.seq_len", "32", "--trainer.devices=2"])
    assert loaded.get("data.seq_len") == 32 and loaded.get("trainer.devices") == 2
    assert loaded.get("data.micro_batch_size") == 8  # the recipe's
    assert loaded.get("run_dir") == "runs/default" and loaded.get("data.num_workers") == 2  # defaults
    assert loaded.geometry(2, 1).accumulation == 2  # 1024 / (8 x 32 x 2)


def test_a_later_config_merges_over_the_recipe_in_order(tmp_path):
    base = write_recipe(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  global_batch_tokens: 2048\n  seed: 3\n")
    loaded = Recipe.load(
        str(base), ["--data.seed", "9", "--config", str(overlay), "--data.global_batch_tokens=4096"]
    )
    assert loaded.get("data.seed") == 3  # the overlay came after --data.seed 9
    assert loaded.get("data.global_batch_tokens") == 4096 and loaded.get("data.seq_len") == 64
    layered = Recipe.load(
        "tinyllama-1.1b", ["--config", "deepseek-multistep"]
    )  # shipped names, as fit reads them
    assert layered.get("run_dir") == "runs/tinyllama-1.1b-multistep" and layered.get("max_tokens")


def error_line(capsys) -> str:
    """The message of the one error line a command printed."""
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0].split(": error: ", 1)[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--data.micro_batch_size", "0"], "data.micro_batch_size must be positive, got 0"),
        (["--data.global_batch_tokens", "0"], "data.global_batch_tokens must be positive, got 0"),
        (["--data.global_batch_tokens", "1280"], "must be a multiple of micro_batch_size x seq_len"),
        (["--trainer.devices", "3"], "= 8 x 64 x 3 x 1 = 1,536"),
        (["--trainer.num_nodes=2", "--trainer.devices", "2"], "= 8 x 64 x 2 x 2 = 2,048"),
        (["--max_tokens", "4096"], "give either max_tokens or trainer.max_steps, not both"),
        (["--trainer.max_steps", "-1"], "set max_tokens (or trainer.max_steps)"),
    ],
)
def test_fit_and_submit_refuse_a_geometry_with_the_same_line(tmp_path, capsys, overrides, message):
    config = str(write_recipe(tmp_path))
    nodes = ["--nodes", "2"] if "--trainer.num_nodes=2" in overrides else []
    assert main(["fit", "--config", config, *overrides]) == 2
    from_fit = error_line(capsys)
    assert main(["submit", "--config", config, *nodes, "--dry-run", "--", *overrides]) == 2
    from_submit = error_line(capsys)
    assert from_fit == from_submit and message in from_fit, (from_fit, from_submit)


def test_an_overlay_recipe_is_checked_by_submit_as_by_fit(tmp_path, capsys):
    config = str(write_recipe(tmp_path))
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  global_batch_tokens: 1280\n")
    assert main(["fit", "--config", config, "--config", str(overlay)]) == 2
    from_fit = error_line(capsys)
    assert main(["submit", "--config", config, "--dry-run", "--", "--config", str(overlay)]) == 2
    assert error_line(capsys) == from_fit and "must be a multiple of" in from_fit


def test_a_default_changed_in_one_place_is_seen_by_fit_and_submit(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(recipe.DEFAULTS, "run_dir", str(tmp_path / "elsewhere"))
    monkeypatch.setitem(recipe.DEFAULTS, "data.num_workers", 5)
    config = str(write_recipe(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run_dir"] == str(tmp_path / "elsewhere") and printed["data"]["num_workers"] == 5
    assert main(["submit", "--config", config, "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=6" in script.splitlines()
    assert re.search(rf"#SBATCH --output={re.escape(str(tmp_path / 'elsewhere'))}/slurm/", script)
