"""`pip install .` (a wheel, not editable) gives a `pretrain` whose commands work from any directory:
the recipes, the sbatch template and the local-cluster scripts ship inside the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNSHIPPED = (".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", "out", "*.bin")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed and torch & co. already present (no network)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*UNSHIPPED))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp.glob("pretrain-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # torch, lightning, ... from the test environment: a path entry only, so its editable
    # `pretrain` (installed by a .pth hook there) is not seen.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in (
        "pretrain/recipes/tiny.yaml",
        "pretrain/slurm/train.sbatch.template",
        "pretrain/slurm/local/up.sh",
        "pretrain/eval/tasks/pystdlib_next_line.jsonl",
        "pretrain-lm-eval.pth",
    ):
        assert shipped in names
    return venv


def pretrain(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [venv / "bin" / "pretrain", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_installed_wheel_runs_commands_from_any_directory(installed, tmp_path):
    where = subprocess.run(
        [installed / "bin" / "python", "-c", "import pretrain; print(pretrain.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(installed)), where  # the wheel's copy, not the clone

    info = pretrain(installed, "model-info", "tiny", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "7,342,336" in info.stdout

    submit = pretrain(installed, "submit", "--config", "tiny", "--dry-run", cwd=tmp_path)
    assert submit.returncode == 0, submit.stderr
    assert "#SBATCH --signal=USR1@300" in submit.stdout
    assert f"--config {installed}" in submit.stdout  # the shipped recipe, by its installed path
    assert "srun --kill-on-bad-exit=1" in submit.stdout

    parsed = pretrain(installed, "fit", "--config", "tiny", "--print_config", cwd=tmp_path)
    assert parsed.returncode == 0, parsed.stderr
    assert "run_dir: runs/tiny" in parsed.stdout


def test_lm_eval_cli_finds_the_pretrain_backend(installed, tiny_dataset, tmp_path):
    """`lm_eval run --model pretrain`: the entry point (bridged by the wheel's .pth for lm-eval 0.4.x)
    loads our backend, which scores as `pretrain eval` does."""
    import json

    import torch
    import yaml

    from pretrain.eval.backend import PretrainLM
    from pretrain.eval.harness import NEXT_LINE, embedded_task, load_tasks, run_tasks, scores
    from pretrain.model import Llama, LlamaConfig
    from pretrain.model.checkpoint import ModelCheckpoint, save_model_checkpoint

    config = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128)
    torch.manual_seed(0)
    tokenizer = (tiny_dataset / "tokenizer.json").read_text()
    meta = {"eos_id": 0, "bos_id": None}
    model = save_model_checkpoint(
        tmp_path / "model.pt", ModelCheckpoint(config, Llama(config).state_dict(), tokenizer, meta)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{NEXT_LINE}.yaml").write_text(yaml.safe_dump(embedded_task(NEXT_LINE)))
    command = [installed / "bin" / "python", "-m", "lm_eval", "run", "--model", "pretrain"]
    command += ["--model_args", f"checkpoint={model}", "--tasks", NEXT_LINE, "--include_path", str(tasks)]
    command += ["--limit", "16", "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(written.read_text())["results"][NEXT_LINE]
    ours = scores(run_tasks(PretrainLM(str(model)), load_tasks([NEXT_LINE]), limit=16))[NEXT_LINE]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
