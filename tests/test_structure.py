"""The package's shape: imports run one way, private Lightning APIs live in one module and still
exist, the shipped recipes are found by name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import pretrain
from pretrain.errors import UserError

PACKAGE = Path(pretrain.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every `pretrain...` module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("pretrain")}


def module_imports() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts).removesuffix(".__init__")] = imports_of(path)
    return modules


@pytest.mark.parametrize(
    "importer,forbidden",
    [
        # the core never imports a command
        ("pretrain.model", ("pretrain.commands", "pretrain.cli")),
        ("pretrain.data", ("pretrain.commands", "pretrain.cli")),
        ("pretrain.train", ("pretrain.commands", "pretrain.cli")),
        # the run directory judges checkpoints with a check passed in: it opens no weights itself
        (
            "pretrain.run_dir",
            ("pretrain.commands", "pretrain.cli", "pretrain.train", "pretrain.slurm", "pretrain.model"),
        ),
        ("pretrain.slurm", ("pretrain.commands", "pretrain.cli", "pretrain.train")),
        # the recipe and file writing sit at the bottom: everyone reads them, they read no one
        (
            "pretrain.recipe",
            ("pretrain.train", "pretrain.model", "pretrain.data", "pretrain.slurm", "pretrain.commands"),
        ),
        (
            "pretrain.files",
            ("pretrain.train", "pretrain.model", "pretrain.data", "pretrain.slurm", "pretrain.commands"),
        ),
        ("pretrain.plot", ("pretrain.commands", "pretrain.cli", "pretrain.train")),
        # training needs nothing from submission, plotting, averaging or generation
        (
            "pretrain.train",
            ("pretrain.slurm", "pretrain.plot", "pretrain.model.average", "pretrain.model.generate"),
        ),
        # model and data sit below training
        ("pretrain.model", ("pretrain.train", "pretrain.slurm", "pretrain.run_dir")),
        ("pretrain.data", ("pretrain.train", "pretrain.model", "pretrain.slurm", "pretrain.run_dir")),
    ],
)
def test_imports_run_one_way(importer, forbidden):
    arrows = [
        f"{module} imports {target}"
        for module, targets in module_imports().items()
        if module == importer or module.startswith(importer + ".")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]
    assert not arrows, arrows


def test_the_data_reading_path_needs_nothing_from_preparation():
    """Training reads shards through pretrain.data; raw text -> shards (pretrain.data.prepare) sits beside it."""
    arrows = [
        f"{module} imports {target}"
        for module, targets in module_imports().items()
        if module.startswith("pretrain.data") and not module.startswith("pretrain.data.prepare")
        for target in targets
        if target.startswith("pretrain.data.prepare")
    ]
    assert not arrows, arrows


@pytest.mark.parametrize("module", ["recipe", "files"])
def test_bottom_modules_import_no_torch(module):
    """`pretrain submit` and `pretrain status` start fast: what they read imports neither torch nor
    Lightning, at the top or inside a function."""
    heavy = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        heavy |= {n for n in names if n.split(".")[0] in ("torch", "lightning", "numpy")}
    assert not heavy, heavy


def test_weights_are_opened_in_one_module():
    """Only pretrain.model.checkpoint reads weight files (torch.load, safetensors, DCP)."""
    readers = {"torch.load(", "load_file(", "dcp.load(", "FileSystemReader("}
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "checkpoint.py" and any(reader in path.read_text() for reader in readers)
    ]
    # weight copies reload their own sharded state on resume (inside Lightning's checkpoint load)
    assert offenders == ["train/callbacks/weight_copies.py"], offenders


def test_private_lightning_apis_still_exist():
    """Every private API pretrain.train.private_apis relies on; fails naming the one an upgrade broke."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pretrain.train import private_apis

    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    strategy = ModelParallelStrategy()
    required = [
        (private_apis.SignalConnector, "_get_current_signal_handlers"),
        (private_apis.SignalConnector, "register_signal_handlers"),
        (trainer, "_signal_connector"),
        (strategy, "_data_parallel_size"),
        (strategy, "_tensor_parallel_size"),
        (strategy, "_save_distributed_checkpoint"),
        (torch.cuda.memory, "_record_memory_history"),
        (torch.cuda.memory, "_dump_snapshot"),
        (trainer, "_checkpoint_connector"),
        (trainer._checkpoint_connector, "dump_checkpoint"),
    ]
    missing = [
        f"{type(owner).__name__ if not isinstance(owner, type) else owner.__name__}.{name}"
        for owner, name in required
        if not hasattr(owner, name)
    ]
    assert not missing, (
        f"Lightning {L.__version__} no longer has {missing}: update pretrain/train/private_apis.py "
        "(and the Lightning bound in pyproject.toml)"
    )
    assert isinstance(trainer._signal_connector, private_apis.SignalConnector)


def test_no_private_lightning_or_torch_import_outside_private_apis():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "private_apis.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in ("lightning", "torch")
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private += [p for p in node.module.split(".") if p.startswith("_")]
                if private:
                    offenders.append(f"{path.relative_to(PACKAGE)}: {node.module} {private}")
    assert not offenders, offenders


def test_shipped_recipes_are_found_by_name(tmp_path, monkeypatch):
    from pretrain.recipe import recipe_path, shipped_recipes

    monkeypatch.chdir(tmp_path)  # outside the clone: no configs/ here
    assert {"tiny", "tinyllama-1.1b", "continual/infinite-anneal"} <= set(shipped_recipes())
    assert Path(recipe_path("tiny")).read_text() == (PACKAGE / "recipes" / "tiny.yaml").read_text()
    assert recipe_path("configs/tiny.yaml") == recipe_path("tiny.yaml") == recipe_path("tiny")
    (tmp_path / "mine.yaml").write_text("run_dir: x\n")
    assert recipe_path("mine.yaml") == "mine.yaml"
    with pytest.raises(UserError, match="no shipped recipe of that name; shipped: .*tiny"):
        recipe_path("tinyy")


def test_every_command_follows_the_convention():
    from pretrain.commands import COMMANDS, command

    for name in COMMANDS:
        module = command(name)
        assert module.__doc__ and isinstance(module.HELP, str), name
        if name == "fit":
            assert callable(module.main)
        else:
            assert callable(module.add_arguments) and callable(module.run), name
    assert importlib.import_module("pretrain.cli").build_parser().prog == "pretrain"
