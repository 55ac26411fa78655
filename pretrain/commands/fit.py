"""Train from a YAML recipe (LightningCLI over `pretrain.train.fit.FitCLI`).

    pretrain fit --config RECIPE [--config MORE] [--section.key value ...] [--print_config]

RECIPE is a YAML file or a shipped recipe's name (`tiny`, `continual/infinite-anneal`, ...).
`pretrain fit --help` lists every option.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pretrain.errors import UserError, one_line

HELP = "train from a YAML recipe (LightningCLI; `pretrain fit --help` for options)"


def main(argv: Sequence[str]) -> int:
    """`pretrain fit ARGS`; the exit code of `pretrain.train.fit.fit`, or 2 on a user error."""
    from pretrain.train import signals

    previous = signals.install_signal_handlers()  # first: SIGUSR1/SIGTERM only set a flag from now
    try:
        from pretrain.train.fit import fit

        return fit(_with_recipe_paths(argv))
    except UserError as err:
        print(f"pretrain fit: error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        signals.restore_signal_handlers(previous)


def _with_recipe_paths(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--config NAME` of a shipped recipe replaced by its file."""
    from pretrain.recipe import recipe_path

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = recipe_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + recipe_path(arg.removeprefix("--config="))
    return out
