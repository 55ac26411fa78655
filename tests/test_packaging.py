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
