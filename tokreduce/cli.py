"""The ``tokreduce`` command: a registry of subcommands (eval, bench, demo).

A subcommand is registered with :func:`register_command`; its module is imported only when that
subcommand runs, so ``tokreduce --help`` stays fast and needs no optional dependency.

Every error ends the command with one line on stderr, ``tokreduce COMMAND: error: <what and how to fix
it>``, and an exit code: 2 when the request cannot run as given (a bad flag, config field, knob, path or
data file: ``ValueError``, ``FileNotFoundError``, ``ImportError``), 1 when a run that was fine to start
failed (anything else). ``TOKREDUCE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

USAGE_ERRORS = (ValueError, FileNotFoundError, ImportError)


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
register_command("demo", "Gradio demo: kept tokens, both answers, time and FLOPs saved", "tokreduce.demo.app")
register_command("bench", "prefill speed-up, overhead and KV bytes of each method against the FLOP ideal", "tokreduce.eval.bench")


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def exit_code(error: BaseException) -> int:
    """2 for a request that cannot run as given, 1 for a run that failed."""
    return 2 if isinstance(error, USAGE_ERRORS) else 1


def one_line(error: BaseException) -> str:
    """The error's message on one line; the type is named for errors other than the expected kinds."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (*USAGE_ERRORS, RuntimeError)) else f"{type(error).__name__}: {text}"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(
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
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"tokreduce {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("TOKREDUCE_DEBUG"):
            raise
        hint = "TOKREDUCE_DEBUG=1 shows the traceback"
        print(f"tokreduce {args.command}: error: {one_line(e)} ({hint})", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
