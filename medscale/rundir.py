"""A run directory: its file names, atomic writes, the summary, the run's lock and its checkpoints.

Layout (``docs/interfaces.md``, "Run directory contract")::

    <workdir>/config.json      the resolved config (training writes it first)
    <workdir>/metrics.jsonl    one JSON row per logged train/eval step
    <workdir>/summary.json     written once, at the end of the run (its presence means "finished")
    <workdir>/run.lock         while a process owns the run (see RunLock)
    <workdir>/checkpoints/     orbax checkpoints, one folder per step
    <workdir>/sweep.json       a sweep's plan of the run; train.log the output of a launched run

Every file the project writes goes through :func:`atomic_path` (a temporary file in the same folder, then
``os.replace``), so a reader never sees half a file.

The lock is one file per run, ``run.lock``, created with ``O_CREAT | O_EXCL`` and holding JSON ``{pid, host,
start, child_pid, child_start, created}``; ``start`` is the process start time from ``/proc/<pid>/stat`` so a
recycled pid is not mistaken for the owner. Its owner is either ``medscale train`` itself or a sweep launcher,
which records the training process it started as ``child_pid``. A lock is *live* when, on this host, its owner
(or that child) still runs; a lock from another host is live while its mtime is fresher than ``stale_after_s``
(a launcher touches its locks as a heartbeat). A dead owner's lock is reclaimed: staleness is re-checked and the
file replaced under a folder-wide ``fcntl`` mutex, so two processes reclaiming at once cannot both win.

Standard library only at import time (orbax is imported by the checkpoint functions, which need it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from medscale.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = "run.lock"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"  # TensorBoard event files (MEDSCALE_TENSORBOARD=0: none)
PLAN = "sweep.json"
LOG = "train.log"
STALE_AFTER_S = 600.0


def path(workdir: str, name: str) -> str:
    """``workdir/name`` for one of the names above."""
    return os.path.join(workdir, name)


# ---------------------------------------------------------------------------------------------- writes
@contextlib.contextmanager
def atomic_path(dest: str):
    """Yield a temporary path next to ``dest`` (same extension, so writers that go by it still work); on
    success it replaces ``dest`` atomically, on failure it is removed. The folder is created if needed."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(dest)[1]
    tmp = os.path.join(folder, f".{os.path.basename(dest)}.{os.getpid()}.tmp{ext}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(dest: str, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically (fsynced before the rename)."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text(dest: str, text: str) -> None:
    write_bytes(dest, text.encode())


def json_default(x):
    """JSON for numpy scalars and arrays, tuples and objects with ``to_dict`` (ConfigDict)."""
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(dest: str, obj, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON (one space), atomically."""
    write_text(dest, json.dumps(obj, indent=1, sort_keys=sort_keys, default=json_default) + "\n")


# ---------------------------------------------------------------------------------------------- reads
def read_json(file: str):
    """Parsed JSON at ``file``; None if absent; UserError if corrupt."""
    try:
        with open(file) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{file} is not valid JSON ({exc}); delete it to let the run be redone") from None


def read_summary(workdir: str) -> dict | None:
    """The run's summary.json (None while it has not finished); UserError if corrupt."""
    return read_json(path(workdir, SUMMARY))


def summary_line(summary: dict) -> str:
    """The one-line account of a summary that ``medscale train`` prints."""
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    return (f"status {summary.get('status')}  steps {summary.get('steps')}  tokens {summary.get('tokens')}  "
            f"train loss {fmt(summary.get('final_train_loss'))}  eval loss {fmt(summary.get('final_eval_loss'))}"
            f"  mfu {fmt(summary.get('mfu'))}")


def read_config(workdir: str) -> dict | None:
    return read_json(path(workdir, CONFIG))


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the run's checkpoints, ascending."""
    d = path(workdir, CHECKPOINTS)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


# ---------------------------------------------------------------------------------------------- lock
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


def read_lock(file: str) -> dict | None:
    try:
        with open(file) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written or corrupt: judged by mtime below


def lock_live(file: str, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the lock file at ``file`` is held by a live process."""
    info = read_lock(file)
    if info is None:
        return False
    try:
        age = time.time() - os.stat(file).st_mtime
    except FileNotFoundError:
        return False
    if not info or info.get("host") != socket.gethostname():
        return age < stale_after_s
    return pid_alive(info.get("pid"), info.get("start")) or pid_alive(info.get("child_pid"),
                                                                      info.get("child_start"))


@contextlib.contextmanager
def _mutex(dirpath: str):
    mutex = os.path.join(os.path.dirname(os.path.abspath(dirpath)), ".reclaim.mutex")
    fd = os.open(mutex, os.O_CREAT | os.O_RDWR, 0o644)
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
        self.path = path(run_dir, LOCK)
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

    def holder(self) -> str:
        """Who holds the lock, in words (for an error message)."""
        info = read_lock(self.path) or {}
        return f"pid {info.get('pid')} on {info.get('host')}" if info else "another process"

    def set_child(self, pid: int) -> None:
        """Record the training process this lock's owner started (atomically rewritten)."""
        if self.info is None:
            return
        self.info.update(child_pid=pid, child_start=proc_start(pid))
        with atomic_path(self.path) as tmp, open(tmp, "w") as fh:
            json.dump(self.info, fh)

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


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_manager(workdir: str, create: bool = True):
    """The run's orbax CheckpointManager (``workdir/checkpoints``; two kept, synchronous saves)."""
    import orbax.checkpoint as ocp  # heavy (JAX, TensorStore): only the functions that read/write checkpoints

    if create:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    else:
        options = ocp.CheckpointManagerOptions(create=False)
    return ocp.CheckpointManager(os.path.abspath(path(workdir, CHECKPOINTS)), options=options)


def restore_params(workdir: str, step: int | None = None, abstract_state=None):
    """(params pure dict, step) of a training checkpoint (``{"state": {"params", "opt", ...}, "data": ...}``
    under ``workdir/checkpoints/<step>``; the latest when ``step`` is None). Restored as saved when that works
    (no dependence on the optimiser's structure), else against ``abstract_state()`` (a callable returning the
    training loop's abstract state, e.g. on one device for a checkpoint saved under a mesh)."""
    import orbax.checkpoint as ocp  # heavy: see checkpoint_manager

    steps = checkpoint_steps(workdir)
    if not steps:
        raise UserError(f"{workdir} has no checkpoint yet (no {CHECKPOINTS}/<step>); train it first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"--checkpoint {step}: not in {workdir}; available steps: {', '.join(map(str, steps))}")
    mgr = checkpoint_manager(workdir, create=False)
    try:
        try:
            restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception:
            if abstract_state is None:
                raise
            restored = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state())))
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign checkpoint is the user's to fix
        raise UserError(f"checkpoint {step} of {workdir} does not restore ({type(exc).__name__}: {exc}); "
                        "delete it or give another --checkpoint") from None
    finally:
        mgr.close()
    state = restored["state"]
    if not isinstance(state, dict) or "params" not in state:
        raise UserError(f"checkpoint {step} of {workdir} holds no parameters; is it a medscale run?")
    return state["params"], int(step)
