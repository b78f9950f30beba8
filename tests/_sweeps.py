"""The tiny sweep the launcher tests run: 2 sizes x 2 seeds of 30 steps (d_model 16, one layer each side),
a checkpoint every 5 steps, 3 evaluations. Written as a sweep file, so it runs through ``medscale sweep run``
exactly as a user's does."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TEMPLATE = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = {name!r}
    c.base = "tiny"
    c.set = {sets!r}
    c.design = "grid"
    c.sizes = ["d16l1", "d16l1h2"]
    c.enc_lens = [32]
    c.tokens = [4 * 80 * 30]  # 30 steps of 4 x (32 + 48) tokens
    c.seeds = [0, 1]
    c.evals_per_run = 3
    c.checkpoints_per_run = 6
    c.per_size = {per_size!r}
    return c
"""

BASE_SETS = ("train.batch_size=4", "data.num_train=128", "data.num_eval=16", "train.eval_batches=1",
             "train.warmup_steps=5")


def write_sweep(tmp_path, name, *, sets=(), per_size=None) -> str:
    """Write ``<tmp_path>/<name>.py``: the tiny sweep with ``sets`` added to its overrides."""
    path = os.path.join(str(tmp_path), f"{name}.py")
    with open(path, "w") as fh:
        fh.write(_TEMPLATE.format(name=name, sets=[*BASE_SETS, *sets], per_size=dict(per_size or {})))
    return path


def sweep_argv(sweep: str, results, *extra) -> list[str]:
    """``python -m medscale sweep run SWEEP --results RESULTS --workers 2 --quiet --json ...``."""
    return [sys.executable, "-m", "medscale", "sweep", "run", sweep, "--results", str(results),
            "--workers", "2", "--quiet", "--json", *extra]


def sweep_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=REPO, MEDSCALE_TENSORBOARD="0", **extra)


def launch(sweep: str, results, *extra, **env) -> subprocess.Popen:
    return subprocess.Popen(sweep_argv(sweep, results, *extra), cwd=REPO, env=sweep_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
