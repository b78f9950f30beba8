"""The local sweep launcher: the runs of a sweep trained by a pool of warm worker processes.

Order: cheapest (accounted model FLOPs) first; the first run trains alone until one run is done (shared
caches are then built once), then up to ``workers`` at a time. Done, failed and diverged runs are skipped (``retry_failed``
reruns failed ones); interrupted runs are relaunched in their own directory, where training resumes from its
checkpoints; runs another launcher holds (live ``run.lock``) are left to it.

Each worker (``python -m medscale.sweep.worker``) is started once and fed run after run over a pipe (one JSON
line each way per run), so imports, data, tokenizers and compiled programs are loaded once per worker, not once
per run; JAX's persistent compilation cache is on (under ``<results>/.cache/jax`` unless the environment names
``JAX_COMPILATION_CACHE_DIR``), so workers and later launches reuse what another compiled.

A run that ends without a summary (a crash, a bad config) gets a ``failed`` summary written here, atomically,
with the error taken from its log; the sweep goes on. A worker that dies while training (a signal, a crash of
native code) costs only that run's progress since its last checkpoint: the worker is replaced and the run is
retried once from its checkpoint (``retries``), then marked failed if its worker dies again. Workers die with
the launcher (``PR_SET_PDEATHSIG``), so a killed launcher leaves no orphan writing to a run it no longer holds,
and its locks are reclaimed by the next launcher (dead pid), also on runs that had finished before it was killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import tqdm

import medscale
from medscale import rundir
from medscale.errors import UserError
from medscale.hardware import PF_DAY
from medscale.rundir import RunLock
from medscale.sweep import registry
from medscale.sweep.design import Run, expand, filter_runs, from_plan, load_definition, load_plan

log = logging.getLogger(__name__)

PLAN_NAME = rundir.PLAN
LOG_NAME = rundir.LOG


def package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(medscale.__file__)))


def write_plan(run: Run, results: str) -> str:
    """Create the run's directory and its ``sweep.json`` (rewritten only when the plan changed)."""
    d = run.workdir(results)
    os.makedirs(d, exist_ok=True)
    plan = run.plan()
    path = os.path.join(d, PLAN_NAME)
    try:
        current = rundir.read_json(path)
    except UserError:
        current = None
    if current != _roundtrip(plan):
        rundir.write_json(path, plan)
    return d


def _roundtrip(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=rundir.json_default))


