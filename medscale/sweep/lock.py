"""One lock per run directory, so that two launchers never train the same run.

The lock is a file ``<run dir>/run.lock`` created with ``O_CREAT | O_EXCL`` holding JSON
``{pid, host, start, child_pid, child_start, created}``; ``start`` is the process start time from
``/proc/<pid>/stat`` so a recycled pid is not mistaken for the owner. A lock is *live* when, on this host, its
owner (or the training process it started) still runs; a lock from another host is live while its mtime is
fresher than ``stale_after_s`` (the launcher touches its locks as a heartbeat). A dead owner's lock is
reclaimed: staleness is re-checked and the file replaced under a sweep-wide ``fcntl`` mutex, so two launchers
reclaiming at once cannot both win.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time

LOCK_NAME = "run.lock"
STALE_AFTER_S = 600.0


def proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, from /proc), or None if unknown/absent."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[19]


def pid_alive(pid: int | None, start: str | None = None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is not None:
        now = proc_start(pid)
        if now is not None and now != start:
            return False  # the pid was recycled by another process
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return False


def read_lock(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written or corrupt: judged by mtime below


def lock_live(path: str, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the lock file at ``path`` is held by a live process."""
    info = read_lock(path)
    if info is None:
        return False
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if not info or info.get("host") != socket.gethostname():
        return age < stale_after_s
    return pid_alive(info.get("pid"), info.get("start")) or pid_alive(info.get("child_pid"),
                                                                      info.get("child_start"))


@contextlib.contextmanager
def _mutex(dirpath: str):
    import fcntl

    path = os.path.join(os.path.dirname(os.path.abspath(dirpath)), ".reclaim.mutex")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class RunLock:
    """``RunLock(run_dir).acquire()`` -> True if this process now holds the run; ``release()`` frees it."""

    def __init__(self, run_dir: str, stale_after_s: float = STALE_AFTER_S):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.stale_after_s = stale_after_s
        self.info = None

    def _create(self) -> bool:
        pid = os.getpid()
        info = {"pid": pid, "host": socket.gethostname(), "start": proc_start(pid), "child_pid": None,
                "child_start": None, "created": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        self.info = info
        return True

    def acquire(self, orphan_wait_s: float = 5.0) -> bool:
        os.makedirs(self.run_dir, exist_ok=True)
        if self._create():
            return True
        info = read_lock(self.path) or {}
        if info.get("host") == socket.gethostname() and not pid_alive(info.get("pid"), info.get("start")):
            # a dead launcher's training process gets SIGKILL from the kernel (PDEATHSIG): give it a moment
            deadline = time.time() + orphan_wait_s
            while time.time() < deadline and pid_alive(info.get("child_pid"), info.get("child_start")):
                time.sleep(0.1)
        with _mutex(self.run_dir):
            if lock_live(self.path, self.stale_after_s):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return self._create()

    def set_child(self, pid: int) -> None:
        """Record the training process this lock's owner started (atomically rewritten)."""
        if self.info is None:
            return
        self.info.update(child_pid=pid, child_start=proc_start(pid))
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.info, fh)
        os.replace(tmp, self.path)

    def heartbeat(self) -> None:
        if self.info is not None:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def owned(self) -> bool:
        info = read_lock(self.path)
        return bool(info) and self.info is not None and info.get("pid") == self.info["pid"] and \
            info.get("created") == self.info["created"]

    def release(self) -> None:
        if self.info is None:
            return
        if self.owned():
            try:
                os.unlink(self.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        self.info = None
