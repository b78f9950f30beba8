"""``python -m medscale.sweep.worker PARENT_PID``: a warm training worker of the local sweep launcher.

The launcher starts up to ``workers`` of these and feeds each run after run over a pipe: one JSON line per run
on the worker's stdin, ``{"run_id", "argv", "log"}`` (``argv``: the arguments of ``medscale train ...``, whose
log line names them so; ``log``: the run's ``train.log``), answered by one JSON line on its stdout,
``{"run_id", "rc"}`` (0 done, 1 failed or diverged, 2 a user error), after the run's summary is written. The
worker's first line is ``{"ready": seconds it took to start}``. While a run trains, the worker's stdout and
stderr go to that run's log; the output follows ``medscale train``'s: the summary line, or one ``error: ...``
line for a user error.

What stays loaded between runs: the imports, JAX and its compiled programs (the train/eval programs of a shape
and schedule are built once per worker: ``medscale.train.loop``'s ``cache``), and the dataset with its
tokenizers (once per data config). At start the worker asks the kernel (Linux ``PR_SET_PDEATHSIG``) to SIGKILL
it when the launcher dies, then checks the launcher is still its parent: a killed launcher never leaves a worker
training a run whose lock it no longer holds. End of input (the launcher closes the pipe): the worker exits.
"""

import ctypes
import json
import os
import signal
import sys
import time

T0 = time.perf_counter()

from medscale.kernels.malloc import tune_malloc_for_cpu  # after T0: the start-up is timed
from medscale.sweep import _run_in_worker as runner


def _die_with_parent(parent: int) -> bool:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent


def main() -> int:
    if not _die_with_parent(int(sys.argv[1])):
        return 1
    control = os.fdopen(os.dup(1), "w", buffering=1)  # answers to the launcher; fd 1 becomes the run's log
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    tune_malloc_for_cpu()  # before JAX starts its thread pools
    control.write(json.dumps({"ready": time.perf_counter() - T0}) + "\n")
    cache: dict = {}
    err = os.dup(2)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        with open(job["log"], "ab") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                rc = runner.run(job["argv"], cache)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(quiet, 1)
                os.dup2(err, 2)
        control.write(json.dumps({"run_id": job.get("run_id"), "rc": rc}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
