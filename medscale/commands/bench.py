"""``medscale bench <what>``: benchmarks. Each one is a module ``medscale/commands/_bench_<what>.py`` with
``register(subparsers)``, found automatically; it parses and prints, the benchmark itself is in
``medscale/bench/``."""

import importlib
import pkgutil

from medscale import commands
from medscale.commands import COMMANDS


def register(sub):
    parser = sub.add_parser("bench", help=COMMANDS["bench"])
    inner = parser.add_subparsers(dest="bench", metavar="WHAT", parser_class=type(parser))

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_bench_"):
            importlib.import_module(f"medscale.commands.{info.name}").register(inner)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
