"""The `pretrain` command: one entry point, one subcommand per job.

Each subcommand's arguments are declared next to the code that runs it (a `register`
function per module); heavy imports happen only when a subcommand runs, so
`pretrain --help` is instant and never needs an optional package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pretrain import __version__
from pretrain.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from pretrain import average_cli, generate_cli, plot, slurm
    from pretrain.data import cli as data_cli
    from pretrain.model import cli as model_cli

    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Pretrain and continually pretrain small Llama-architecture language models.",
    )
    parser.add_argument("--version", action="version", version=f"pretrain {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model_cli.register(subcommands)
    data_cli.register(subcommands)
    subcommands.add_parser(
        "fit",
        add_help=False,
        help="train from a YAML recipe (LightningCLI; `pretrain fit --help` for options)",
    )
    plot.register(subcommands)
    slurm.register(subcommands)
    average_cli.register(subcommands)
    generate_cli.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:  # LightningCLI parses its own arguments
        from pretrain import signals

        previous = signals.install_signal_handlers()  # first: SIGUSR1/SIGTERM only set a flag from now
        try:
            from pretrain.train.cli import fit

            return fit(argv[1:])
        except UserError as err:
            print(f"pretrain fit: error: {err}", file=sys.stderr)
            return 2
        finally:
            signals.restore_signal_handlers(previous)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"pretrain {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
