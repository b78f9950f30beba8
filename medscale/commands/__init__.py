"""Subcommands of ``medscale``, one module each: ``medscale/commands/<name>.py``.

``COMMANDS`` names every command with its one-line help; ``medscale.cli`` lists them all in ``--help`` and
imports only the module of the command being run, so a command's module imports its library at module level
without every ``medscale X`` paying for JAX. Each module defines ``register(subparsers, argv=())``, which adds its
parser (help ``COMMANDS[name]``) and sets ``func`` with ``parser.set_defaults(func=run)``; ``run(args) -> int |
None`` calls the library and prints. ``argv`` holds the words after the command's name (all of them when the
whole parser is built: empty); a command with subcommands of its own (``bench``) imports only the one it
names, in the same way.
"""

COMMANDS = {
    "bench": "benchmarks: speed and memory as ratios or MFU",
    "budget": "compute budget -> compute-optimal size, tokens, loss, days",
    "data": "prepare the dataset, tokenizers and token caches; show examples",
    "evaluate": "task metrics of a trained run on held-out data (into summary.json)",
    "fit": "fit scaling laws (Approaches 1/2/3) with bootstrap intervals",
    "flops": "parameters and FLOPs per training step, by component",
    "memory": "per-device memory of a training step; the fastest mesh, micro-batches and remat that fit",
    "generate": "decode caption/boxes/segmentation of an image with a trained run",
    "plan": "the next runs worth buying: those that most shrink the interval of N_opt",
    "quickstart": "the whole loop on CPU: sweep, fit, report, recommendation",
    "report": "the study report: laws, recommendation for a budget, figures, comparison",
    "sweep": "run, inspect and export sweeps of training runs",
    "train": "train one model (resumes when the workdir has a checkpoint)",
}


def command_word(argv) -> tuple[str | None, list[str]]:
    """(the first word of ``argv`` that is not an option, the words after it): the (sub)command it runs."""
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            return word, list(argv[i + 1:])
    return None, []
