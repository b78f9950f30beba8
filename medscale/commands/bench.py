"""``medscale bench <what>``: benchmarks. Each one is a module ``medscale/commands/_bench_<what>.py`` with
``register(subparsers)``, found automatically (same rules as the top-level commands)."""

import importlib
import pkgutil


def register(sub):
    parser = sub.add_parser("bench", help="benchmarks: speed and memory as ratios or MFU")
    inner = parser.add_subparsers(dest="bench", metavar="WHAT", parser_class=type(parser))
    from medscale import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_bench_"):
            importlib.import_module(f"medscale.commands.{info.name}").register(inner)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
