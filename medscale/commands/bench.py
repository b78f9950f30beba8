"""``medscale bench <what>``: benchmarks. Each one is a module ``medscale/commands/_bench_<what>.py`` with
``register(subparsers)`` (help ``BENCHMARKS[what]``); it parses and prints, the benchmark itself is in
``medscale/bench/``. Only the module of the benchmark being run is imported (as for the top-level commands)."""

import importlib

from medscale.commands import COMMANDS, command_word

BENCHMARKS = {
    "data": "input-pipeline throughput (examples/s, batches/s) without a model",
    "fit": "Approach 3 fit: vectorised multistart vs plain scipy loop (time, objective)",
    "gpu": "GPU acceptance: sharded == unsharded, attention in bf16/fp16, float16 loss-scaled steps, MFU",
    "seqlen": "peak memory, step time and MFU of the train step vs encoder length, per attention implementation "
              "and remat policy",
    "step": "training-step throughput and MFU of one model shape",
    "sweep": "a fixed small sweep through the local launcher: utilisation, wall time and where it goes",
    "torch": "the training step against PyTorch (same shapes, same machine, one run)",
}


def register(sub, argv=()):
    parser = sub.add_parser("bench", help=COMMANDS["bench"])
    inner = parser.add_subparsers(dest="bench", metavar="WHAT", parser_class=type(parser))
    chosen, _ = command_word(argv)
    for name in sorted(BENCHMARKS):
        if not argv or name == chosen:
            importlib.import_module(f"medscale.commands._bench_{name}").register(inner)
        else:
            inner.add_parser(name, help=BENCHMARKS[name])
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
