"""The ``tokreduce`` command: a registry of subcommands (eval, and demo / bench / info as they land).

A subcommand is registered with :func:`register_command`; its module is imported only when that
subcommand runs, so ``tokreduce --help`` stays fast and needs no optional dependency.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module`` defines ``add_arguments(parser)`` and ``run(args) -> int`` (exit code)."""

    name: str
    help: str
    module: str


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, module: str) -> None:
    """Add ``tokreduce NAME``; ``module`` (a dotted path) provides ``add_arguments`` and ``run``."""
    if name in COMMANDS and COMMANDS[name].module != module:
        raise ValueError(f"tokreduce subcommand {name!r} is already registered by {COMMANDS[name].module}")
    COMMANDS[name] = Command(name, help, module)


register_command(
    "eval", "batch video-QA evaluation: accuracy vs speed and memory for a sweep of methods", "tokreduce.eval.command"
)
register_command("demo", "Gradio demo: kept tokens, both answers, time and FLOPs saved", "tokreduce.demo_app")
register_command("bench", "prefill speed-up, overhead and KV bytes of each method against the FLOP ideal", "tokreduce.eval.bench")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokreduce", description="Remove redundant visual tokens from vision-language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.name == wanted:  # import only the module of the subcommand being run
            module = importlib.import_module(command.module)
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