def error_from_log(path: str, offset: int = 0, rc: int | None = None) -> str:
    """The most telling line of a training log (from byte ``offset``): its ``error: ...`` line, else the
    last line of a traceback, else the return code."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~")) and ("Error" in line or "Exception" in line):
            return line
    if rc is not None and rc < 0:
        return f"killed by signal {-rc}"
    tail = lines[-1] if lines else "no output"
    return f"training exited with status {rc}: {tail}"


def failed_summary(run: Run, error: str, workdir: str) -> dict:
    """A summary for a run whose training process ended without writing one (interfaces.md's keys)."""
    last = registry.last_train_row(rundir.path(workdir, rundir.METRICS)) or {}
    config = rundir.read_config(workdir)
    flops = last.get("flops")
    return {
        "run_id": run.run_id, "sweep": run.sweep, "status": "failed", "error": error, "config": config,
        "size": run.size, "params": run.params, "enc_len": run.enc_len, "dec_len": run.dec_len,
        "batch_size": run.batch_size, "steps": last.get("step"), "tokens": last.get("tokens"),
        "model_flops": flops, "hardware_flops": None, "xla_flops": None,
        "pf_days": None if flops is None else flops / PF_DAY, "wall_s": None, "device_kind": None,
        "device_count": None, "hardware": None, "mfu": None, "peak_flops": None, "time": None,
        "final_train_loss": last.get("loss"),
        "final_eval_loss": None, "final_train_loss_by_modality": {}, "final_eval_loss_by_modality": {},
        "task_metrics": {}, "loss_scale": last.get("loss_scale"), "skipped_steps": last.get("skipped_steps"),
        "data": None,
    }


def eta_seconds(finished, remaining, active, workers: int) -> float | None:
    """Seconds left for the sweep: each run's time modelled as ``overhead + flops x seconds_per_flop``, the two
    fitted (least squares) to the runs finished in this launch (``finished``: [(model FLOPs, wall s)]);
    ``remaining``: FLOPs of runs not started; ``active``: [(FLOPs, seconds elapsed)] of running ones; the work
    is shared by ``workers``. None until a run has finished."""
    if not finished:
        return None
    f = np.array([x[0] for x in finished], float)
    t = np.array([x[1] for x in finished], float)
    overhead, per_flop = 0.0, float(t.sum() / f.sum())
    if len(f) >= 2 and np.ptp(f) > 0:
        slope, intercept = np.polyfit(f, t, 1)
        if slope > 0 and intercept >= 0:
            overhead, per_flop = float(intercept), float(slope)
    work = sum(overhead + fl * per_flop for fl in remaining)
    work += sum(max(0.0, overhead + fl * per_flop - el) for fl, el in active)
    return work / max(1, min(workers, len(remaining) + len(active)) or 1)


class _Worker:
    """One worker process and the run it trains (``act``); JSON lines to its stdin, from its stdout."""

    def __init__(self, env: dict, errlog: str):
        argv = [sys.executable, "-m", "medscale.sweep.worker", str(os.getpid())]
        os.makedirs(os.path.dirname(errlog), exist_ok=True)
        with open(errlog, "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                         start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.started = time.time()
        self.ready_s: float | None = None
        self.act: _Active | None = None
        self.seen: set[tuple] = set()  # program keys (_program_key) of the runs it trained
        self._buf = b""

    def send(self, obj: dict) -> bool:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def messages(self) -> list[dict]:
        """The complete lines the worker has written since the last call."""
        try:
            chunk = self.proc.stdout.read()
        except (BlockingIOError, OSError, ValueError):
            chunk = None
        if chunk:
            self._buf += chunk
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            start = line.find(b"{")  # text a library wrote to stdout without a newline may precede it
            try:
                msg = json.loads(line[start:]) if start >= 0 else None
            except ValueError:
                continue
            if isinstance(msg, dict):
                out.append(msg)
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass


class _Active:
    def __init__(self, run, worker, lock, workdir, log_offset, started):
        self.run, self.worker, self.lock, self.workdir = run, worker, lock, workdir
        self.log_offset, self.started = log_offset, started
        self.base_flops = self.flops()
        ckpt = max(rundir.checkpoint_steps(workdir), default=0)  # where training resumes
        self.resume_flops = run.model_flops * ckpt / run.steps if run.steps else 0.0

    def flops(self) -> float:
        row = registry.last_train_row(rundir.path(self.workdir, rundir.METRICS))
        return float(row["flops"]) if row and row.get("flops") is not None else 0.0


class Launcher:
    """Runs ``runs`` under ``results`` with up to ``workers`` training processes; ``launch()`` -> report."""

    def __init__(self, runs: list[Run], results: str, workers: int = 1, progress: bool = True,
                 retry_failed: bool = False, env: dict | None = None, poll_s: float = 0.5,
                 train_args: tuple[str, ...] = (), first_alone: bool = True, compile_cache: str | None = None,
                 retries: int = 1):
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        self.runs, self.results, self.workers = list(runs), results, workers
        self.progress, self.retry_failed, self.poll_s = progress, retry_failed, poll_s
        self.env, self.train_args = env or {}, tuple(train_args)
        self.first_alone = first_alone
        self.retries = retries
        if compile_cache:  # workers and later launches reuse each other's compiled programs
            for key, value in (("JAX_COMPILATION_CACHE_DIR", os.path.abspath(compile_cache)),
                               ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                               ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")):
                if key not in os.environ:  # a user's own cache settings win
                    self.env.setdefault(key, value)
        self.attempts: dict[str, int] = {}
        self.outcome: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.timings: list[tuple[float, float]] = []  # (model FLOPs, wall s) of runs done in this launch
        self.flops_trained = 0.0  # model FLOPs trained in this launch (from each run's resumed step)
        self.peak_flops: float | None = None  # peak FLOP/s of the devices a run used (per device x devices)
        self.split = dict.fromkeys(registry.SPLIT_PARTS, 0.0)
        self.launched = 0

    # -- one run -------------------------------------------------------------------------------------
    def _worker_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH")) if p)
        env.update(self.env)
        return env

    def _new_worker(self) -> _Worker:
        w = _Worker(self._worker_env(), os.path.join(self.results, ".cache", "workers.log"))
        log.info("started worker pid %d", w.proc.pid)
        return w

    def _spawn(self, run: Run, worker: _Worker) -> _Active | None:
        """Hand ``run`` to ``worker`` under the run's lock; None when the run needs no training (then the
        worker stays idle)."""
        workdir = run.workdir(self.results)
        lock = RunLock(workdir)
        if not lock.acquire():
            self.outcome[run.run_id] = "running elsewhere"
            return None
        state = registry.run_state(workdir, locks=False)
        if state in ("done", "diverged") or (state == "failed" and not self.retry_failed):
            lock.release()  # finished meanwhile by another launcher
            self.outcome[run.run_id] = state
            return None
        if state == "failed":
            os.replace(rundir.path(workdir, rundir.SUMMARY),
                       os.path.join(workdir, f"summary.failed-{int(time.time())}.json"))
        log_path = os.path.join(workdir, LOG_NAME)
        argv = [*run.train_argv(workdir), "--quiet", *self.train_args]
        with open(log_path, "ab") as fh:
            offset = fh.tell()
            fh.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} launch ({state}): medscale {' '.join(argv)}\n"
                     .encode())
        lock.set_child(worker.proc.pid)
        worker.seen.add(_program_key(run))
        act = _Active(run, worker, lock, workdir, offset, time.time())
        worker.act = act
        worker.send({"run_id": run.run_id, "argv": argv, "log": os.path.abspath(log_path)})
        log.info("started %s (%s) on worker %d", run.run_id, state, worker.proc.pid)
        return act

    def _finish(self, act: _Active, rc: int) -> None:
        summary_path = rundir.path(act.workdir, rundir.SUMMARY)
        try:
            summary = rundir.read_json(summary_path)
        except UserError as exc:
            summary, rc = None, rc or 1
            os.replace(summary_path, summary_path + ".corrupt")
            log.warning("%s", exc)
        if summary is None:
            error = error_from_log(os.path.join(act.workdir, LOG_NAME), act.log_offset, rc) if rc else \
                "training exited without writing summary.json"
            rundir.write_json(summary_path, failed_summary(act.run, error, act.workdir))
            status = "failed"
        else:
            status = summary.get("status", "done")
            error = summary.get("error")
        self._account(act, summary)
        if error and status != "done":
            self.errors[act.run.run_id] = str(error)
        if status == "done":
            self.timings.append((act.run.model_flops, time.time() - act.started))
        self.outcome[act.run.run_id] = status
        act.lock.release()
        act.worker.act = None
        log.info("%s: %s", act.run.run_id, status)

    def _retry(self, act: _Active, rc: int) -> bool:
        """A worker died while training ``act``: True to train the run again (from its last checkpoint, on a new
        worker) when it has retries left; its lock is released either way (taken again when it restarts)."""
        n = self.attempts[act.run.run_id] = self.attempts.get(act.run.run_id, 0) + 1
        why = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        if n > self.retries or rundir.read_summary(act.workdir) is not None:
            return False
        ckpt = max(rundir.checkpoint_steps(act.workdir), default=0)
        with open(os.path.join(act.workdir, LOG_NAME), "ab") as fh:
            fh.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} worker {why}; retrying from the last checkpoint "
                     f"(step {ckpt})\n".encode())
        log.warning("%s: worker %s; retrying", act.run.run_id, why)
        act.lock.release()
        return True

    def _account(self, act: _Active, summary: dict | None) -> None:
        """Add a finished run's training to this launch's use of the machine."""
        summary = summary or {}
        trained = float(summary.get("model_flops") or 0.0) - act.resume_flops
        self.flops_trained += max(0.0, trained)
        peak = summary.get("peak_flops")
        if peak:
            self.peak_flops = max(self.peak_flops or 0.0, float(peak) * int(summary.get("device_count") or 1))
        for key, value in (summary.get("time") or {}).items():
            if key in self.split and value:
                self.split[key] += float(value)

    def usage(self, wall_s: float) -> dict:
        """This launch's use of the machine: ``utilisation`` = model FLOPs trained / (wall seconds x the peak
        FLOP/s of the devices in use, measured for a CPU), ``model_flops``, ``peak_flops``, ``pf_days`` (of
        this launch's training) and ``split``: run-seconds by part (start-up, compilation, training steps,
        evaluation, checkpoints, task evaluation; ``other_s``: the rest of the workers' wall time: process
        start, imports, waiting)."""
        split = dict(self.split)
        slots = min(self.workers, self.launched) if self.launched else 0
        split["other_s"] = max(0.0, slots * wall_s - sum(v for k, v in split.items() if k != "other_s"))
        util = self.flops_trained / (wall_s * self.peak_flops) if (self.peak_flops and wall_s > 0) else None
        return {"model_flops": self.flops_trained, "peak_flops": self.peak_flops, "utilisation": util,
                "pf_days": self.flops_trained / PF_DAY, "split": {k: round(v, 3) for k, v in split.items()}}

    def _record_launch(self, started: float, wall_s: float) -> dict:
        use = self.usage(wall_s)
        if self.launched and self.runs:
            row = {"start": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "wall_s": round(wall_s, 3),
                   "workers": self.workers, "runs": self.launched, **use}
            registry.append_launch(os.path.join(self.results, self.runs[0].sweep), row)
        return use

    # -- the sweep -----------------------------------------------------------------------------------
    def launch(self) -> dict:
        import resource

        start = time.time()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        queue, done_flops = [], 0.0
        for run in self.runs:
            workdir = write_plan(run, self.results)
            state = registry.run_state(workdir)
            if state == "done" or state == "diverged" or (state == "failed" and not self.retry_failed):
                self.outcome[run.run_id] = state
                done_flops += run.model_flops
                _clear_dead_lock(workdir)
            else:
                queue.append(run)
        total = sum(r.model_flops for r in self.runs) or 1.0
        bar = self._bar(total, done_flops)
        active: list[_Active] = []
        pool: list[_Worker] = []
        finished_flops = done_flops
        try:
            while queue or active:
                # the first run trains alone until one finishes, so shared caches (dataset, tokenizers,
                # compiled programs) are built once rather than by every worker at the same time
                alone = self.first_alone and not any(v == "done" for v in self.outcome.values())
                limit = 1 if alone else self.workers
                while queue and len(active) < limit:
                    idle = [w for w in pool if w.act is None]
                    worker = idle[0] if idle else self._new_worker()
                    if not idle:
                        pool.append(worker)
                    act = self._spawn(queue.pop(_pick(queue, worker, pool)), worker)
                    if act is not None:
                        active.append(act)
                        self.launched += 1
                for worker in list(pool):
                    for msg in worker.messages():
                        if "ready" in msg:
                            worker.ready_s = float(msg["ready"])
                            self.split["startup_s"] += worker.ready_s
                        elif "rc" in msg and worker.act is not None:
                            act = worker.act
                            self._finish(act, int(msg["rc"]))
                            active.remove(act)
                            finished_flops += act.run.model_flops
                    rc = worker.proc.poll()
                    if rc is None:
                        continue
                    pool.remove(worker)
                    act = worker.act
                    if act is None:
                        continue
                    active.remove(act)
                    if self._retry(act, rc):
                        queue.insert(0, act.run)
                    else:
                        self._finish(act, rc or 1)
                        finished_flops += act.run.model_flops
                for act in active:
                    act.lock.heartbeat()
                now_flops = finished_flops + sum(min(a.flops(), a.run.model_flops) for a in active)
                self._show(bar, now_flops, total, start, done_flops, active, queue)
                if queue or active:
                    _wait([w.proc.stdout for w in pool], self.poll_s)
        except BaseException:
            for worker in pool:  # leave their runs interrupted (resumable), never half-written
                _terminate(worker.proc)
            for act in active:
                act.lock.release()
            raise
        finally:
            for worker in pool:
                worker.close()
            for worker in pool:
                try:
                    worker.proc.wait(30)
                except subprocess.TimeoutExpired:
                    _terminate(worker.proc)
            if bar is not None:
                bar.close()
        counts = {}
        for status in self.outcome.values():
            counts[status] = counts.get(status, 0) + 1
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        wall = time.time() - start
        return {"runs": len(self.runs), "counts": counts, "outcome": dict(self.outcome),
                "errors": dict(self.errors), "wall_s": wall, "train_cpu_s": cpu_s,
                **self._record_launch(start, wall)}

    def _bar(self, total, initial):
        if not self.progress:
            return None
        return tqdm.tqdm(total=total, initial=initial, unit="FLOP", unit_scale=True, file=sys.stderr,
                         bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} FLOPs{postfix}",
                         desc="sweep ")

    def _show(self, bar, now_flops, total, start, base, active, queue):
        if bar is None:
            return
        now = time.time()
        elapsed = now - start
        rate = (now_flops - base) / elapsed if elapsed > 0 else 0.0
        eta = eta_seconds(self.timings, [r.model_flops for r in queue],
                          [(a.run.model_flops, now - a.started) for a in active], self.workers)
        counts = {}
        for status in self.outcome.values():
            counts[status] = counts.get(status, 0) + 1
        parts = [f"done {counts.get('done', 0)}/{len(self.runs)}", f"running {len(active)}"]
        if counts.get("failed"):
            parts.append(f"failed {counts['failed']}")
        parts.append(f"{rate:.3g} FLOP/s")
        parts.append("ETA " + (_fmt_s(eta) if eta is not None else "?"))
        text = ", ".join(parts)
        key = (round(now_flops), parts[:-2])
        if key != getattr(self, "_last_key", None) or now - getattr(self, "_last_show", 0.0) > 10.0:
            self._last_key, self._last_show = key, now
            bar.n = min(now_flops, total)
            bar.set_postfix_str(text, refresh=False)
            bar.refresh()


