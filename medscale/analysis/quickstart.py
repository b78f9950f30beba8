"""``medscale quickstart``: the whole loop on CPU — an IsoFLOP sweep on the built-in synthetic data, the fit, the
report and the recommendation for one DGX-1 — in minutes.

The design (``quickstart_sweep()``, also ``sweeps/quickstart.py`` and, under its own name,
``sweeps/reference.py``): five IsoFLOP budgets spanning two decades of model FLOPs (1.6e10 .. 1.6e12, half a decade
apart), five sizes per budget (d_model 32 .. 128, 2 encoder + 2 decoder layers) spread around Chinchilla's
expected optimum, two more seeds of the size nearest it; every run on fresh synthetic examples (none repeated),
its peak learning rate from the width rule :func:`lr_for`, its batch (4, then 16 from 1.6e11), its evaluations and
task metrics sized to its FLOPs. ``docs/sweep.md`` gives the design's reasons and its measured wall time.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from medscale.analysis.budget import DEFAULT_MFU
from medscale.analysis.report import build_report
from medscale.errors import UserError
from medscale.sweep.design import expand, load_definition, normalize, shape_of
from medscale.sweep.launcher import Launcher

log = logging.getLogger(__name__)

REFERENCE_BUDGET = {"hardware": "dgx-1", "days": 7.0}  # one DGX-1: 8 x V100 SXM2 32 GB

# d_model 32 with narrower MLPs (d_ff 32, 64) below d32l2: on these data the optimum at the top budgets is near
# the smallest d_model-32 model, and the IsoFLOP curves need sizes on both sides of it
SIZES = ["d32l2f32", "d32l2f64", "d32l2", "d40l2", "d48l2", "d56l2", "d64l2", "d80l2", "d96l2", "d128l2"]
BUDGETS = [1.6e10, 5e10, 1.6e11, 5e11, 1.6e12]
# per budget: every size of a budget shares one batch, so the sizes of one IsoFLOP curve differ in shape only
# (each (shape, batch) pair compiles its own train step). These models' loss is set by their optimizer steps more
# than by their tokens (docs/sweep.md, "Batch"): 4 at the two lowest budgets keeps every size above min_steps, and
# the top three budgets share 16, so the law's top-budget extrapolation crosses no batch change
BATCHES = [4, 4, 16, 16, 16]
# the peak learning rate of width d: LR_REF x (D_REF / d) ** LR_EXPONENT, fitted to the best rates of
# sweeps/lr_tune.py (results/lr_tune; docs/sweep.md, "Learning rates")
LR_REF, D_REF, LR_EXPONENT = 7.14e-3, 64, 0.83


def lr_for(d_model: int) -> float:
    """The quickstart's peak learning rate for width ``d_model`` (Adam's rate falls as 1 / width: muP's rule
    for hidden weights, with the constant from the tuning sweep)."""
    return float(f"{LR_REF * (D_REF / float(d_model)) ** LR_EXPONENT:.3g}")


def quickstart_sweep(name: str = "quickstart"):
    """The quickstart's IsoFLOP sweep definition (a normalized ConfigDict)."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.base = "tiny"
    # data.num_train=0: the unbounded synthetic stream, so no run repeats an example; every run is scored on the
    # same 128 held-out examples
    c.set = ["data.num_train=0", "train.eval_batch_size=32", "train.eval_batches=4"]
    c.design = "isoflop"
    c.sizes = list(SIZES)
    c.enc_lens = [64]
    c.budgets = list(BUDGETS)
    c.batch_per_budget = list(BATCHES)
    c.per_budget = 5
    c.spread = 16.0
    c.law = "chinchilla"
    c.center_factor = 0.5  # the synthetic data favour smaller models than Chinchilla's text (docs/sweep.md)
    c.min_steps = 30
    c.warmup_frac = 0.05
    c.lr = {s: lr_for(shape_of(s)["d_model"]) for s in SIZES}
    c.seeds = [0]
    c.center_seeds = [1, 2]
    c.eval_fraction = 0.05  # periodic evaluations: at most 5% of a run's FLOPs ...
    c.evals_per_run = 8  # ... and at most 8 (the last at the final step)
    c.checkpoints_per_run = 2
    c.task_eval_fraction = 0.005  # task metrics on 16 examples where that is at most 0.5% of the run
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


def build(sweep_dir: str, mfu: float = DEFAULT_MFU, bootstrap: int = 200, seed: int = 0, progress=None,
          seqlen_dir: str | None = None) -> dict:
    """Fit and report a finished sweep folder into itself (``report.md``, ``report.json``, ``figures/``): every
    approach the runs support (``medscale.analysis.report``'s choice, as ``medscale report`` makes it).
    ``seqlen_dir``: a length study to add (results/reference's report: ``results/seqlen-law``)."""
    return build_report(sweep_dir, sweep_dir, hardware=REFERENCE_BUDGET["hardware"], days=REFERENCE_BUDGET["days"],
                        mfu=mfu, bootstrap=bootstrap, seed=seed, progress=progress, seqlen_dir=seqlen_dir)


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
