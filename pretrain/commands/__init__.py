"""The `pretrain` subcommands: one module each, all written the same way.

A command module's docstring is its `--help` description (usage first); it defines

    HELP                                  the one-line summary `pretrain --help` lists
    add_arguments(parser)                 its argparse arguments
    run(args) -> int                      the work, importing the core (torch, ...) only here

so `pretrain --help` never imports torch. `fit` instead has `main(argv)`: LightningCLI parses
its arguments (`pretrain fit --help`). Commands import the core (`pretrain.model`, `data`, `train`, `slurm`,
`run_dir`, `plot`); the core never imports a command.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

COMMANDS = {
    "model-info": "model_info",
    "data": "data",
    "fit": "fit",
    "plot": "plot",
    "submit": "submit",
    "status": "status",
    "export-hf": "export_hf",
    "import-hf": "import_hf",
    "expand": "expand",
    "average": "average",
    "generate": "generate",
    "eval": "eval",
    "anneal": "anneal",
}


def command(name: str) -> ModuleType:
    """The module of command `name`."""
    return import_module(f"{__name__}.{COMMANDS[name]}")
