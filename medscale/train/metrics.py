"""Where a training run's metric rows go: ``metrics.jsonl`` (the run directory contract, ``docs/interfaces.md``)
and TensorBoard event files written by ``tensorboardX`` (no TensorFlow needed).

A row is a flat dict of plain Python values with ``kind`` ("train" or "eval") and ``step``; every number in it
becomes the scalar ``<kind>/<key>`` at ``step`` (``train/loss``, ``train/loss/caption``, ``eval/loss``, ...),
None is skipped. Both sinks are flushed after every row, so a killed run loses no row it wrote.
"""

from __future__ import annotations

import json
import time

from clu import parameter_overview
from tensorboardX import SummaryWriter

PARAMETERS_TAG = "parameters"  # TensorBoard text: the parameter table (name, shape, dtype, size, sharding)


class MetricWriter:
    """Appends rows to ``path`` (JSON lines) and, with ``tb_dir``, writes them as TensorBoard scalars there.

    ``enabled=False`` (processes other than the first) writes nothing. TensorBoard files are opened by
    :meth:`begin`, which the loop calls once it knows the step it starts from."""

    def __init__(self, path: str, tb_dir: str | None = None, enabled: bool = True):
        self.path = path
        self.tb_dir = tb_dir if enabled else None
        self.f = open(path, "a") if enabled else None  # noqa: SIM115 - open for the run
        self.tb = None

    def begin(self, step: int, params=None) -> None:
        """Open the TensorBoard writer for a run (re)starting at ``step`` and log the parameter table.

        Events of an earlier attempt at steps after ``step`` are purged (TensorBoard hides them), the analogue of
        metrics.jsonl readers keeping the last row per (kind, step). ``params``: the parameter tree (arrays or
        ``jax.ShapeDtypeStruct``; only shapes, dtypes and shardings are read)."""
        if self.tb_dir is None:
            return
        if self.tb is None:
            # tensorboardX names files by the second; the suffix keeps a restart within that second from
            # overwriting the earlier file, and files still sort in the order they were written
            self.tb = SummaryWriter(self.tb_dir, purge_step=step + 1, filename_suffix=f".{time.time_ns()}")
        if params is not None:
            table = parameter_overview.get_parameter_overview(params, include_stats="sharding")
            self.tb.add_text(PARAMETERS_TAG, _markdown_code(table), step)
            self.tb.flush()

    def write(self, row: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            prefix = row["kind"] + "/"
            for k, v in row.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(prefix + k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: indent the table so it shows as a fixed-width block."""
    return "\n".join("    " + line for line in text.splitlines())
