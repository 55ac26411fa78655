"""The compile cache (`pretrain.train.parallelize.use_compile_cache`): a relaunch loads what the first
launch compiled instead of compiling again, damaged cache content is compiled again (never a
failure), and a run keeps its cache in RUN_DIR/compile_cache/ unless the recipe names another."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import bare_trainer

from pretrain.train.module import PretrainModule
from pretrain.train.parallelize import use_compile_cache

# One launch: build a one-block model as `pretrain fit` does (parallelize with compile and a cache),
# run a training forward and backward, print torch's cache counters.
LAUNCH = """
import sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from pretrain.model import Llama, LlamaConfig
from pretrain.train.parallelize import parallelize
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64, max_seq_len=16)
model = Llama(config)
parallelize(model, compile=True, compile_cache=Path(sys.argv[1]))
tokens = torch.randint(0, 64, (2, 16))
model(tokens, targets=tokens).loss.backward()
print({**counters["inductor"], **counters["aot_autograd"]})
"""


def launch(cache: Path) -> tuple[dict[str, int], float, str]:
    """One launch on `cache`: torch's counters, its wall time, its stderr."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(cache)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return (
        ast.literal_eval(result.stdout.strip().splitlines()[-1]),
        time.perf_counter() - start,
        result.stderr,
    )


def cache_files(cache: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for path in cache.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_a_relaunch_loads_the_compiled_graphs_and_damaged_entries_are_compiled_again(tmp_path):
    cache = tmp_path / "shared" / "compile_cache"
    first, first_time, stderr = launch(cache)
    assert f"compile cache: {cache}" in stderr
    assert first.get("fxgraph_cache_miss", 0) > 0 and first.get("autograd_cache_saved", 0) > 0
    written = cache_files(cache)
    assert written
    second, second_time, _ = launch(cache)
    assert second.get("fxgraph_cache_hit", 0) + second.get("autograd_cache_hit", 0) > 0
    assert second.get("fxgraph_cache_miss", 0) == second.get("autograd_cache_miss", 0) == 0
    assert cache_files(cache) == written  # nothing compiled again
    assert second_time < first_time
    for path in written:  # damaged (or foreign) content under every name
        path.write_bytes(b"\xffnot what torch wrote")
    third, _, _ = launch(cache)
    assert third.get("fxgraph_cache_miss", 0) + third.get("autograd_cache_miss", 0) > 0


def test_a_run_keeps_its_compile_cache_in_the_run_dir_unless_the_recipe_names_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # restored after the test
    monkeypatch.setenv("TRITON_CACHE_DIR", "unset")
    for setting, expected in (
        (None, tmp_path / "run" / "compile_cache"),
        (str(tmp_path / "lab"), tmp_path / "lab"),
    ):
        module = PretrainModule(model_overrides={"n_layers": 1}, compile=True, compile_cache=setting)
        module.trainer = bare_trainer(default_root_dir=str(tmp_path / "run"))
        module.configure_model()  # compiles lazily, at the first forward: nothing compiled here
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(expected.resolve())
        assert Path(os.environ["TRITON_CACHE_DIR"]) == expected.resolve() / "triton"
        assert expected.is_dir()


@pytest.mark.parametrize("problem", ["a space", "a file"])
def test_a_compile_cache_folder_that_cannot_serve_is_passed_over_in_one_line(
    tmp_path, monkeypatch, capsys, problem
):
    """Spaces (inductor's C++ build splits its command line on them), a file in the way: the launch
    compiles into torch's default cache and says why."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "torch's own")
    cache = tmp_path / "cache"
    if problem == "a space":
        cache, why = tmp_path / "my runs" / "cache", "torch's C++ build cannot take a path with spaces"
    else:
        cache.write_text("mine")
        why = "cannot create it (File exists)"
    use_compile_cache(cache)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "torch's own"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"compile cache: not kept in {cache}: {why}; this launch uses torch's default cache "
        "(set model.compile_cache to a writable path without spaces)"
    ]
    assert problem != "a file" or cache.read_text() == "mine"
