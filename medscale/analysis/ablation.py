"""Comparing model families at equal compute (``medscale report DIR --ablation``): the encoder ablation
(``sweeps/encoder_ablation.py``: a unified encoder vs one stack per input modality) and any other pair of
IsoFLOP sweeps trained at the same budgets.

``DIR`` holds one sweep folder per family (``DIR/<family>/<run_id>/``). Per family:

1. the frontier: at each IsoFLOP budget, the lowest final eval loss over the sizes trained (``model_flops`` of
   that run as its compute);
2. the law: ``log L = log A - a log C`` fitted to the frontier by least squares (a power law in compute; it has
   no irreducible term, so far beyond the data it keeps falling where the real curve flattens);
3. the interval: a wild bootstrap: each draw adds the fit's residuals (scaled by sqrt(n / (n - 2)) for the two
   fitted parameters) back to the fitted line with random signs and refits, so the draws keep the scatter of the
   few frontier points about the law (with two budgets there is no scatter to keep, and no interval).

At the target budget (default one DGX-1, 8 x V100, 7 days: ``medscale.analysis.report.resolve_budget``) each
family's predicted loss with its interval, and the difference of log losses (second family minus first; draws
paired by index, the families resampled independently): a family is called better when the interval of the
difference excludes 0, otherwise the two are not distinguished at that budget.
"""

from __future__ import annotations

import math
import os

import numpy as np

from medscale import rundir
from medscale.analysis.report import _jsonable, fmt, resolve_budget
from medscale.errors import UserError
from medscale.sweep.registry import load_sweep

LEVEL = 0.95


def load_families(results_dir: str, families=None) -> dict:
    """``{family: runs DataFrame}`` of finished runs (status done, a final eval loss, an IsoFLOP budget) in the
    sweep folders under ``results_dir``, in ``families`` order (default: the folders, sorted)."""
    if not os.path.isdir(results_dir):
        raise UserError(f"ablation folder {results_dir} not found; give the folder holding one sweep folder per "
                        "family (e.g. results/encoder_ablation)")
    names = list(families) if families else sorted(
        d for d in os.listdir(results_dir) if not d.startswith(".") and os.path.isdir(os.path.join(results_dir, d)))
    out = {}
    for name in names:
        path = os.path.join(results_dir, name)
        if not os.path.isdir(path):
            raise UserError(f"no sweep folder {path} for family {name!r}")
        df = load_sweep(path)
        if df is None or not len(df):
            continue
        df = df[(df["status"] == "done") & np.isfinite(df["loss"].astype(float))
                & np.isfinite(df["flops"].astype(float))].copy()
        # runs without a planned IsoFLOP budget: grouped by their compute, to 0.05 dex
        budget = df["budget"].astype(float)
        df["budget"] = np.where(np.isfinite(budget), budget,
                                10 ** (np.round(np.log10(df["flops"].astype(float)) / 0.05) * 0.05))
        if len(df):
            out[name] = df.reset_index(drop=True)
    if len(out) < 2:
        raise UserError(f"{results_dir} holds finished IsoFLOP runs of {len(out)} famil{'y' if len(out) == 1 else 'ies'}"
                        f" ({', '.join(out) or 'none'}); an ablation compares two: one sweep folder per family")
    return out


def frontier(df) -> list[dict]:
    """Per budget (ascending): the run with the lowest final eval loss."""
    rows = []
    for budget, grp in df.groupby("budget"):
        best = grp.loc[grp["loss"].astype(float).idxmin()]
        params = grp["params"].astype(float)
        # the best run is the smallest or largest size trained: the budget's optimum is not bracketed, so the
        # frontier point is an upper bound on the best loss at that compute
        edge = len(grp) > 1 and float(best["params"]) in (float(params.min()), float(params.max()))
        rows.append({"budget": float(budget), "flops": float(best["flops"]), "loss": float(best["loss"]),
                     "size": str(best["size"]), "params": float(best["params"]), "run_id": str(best["run_id"]),
                     "runs": len(grp), "edge": bool(edge)})
    return rows


