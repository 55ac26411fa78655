"""`pip install .` (a wheel, not editable) gives a `pretrain` whose commands work from any directory:
the recipes, the sbatch template and the local-cluster scripts ship inside the package. The editable
install `scripts/setup.sh` makes (`pip install -e .`) serves lm-eval's `--model pretrain` too."""

from __future__ import annotations

import os
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


def in_venv() -> dict[str, str]:
    """The environment for the installed `pretrain`: no PYTHONPATH pointing at this clone."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def bare_venv(tmp: Path) -> Path:
    """A virtual environment that sees the test environment's packages (torch, lightning, lm-eval)
    through a path entry only, so that the test environment's own `pretrain` install is not seen."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def copy_of_the_clone(tmp: Path) -> Path:
    """A copy of the sources: building writes build/ and *.egg-info beside them."""
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*UNSHIPPED))
    return source


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed and torch & co. already present (no network)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = copy_of_the_clone(tmp)
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
    venv = bare_venv(tmp)
    pip_install(venv, str(wheel))
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


def pip_install(venv: Path, *args: str) -> str:
    """`pip install --no-deps` into `venv`, offline; returns what pip and the build printed."""
    command = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    command += ["--no-deps", "--no-index", "--no-build-isolation", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def editable(tmp_path_factory) -> tuple[Path, Path, str]:
    """(venv, clone, pip's output) of `pip install -e .` as scripts/setup.sh runs it, without the deps."""
    tmp = tmp_path_factory.mktemp("editable")
    source, venv = copy_of_the_clone(tmp), bare_venv(tmp)
    return venv, source, pip_install(venv, "-e", str(source))


def test_editable_install_serves_lm_eval_model_pretrain(editable, tmp_path):
    venv, source, _ = editable
    resolve = "from lm_eval.api.registry import get_model; model = get_model('pretrain'); "
    resolve += "print(model.__module__, model.__name__, __import__('pretrain').__file__)"
    result = subprocess.run(
        [venv / "bin" / "python", "-c", resolve], cwd=tmp_path, capture_output=True, text=True, env=in_venv()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        "pretrain.eval.backend",
        "PretrainLM",
        str(source / "pretrain" / "__init__.py"),
    ]


def test_editable_install_is_quiet_and_not_shadowed_by_a_pretrain_folder(editable, tmp_path):
    """setuptools' import-finder strategy (its "be careful with folders" warning) let any folder named
    `pretrain` in the working directory stand in for the package: the clone is on sys.path instead."""
    venv, source, output = editable
    assert "Editable installation" not in output and "careful with folders" not in output
    (tmp_path / "pretrain").mkdir()  # e.g. a folder of runs named after the project
    where = "import pretrain; print(pretrain.__file__)"
    result = subprocess.run(
        [venv / "bin" / "python", "-c", where], cwd=tmp_path, capture_output=True, text=True, env=in_venv()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(source / "pretrain" / "__init__.py")


def pretrain(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [venv / "bin" / "pretrain", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=in_venv(),
    )


def test_installed_wheel_runs_commands_from_any_directory(installed, tmp_path):
    where = subprocess.run(
        [installed / "bin" / "python", "-c", "import pretrain; print(pretrain.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env=in_venv(),
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
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=in_venv())
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(written.read_text())["results"][NEXT_LINE]
    ours = scores(run_tasks(PretrainLM(str(model)), load_tasks([NEXT_LINE]), limit=16))[NEXT_LINE]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
