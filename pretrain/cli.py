"""The `pretrain` command: one entry point, one subcommand per job (`pretrain.commands`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pretrain import __version__
from pretrain.commands import COMMANDS, command
from pretrain.errors import UserError, one_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Pretrain and continually pretrain small Llama-architecture language models.",
    )
    parser.add_argument("--version", action="version", version=f"pretrain {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = command(name)
        sub = subcommands.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=name != "fit",  # LightningCLI prints `pretrain fit --help`
        )
        if name != "fit":
            module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:  # LightningCLI parses its own arguments
        return int(command("fit").main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(command(args.command).run(args) or 0)
    except UserError as err:
        print(f"pretrain {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
