"""``medscale quickstart``: the whole loop on CPU — an IsoFLOP sweep on the built-in synthetic data, the fit, the
report and the recommendation for one DGX-1 — in minutes.

The design (``quickstart_sweep()``, also ``sweeps/quickstart.py``): models from d_model 8 to 128 (explicit
shapes below the ladder's sizes: the ladder's smallest is too big for a CPU minute), two encoder lengths with
their own FLOP budgets (four for 64, three interleaved for 32, so each IsoFLOP curve holds one length); per
budget four sizes spread log-uniformly around Chinchilla's expected optimum, each run's steps set by the
accounted model FLOPs. ``docs/sweep.md`` gives its measured wall time.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from medscale.analysis.budget import DEFAULT_MFU
from medscale.analysis.report import build_report
from medscale.errors import UserError
from medscale.sweep.design import expand, load_definition, normalize
from medscale.sweep.launcher import Launcher

log = logging.getLogger(__name__)

REFERENCE_BUDGET = {"hardware": "dgx-1", "days": 7.0}  # one DGX-1: 8 x V100 SXM2 32 GB


def quickstart_sweep(name: str = "quickstart"):
    """The quickstart's IsoFLOP sweep definition (a normalized ConfigDict)."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.base = "tiny"
    c.design = "isoflop"
    c.sizes = ["d8l1", "d12l1", "d16l1", "d24l1", "d32l1", "d48l1", "d64l1", "d64l2", "d96l2", "d128l2"]
    c.enc_lens = [32, 64]
    # model FLOPs per run; the two lengths get interleaved budgets, so no IsoFLOP group mixes lengths
    c.budgets = {"64": [1e10, 3e10, 1e11, 3e11], "32": [2e10, 6e10, 2e11]}
    c.per_budget = 4
    c.spread = 16.0
    c.law = "chinchilla"
    c.min_steps = 20
    c.warmup_frac = 0.1
    c.evals_per_run = 5
    c.checkpoints_per_run = 2
    c.seeds = [0]
    return normalize(c, source="quickstart")


def run_quickstart(results: str = "results", workers: int = 2, progress: bool = True, sweep: str | None = None,
                   mfu: float = DEFAULT_MFU, bootstrap: int = 200, seed: int = 0, stage=None) -> dict:
    """Train the sweep (resuming whatever is already there), fit, write ``<results>/<sweep>/report.md`` with its
    figures, and return ``{"sweep", "launch", "report"}``."""
    stage = stage or (lambda msg: None)
    definition = load_definition(sweep) if sweep else quickstart_sweep()
    runs = expand(definition)
    sweep_dir = os.path.join(results, definition.name)
    stage(f"training {len(runs)} runs ({sum(r.model_flops for r in runs):.3g} model FLOPs) into {sweep_dir}")
    launch = Launcher(runs, results, workers=workers, progress=progress,
                      compile_cache=os.path.join(results, ".cache", "jax")).launch()
    done = launch["counts"].get("done", 0)
    if done < 3:
        errors = "; ".join(f"{k}: {v}" for k, v in list(launch["errors"].items())[:3])
        raise UserError(f"only {done} of {len(runs)} runs finished, too few to fit ({errors or 'see train.log'})")
    stage("fitting and writing the report")
    report = build(sweep_dir, mfu=mfu, bootstrap=bootstrap, seed=seed, progress=stage)
    return {"sweep": definition.name, "results": sweep_dir, "launch": launch, "report": report}


def build(sweep_dir: str, mfu: float = DEFAULT_MFU, bootstrap: int = 200, seed: int = 0, progress=None) -> dict:
    """Fit and report a finished sweep folder into itself (``report.md``, ``report.json``, ``figures/``): every
    approach the runs support (``medscale.analysis.report``'s choice, as ``medscale report`` makes it)."""
    return build_report(sweep_dir, sweep_dir, hardware=REFERENCE_BUDGET["hardware"], days=REFERENCE_BUDGET["days"],
                        mfu=mfu, bootstrap=bootstrap, seed=seed, progress=progress)


def exponents(fit: dict) -> list[tuple[str, str, float, list | None]]:
    """(approach, exponent name, value, interval) rows from a fit dict, for what it holds."""
    rows = []
    for app in ("approach1", "approach2", "approach3"):
        part = (fit or {}).get(app)
        if not isinstance(part, dict):
            continue
        for name in ("a", "b", "alpha", "beta"):
            value = part.get(name)
            if isinstance(value, (int, float)):
                rows.append((app, name, float(value), (part.get("ci") or {}).get(name)))
    return rows
