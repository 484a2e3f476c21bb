"""The `layerline` command: one entry point for every role's command line.

Each subcommand hands its arguments, untouched, to the `main(argv)` of the package that
`python -m PACKAGE` runs, so both spellings take the same options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # whose main(argv) runs the command
    summary: str
    prefix: tuple[str, ...] = ()  # arguments put before the user's


# Modules are imported only for the command that runs: `layerline --help` imports no torch.
COMMANDS = {
    "broker": Command("broker.__main__", "the broker: tracks stages, owns the layer map"),
    "stage": Command("stage.__main__", "a stage worker: holds a range of decoder layers"),
    "generate": Command("client.__main__", "generate text with a running cluster"),
    "status": Command("client.__main__", "the cluster's readiness and layer map", ("status",)),
    "jobs": Command("client.__main__", "recent and active requests", ("jobs",)),
    "tui": Command("tui.__main__", "the live cluster monitor"),
    "serve": Command("gateway.__main__", "the OpenAI-compatible HTTP API of a running cluster"),
    "run-cluster": Command(
        "layerline.cluster", "a broker and N stages on this machine, with a demo generation"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<12} {c.summary}" for name, c in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="layerline",
        usage="layerline [-h] COMMAND [ARGS ...]",
        description="Run one language model split by layers across processes.",
        epilog=f"commands:\n{listing}\n\n`layerline COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="see below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command's own --help must reach it, so only the first word is parsed here.
    args = build_parser().parse_args(argv[:1])
    command = COMMANDS[args.command]
    code = importlib.import_module(command.module).main([*command.prefix, *argv[1:]])
    return code or 0
