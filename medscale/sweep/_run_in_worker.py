"""One run inside a sweep worker (``medscale.sweep.worker``): parse ``medscale train`` arguments, train in-process
under the launcher's ``run.lock`` with the end-of-run task evaluation, print the summary line."""

from __future__ import annotations

import argparse
import logging
import sys

from medscale.configs import load_config
from medscale.errors import UserError
from medscale.generate.evaluate import task_eval
from medscale.rundir import summary_line
from medscale.train.loop import train

log = logging.getLogger(__name__)

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="medscale train")
    p.add_argument("command", choices=["train"])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--workdir", required=True)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def run(argv: list[str], cache: dict) -> int:
    """Train the run ``argv`` names; 0 done, 1 failed or diverged (its summary says why), 2 a user error.
    ``cache``: what the worker keeps between runs (``medscale.train.loop.train``'s ``cache``)."""
    try:
        args = parse(argv)
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, args.workdir, progress=not args.quiet, locked=True, cache=cache,
                        finish=lambda workdir, data: task_eval(cfg, workdir, data))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the run's failed summary is written by train; the worker goes on
        log.exception("training failed (%s)", type(exc).__name__)
        return 1
    print(summary_line(summary))
    if summary.get("error"):
        print(f"  {summary['error']}", file=sys.stderr)
    return 0 if summary.get("status") == "done" else 1
