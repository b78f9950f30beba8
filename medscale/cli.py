"""The ``medscale`` entry point: parse, call the library, print.

Subcommands live in ``medscale/commands/<name>.py``; ``medscale.commands.COMMANDS`` names them with their help.
Only the module of the command being run is imported (by name, like a plugin), so ``medscale budget`` never
loads JAX while ``medscale --help`` still lists every command. This module owns the
error convention for every command: a :class:`medscale.errors.UserError` (or an argparse usage error)
prints one line ``error: ...`` to stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medscale import __version__
from medscale.commands import COMMANDS, command_word
from medscale.errors import UserError
from medscale.kernels.malloc import tune_malloc_for_cpu


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow the project's one-line convention."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``medscale``: every command listed; the one ``argv`` names (all, when ``argv`` is None)
    is imported and registers its own arguments."""
    parser = _Parser(prog="medscale", description="Compute-optimal scaling studies of a multimodal medical "
                     "encoder-decoder: budget, flops, train, sweep, fit, report, generate, evaluate, bench.")
    parser.add_argument("--version", action="version", version=f"medscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen, rest = (None, ()) if argv is None else command_word(argv)
    for name in sorted(COMMANDS):
        if argv is None or name == chosen:
            importlib.import_module(f"medscale.commands.{name}").register(sub, rest)
        else:
            sub.add_parser(name, help=COMMANDS[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    # before any command starts JAX's thread pools, and only where JAX will run on the CPU
    # (medscale/kernels/malloc.py: one malloc arena for XLA:CPU, which the step's build would set too late)
    tune_malloc_for_cpu()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        code = args.func(args)
        return int(code or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
