"""``python -m medscale.sweep._child PARENT_PID ARGS...``: run ``medscale ARGS`` so that it dies with PARENT_PID.

The sweep launcher starts training through this wrapper: it asks the kernel (Linux ``PR_SET_PDEATHSIG``) to
SIGKILL this process when the launcher dies, then checks the launcher is still its parent, then runs the CLI
in-process. A killed launcher thus never leaves an orphan training a run whose lock it no longer holds.
"""

import ctypes
import os
import signal
import sys


def main() -> int:
    parent = int(sys.argv[1])
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return 1
    from medscale.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
