"""``python -m medscale.sweep._child PARENT_PID train --config C [--set K=V ...] --workdir W [--quiet]``: train one
run of a sweep so that the process dies with PARENT_PID.

The sweep launcher starts training through this wrapper: it asks the kernel (Linux ``PR_SET_PDEATHSIG``) to
SIGKILL this process when the launcher dies, then checks the launcher is still its parent, then trains in-process
(``medscale.train.loop.train`` with the end-of-run task evaluation, under the launcher's ``run.lock``). A killed
launcher thus never leaves an orphan training a run whose lock it no longer holds. The arguments are those of
``medscale train`` (its log line names them so); the output follows ``medscale train``'s: the summary line, or
one ``error: ...`` line and exit status 2 for a user error.
"""

import argparse
import ctypes
import os
import signal
import sys

from medscale.configs import load_config
from medscale.errors import UserError
from medscale.generate.evaluate import task_eval
from medscale.kernels.malloc import tune_malloc_for_cpu
from medscale.rundir import summary_line
from medscale.train.loop import train


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


def main() -> int:
    parent = int(sys.argv[1])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return 1
    tune_malloc_for_cpu()  # before JAX starts its thread pools
    try:
        args = parse(sys.argv[2:])
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, args.workdir, progress=not args.quiet, locked=True,
                        finish=lambda workdir, data: task_eval(cfg, workdir, data))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(summary))
    if summary.get("error"):
        print(f"  {summary['error']}", file=sys.stderr)
    return 0 if summary.get("status") == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
