"""Where a training run's metric rows go: ``metrics.jsonl`` (the run directory contract, ``docs/interfaces.md``)
and TensorBoard event files written with ``tensorboardX`` (no TensorFlow needed).

A row is a flat dict of plain Python values with ``kind`` ("train" or "eval") and ``step``; every number in it
becomes the scalar ``<kind>/<key>`` at ``step`` (``train/loss``, ``train/loss/caption``, ``eval/loss``, ...),
None is skipped. metrics.jsonl is flushed after every row. The event file is written in the calling thread
(tensorboardX's ``EventsWriter``, not ``SummaryWriter``, whose background thread may still hold rows after its
``flush()``) and reaches the disk at :meth:`MetricWriter.flush`, which the loop calls before each checkpoint,
every ``FLUSH_SECS`` and at the end: a killed run keeps every event up to its last checkpoint, and its relaunch
hides the later ones (TensorBoard's purge) before writing them again.
"""

from __future__ import annotations

import json
import os
import time

from clu import parameter_overview
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

from medscale import rundir

PARAMETERS_TAG = "parameters"  # TensorBoard text: the parameter table (name, shape, dtype, size, sharding)
FLUSH_SECS = 30.0  # the longest a written row waits to reach the event file on disk


class MetricWriter:
    """Appends rows to ``path`` (JSON lines) and, with ``tb_dir``, writes them as TensorBoard scalars there.

    ``enabled=False`` (processes other than the first) writes nothing. The event file is opened by
    :meth:`begin`, which the loop calls once it knows the step it starts from."""

    def __init__(self, path: str, tb_dir: str | None = None, enabled: bool = True):
        self.path = path
        self.tb_dir = tb_dir if enabled else None
        self.f = open(path, "a") if enabled else None  # noqa: SIM115 - open for the run
        self.events = None
        self._flushed = time.monotonic()

    def begin(self, step: int, params=None) -> None:
        """Open the event file for a run (re)starting at ``step``; log the parameter table.

        Events of an earlier attempt at steps after ``step`` are purged (TensorBoard hides them), as readers of
        metrics.jsonl keep the last row per (kind, step). ``params``: the parameter tree (arrays or
        ``jax.ShapeDtypeStruct``; only shapes, dtypes and shardings are read)."""
        if self.tb_dir is None:
            return
        if self.events is None:
            os.makedirs(self.tb_dir, exist_ok=True)
            # tensorboardX names the file by the second; the suffix keeps a restart within that second from
            # overwriting the earlier file, and files still sort in the order they were written
            self.events = EventsWriter(os.path.join(self.tb_dir, "events"), filename_suffix=f".{time.time_ns()}")
            self._event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
        if params is not None:
            table = parameter_overview.get_parameter_overview(params, include_stats="sharding")
            self._event(Event(step=step, summary=summary.text(PARAMETERS_TAG, _markdown_code(table))))
        self.flush()

    def rewind(self, step: int) -> list[dict]:
        """Keep only the rows up to ``step`` (the step a run restarts from; a torn last line goes too), so a
        relaunched run writes each later row once; returns the kept rows. The file is rewritten atomically and
        reopened for appending. A disabled writer (a process other than the first) reads the kept rows and
        rewrites nothing, so every process of a run knows what the run has logged."""
        if self.f is not None:
            self.f.flush()
        elif not os.path.exists(self.path):
            return []
        kept, lines, dropped = [], [], 0
        with open(self.path) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                if not isinstance(row, dict) or (row.get("step") or 0) > step:
                    dropped += 1
                    continue
                kept.append(row)
                if not line.endswith("\n"):  # a row whose newline a kill cut off
                    line, dropped = line + "\n", dropped + 1
                lines.append(line)
        if dropped and self.f is not None:
            self.f.close()
            rundir.write_text(self.path, "".join(lines))
            self.f = open(self.path, "a")  # noqa: SIM115 - open for the run
        return kept

    def write(self, row: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(row, default=rundir.json_default) + "\n")
        self.f.flush()
        if self.events is not None:
            values = [summary.scalar(f"{row['kind']}/{k}", v).value[0] for k, v in row.items()
                      if k not in ("kind", "step") and isinstance(v, (int, float))]
            self._event(Event(step=row["step"], summary=Summary(value=values)))
            if time.monotonic() - self._flushed > FLUSH_SECS:
                self.flush()

    def flush(self) -> None:
        """Everything written so far on disk (the event file is fsync-ed)."""
        if self.f is not None:
            self.f.flush()
        if self.events is not None:
            self.events.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.events is not None:
            self.events.close()
            self.events = None

    def _event(self, event: Event) -> None:
        event.wall_time = time.time()
        self.events.write_event(event)


def _markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: indent the table so it shows as a fixed-width block."""
    return "\n".join("    " + line for line in text.splitlines())