def _clear_dead_lock(workdir: str) -> None:
    """Remove the ``run.lock`` a killed launcher left on a run that had finished (its training process wrote
    the summary, the launcher died before releasing): reclaimed like any dead lock, then released. A live
    holder's lock is left alone."""
    lock = RunLock(workdir)
    if os.path.exists(lock.path) and lock.acquire():
        lock.release()


def _pick(queue: list[Run], worker: _Worker, pool: list[_Worker]) -> int:
    """Index of the queued run ``worker`` should train next: one whose programs it already compiled; else one
    whose programs no other worker holds or is compiling (so each shape is compiled once, not by two workers
    at the same time); else the first (the cheapest)."""
    keys = [_program_key(r) for r in queue]
    mine = next((i for i, k in enumerate(keys) if k in worker.seen), None)
    if mine is not None:
        return mine
    others = set().union(*(w.seen for w in pool if w is not worker))
    return next((i for i, k in enumerate(keys) if k not in others), 0)


def _program_key(run: Run) -> tuple:
    """What a run's compiled programs depend on: its training arguments but the seed and the folder."""
    argv = list(run.train_argv(""))
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--workdir" or (argv[i] == "--set" and i + 1 < len(argv) and argv[i + 1].startswith("seed=")):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return tuple(out)


def _wait(files, timeout: float) -> None:
    """Until one of ``files`` has something to read, or ``timeout`` seconds."""
    import select

    try:
        select.select([f for f in files if not f.closed], [], [], timeout)
    except (OSError, ValueError):
        time.sleep(timeout)


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_sweep(path: str, results: str = "results", workers: int = 1, only: str | None = None,
              progress: bool = True, retry_failed: bool = False, env: dict | None = None,
              compile_cache: str | None = "", plan: str | None = None) -> dict:
    """Load a sweep definition, plan it, and launch it locally; returns the launcher's report. ``plan``: a plan
    file (``medscale plan next --out``) whose proposed runs are trained instead of the definition's own design
    (``design.from_plan``), into the same sweep folder."""
    sweep = load_definition(path)
    runs = filter_runs(from_plan(sweep, load_plan(plan)) if plan else expand(sweep), only)
    if compile_cache == "":
        compile_cache = os.path.join(results, ".cache", "jax")
    report = Launcher(runs, results, workers=workers, progress=progress, retry_failed=retry_failed,
                      env=env, compile_cache=compile_cache).launch()
    report["sweep"] = sweep.name
    report["results"] = os.path.join(results, sweep.name)
    return report
