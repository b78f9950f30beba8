"""Sweep benchmark (``medscale bench sweep``): a fixed small sweep trained by the local launcher in a temporary
folder; where the wall time goes.

The design (:func:`bench_definition`): 6 runs of three tiny shapes (d_model 32/64, 1-2 layers) at one token
budget, two seeds each, on the synthetic data; evaluation 4 times and a checkpoint twice per run, task metrics on
8 held-out examples. The figures: the sweep's wall time, model FLOPs trained, utilisation (model FLOPs / (wall
x the measured peak of the devices in use)), and the run-seconds split between start-up, compilation, training
steps, evaluation, checkpoints, task evaluation and the rest (process start, imports, waiting).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import ml_collections

from medscale.sweep.design import expand, normalize
from medscale.sweep.launcher import Launcher


def bench_definition(name: str = "bench"):
    """The benchmark's fixed sweep definition (a normalized ConfigDict)."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.base = "tiny"
    c.set = ["train.batch_size=8", "data.num_eval=32", "train.eval_batches=2",
             "train.log_every=10", "train.task_eval_examples=8"]
    c.design = "grid"
    c.sizes = ["d32l1", "d64l1", "d64l2"]
    c.enc_lens = [32]
    c.tokens = [8 * 80 * 60]  # 60 steps of 8 x (32 + 48) tokens
    c.seeds = [0, 1]
    c.warmup_frac = 0.1
    c.evals_per_run = 4
    c.checkpoints_per_run = 2
    return normalize(c, source="bench sweep")


def bench_sweep(workers: int = 2, folder: str | None = None, progress: bool = False) -> dict:
    """Train :func:`bench_definition` under ``folder`` (default: a temporary folder, removed after) with a
    fresh compilation cache; returns the launcher's report figures and the split as shares of run-seconds."""
    tmp = folder or tempfile.mkdtemp(prefix="medscale-bench-sweep-")
    try:
        runs = expand(bench_definition())
        t0 = time.perf_counter()
        launch = Launcher(runs, tmp, workers=workers, progress=progress,
                          compile_cache=os.path.join(tmp, ".cache", "jax")).launch()
        wall = time.perf_counter() - t0
    finally:
        if folder is None:
            shutil.rmtree(tmp, ignore_errors=True)
    split = launch["split"]
    total = sum(split.values()) or 1.0
    return {"runs": len(runs), "workers": workers, "counts": launch["counts"], "wall_s": wall,
            "model_flops": launch["model_flops"], "peak_flops": launch["peak_flops"],
            "utilisation": launch["utilisation"], "split_s": split,
            "split_share": {k: v / total for k, v in split.items()}, "errors": launch["errors"]}