def _line(logc, logl):
    """Least-squares ``logl = b0 + b1 logc``: (b0, b1)."""
    b1, b0 = np.polyfit(logc, logl, 1)
    return float(b0), float(b1)


def fit_family(df, target_flops: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """The frontier, its power law ``L = A C^-a`` and the predicted loss at ``target_flops`` with bootstrap
    draws (the module docstring's three steps). Needs at least two budgets."""
    front = frontier(df)
    if len(front) < 2:
        raise UserError(f"family {df['sweep'].iloc[0]!r} has finished runs at {len(front)} budget(s); a law in "
                        "compute needs at least two")
    logc = np.log([r["flops"] for r in front])
    logl = np.log([r["loss"] for r in front])
    b0, b1 = _line(logc, logl)
    resid = logl - (b0 + b1 * logc)
    rng = np.random.default_rng(seed)
    n = len(front)
    # the residuals, scaled for the two fitted parameters (sqrt(n / (n - 2)); none with two budgets)
    scaled = resid * math.sqrt(n / (n - 2)) if n > 2 else resid
    signs = rng.choice((-1.0, 1.0), (n_boot, n))
    coef = np.array([_line(logc, b0 + b1 * logc + scaled * sg) for sg in signs])
    draws = coef[:, 0] + coef[:, 1] * math.log(target_flops)
    exps = -coef[:, 1]
    pred = b0 + b1 * math.log(target_flops)
    q = [(1 - LEVEL) / 2, (1 + LEVEL) / 2]
    return {"frontier": front, "A": math.exp(b0), "a": -b1, "a_ci": [float(x) for x in np.quantile(exps, q)],
            "residual_rms": float(np.sqrt(np.mean(resid ** 2))), "log_loss_at_target": float(pred),
            "loss_at_target": math.exp(pred),
            "loss_ci": [float(math.exp(x)) for x in np.quantile(draws, q)], "draws": draws}


def compare(results_dir: str, families=None, *, hardware=None, gpus=None, days=None, mfu=None, flops=None,
            n_boot: int = 1000, seed: int = 0) -> dict:
    """Both families' fits and the verdict at the target budget (the module docstring)."""
    data = load_families(results_dir, families)
    names = list(data)[:2]
    budget = resolve_budget(hardware=hardware, gpus=gpus, days=days, mfu=mfu, flops=flops)
    target = float(budget["flops"])
    fits = {n: fit_family(data[n], target, n_boot=n_boot, seed=seed + i) for i, n in enumerate(names)}
    first, second = names
    diff = fits[second]["draws"] - fits[first]["draws"]
    q = np.quantile(diff, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    point = fits[second]["log_loss_at_target"] - fits[first]["log_loss_at_target"]
    if q[1] < 0:
        verdict = f"{second} is better"
    elif q[0] > 0:
        verdict = f"{first} is better"
    else:
        verdict = "not distinguished"
    measured = []
    shared = sorted({r["budget"] for r in fits[first]["frontier"]} & {r["budget"] for r in fits[second]["frontier"]})
    for b in shared:
        a = next(r for r in fits[first]["frontier"] if r["budget"] == b)
        c = next(r for r in fits[second]["frontier"] if r["budget"] == b)
        measured.append({"budget": b, first: a["loss"], second: c["loss"],
                         "log_ratio": math.log(c["loss"] / a["loss"])})
    largest = max(max(r["flops"] for r in f["frontier"]) for f in fits.values())
    return {
        "results_dir": results_dir, "families": names, "budget": budget, "level": LEVEL, "bootstrap": n_boot,
        "fits": {n: {k: v for k, v in f.items() if k != "draws"} for n, f in fits.items()},
        "measured": measured,
        "difference": {"log_loss": float(point), "ci": [float(q[0]), float(q[1])],
                       "p_second_better": float(np.mean(diff < 0))},
        "verdict": verdict, "extrapolation": target / largest,
        "runs": {n: len(d) for n, d in data.items()},
    }


def render(r: dict) -> str:
    """The comparison as markdown."""
    first, second = r["families"]
    b = r["budget"]
    where = (f"{b['gpus']} x {b['hardware']}, {fmt(b['days'])} days at MFU {fmt(b['mfu'])}" if b.get("hardware")
             else "as given")
    pct = round(100 * r["level"])
    L = [f"# Ablation: {first} vs {second} at equal compute", "",
         (f"Runs: {', '.join(f'{n} {k}' for n, k in r['runs'].items())} (finished IsoFLOP runs in "
          f"`{r['results_dir']}`). Compute = accounted model FLOPs of each run (docs/foundation.md)."), "",
         "## Measured: best eval loss per budget", "",
         f"| budget (FLOPs) | {first} | {second} | log({second} / {first}) |", "|---|---|---|---|"]
    fits = r["fits"]
    for row in r["measured"]:
        a = next(x for x in fits[first]["frontier"] if x["budget"] == row["budget"])
        c = next(x for x in fits[second]["frontier"] if x["budget"] == row["budget"])
        L.append(f"| {fmt(row['budget'])} | {fmt(row[first], 4)} ({a['size']}{'*' if a['edge'] else ''}) | "
                 f"{fmt(row[second], 4)} ({c['size']}{'*' if c['edge'] else ''}) | {row['log_ratio']:+.4f} |")
    if any(x["edge"] for n in r["families"] for x in fits[n]["frontier"]):
        L += ["", ("\\* the best run is the smallest or largest size trained at that budget: the optimum is not "
              "bracketed, and the loss shown is an upper bound on the family's best at that compute.")]
    L += ["", "## Fitted: L(C) = A C^-a on each family's frontier", "",
          (f"| family | A | a ({pct}% interval) | residual rms (log) | predicted loss at {fmt(b['flops'])} FLOPs "
           f"({pct}% interval) |"), "|---|---|---|---|---|"]
    for n in r["families"]:
        f = fits[n]
        L.append(f"| {n} | {fmt(f['A'])} | {fmt(f['a'])} [{fmt(f['a_ci'][0])}, {fmt(f['a_ci'][1])}] | "
                 f"{fmt(f['residual_rms'])} | {fmt(f['loss_at_target'], 4)} [{fmt(f['loss_ci'][0], 4)}, "
                 f"{fmt(f['loss_ci'][1], 4)}] |")
    d = r["difference"]
    L += ["", f"## At the target budget: {fmt(b['flops'])} FLOPs ({where})", "",
          (f"log L({second}) - log L({first}) = {d['log_loss']:+.4f}, {pct}% interval "
           f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]; {second} lower in {100 * d['p_second_better']:.0f}% of "
           f"{r['bootstrap']} bootstrap draws."), "",
          f"**Verdict: {r['verdict']}** at this budget"
          + (" (the interval of the difference includes 0)." if r["verdict"] == "not distinguished" else "."), "",
          (f"The budget is {fmt(r['extrapolation'])} x the largest run fitted: a power law without an irreducible "
           "term, extrapolated that far from a few CPU-sized budgets, is a statement about the trend of the "
           "measured frontiers, not a forecast of the DGX-1 loss. Intervals: the bootstrap of "
           "`medscale/analysis/ablation.py` (the frontier's residuals re-signed).")]
    return "\n".join(L) + "\n"


def to_json(r: dict):
    """``r`` as plain JSON values."""
    return _jsonable(r)


def write(r: dict, out_dir: str) -> dict:
    """``ablation.md`` and ``ablation.json`` into ``out_dir`` (atomic writes); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "ablation.md"), os.path.join(out_dir, "ablation.json")
    rundir.write_json(js, to_json(r))
    rundir.write_bytes(md, render(r).encode())
    return {"markdown": md, "json": js}
