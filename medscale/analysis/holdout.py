"""Validated extrapolation: fit on all budgets but the top K, predict the held-out runs' loss.

``holdout(points, k)`` groups the runs by budget (``isoflop.assign_groups``: the ``budget`` column, else FLOPs
clustered), fits Approach 3 on the runs of all budgets but the K largest, with its design-keeping bootstrap
(``resample.design_counts``), and predicts each held-out run's final loss at its (N, D) with a prediction
interval that adds two sources in quadrature on the log-loss scale:

- parameter uncertainty: the 2.5 and 97.5 percentiles of log L(N, D) over the converged bootstrap refits, as
  distances below and above the fitted law's log L (kept asymmetric: extrapolated draws are skewed);
- run noise: t_{0.975, df} x sigma, sigma the standard deviation of one run's log loss around its expectation:
  from seed replicates when the fitted runs have any (pooled within-cell standard deviation, df = sum of
  (replicates - 1)), else from the fit's residuals (root mean square of log residuals with df = points - 5).
  The source is named in the output (``noise.source``).

So lo = L exp(-sqrt(dp_lo^2 + (t sigma)^2)), hi = L exp(+sqrt(dp_hi^2 + (t sigma)^2)). Reported per run:
observed, predicted, lo, hi, log error log(predicted / observed); over the held-out runs: mean and max |log
error|, mean log error (bias) and coverage (the fraction with lo <= observed <= hi).
"""

from __future__ import annotations

import numpy as np

from medscale.analysis import approach3, isoflop, resample
from medscale.errors import UserError

LEVEL = 0.95
DEFAULT_BOOTSTRAP = 200
MIN_FIT_BUDGETS = 2


def split(points, k: int, bin_dex: float = 0.1):
    """``(held-out mask, budgets fitted, budgets held out, how groups were formed)``; raises UserError for a K
    the data cannot support."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"--holdout-top must be at least 1 (the number of top budgets held out), not {k}")
    gid, C, how = isoflop.assign_groups(points, bin_dex)
    G = len(C)
    if k >= G:
        raise UserError(f"--holdout-top {k}: the runs form {G} budget(s) ({how}); hold out fewer than {G}")
    if G - k < MIN_FIT_BUDGETS:
        raise UserError(f"--holdout-top {k}: only {G - k} budget(s) would be left to fit; at least "
                        f"{MIN_FIT_BUDGETS} are needed (the runs form {G})")
    order = np.argsort(C)
    held_groups = order[G - k:]
    held = np.isin(gid, held_groups)
    if (~held).sum() <= len(approach3.NAMES):
        raise UserError(f"--holdout-top {k}: {(~held).sum()} runs would be left to fit; Approach 3 needs at "
                        f"least {len(approach3.NAMES) + 1}")
    return held, sorted(float(C[g]) for g in order[:G - k]), sorted(float(C[g]) for g in held_groups), how


def noise(train, residuals) -> dict:
    """The run-noise estimate (see the module docstring)."""
    sn = resample.seed_noise(train)
    if sn is not None:
        return {"source": "seed replicates", **sn}
    df = len(residuals) - len(approach3.NAMES)
    return {"source": "fit residuals", "sigma_log": float(np.sqrt(np.sum(residuals ** 2) / max(df, 1))),
            "df": int(max(df, 1)), "cells": None}


def interval(logp, log_draws, sigma, df, level: float = LEVEL):
    """(lo, hi) of the loss from the point prediction's log ``logp`` (R,), the draws' log predictions
    ``log_draws`` (B, R) and the noise ``sigma`` with ``df`` degrees of freedom."""
    from scipy.stats import t as student_t

    q = (1 - level) / 2 * 100
    log_draws = np.asarray(log_draws, np.float64)
    if log_draws.shape[0] == 0 or not np.isfinite(log_draws).any():  # no usable refit: noise only
        p_lo = p_hi = np.asarray(logp, np.float64)
    else:
        p_lo, p_hi = np.nanpercentile(log_draws, [q, 100 - q], axis=0)
    tn = float(student_t.ppf(1 - (1 - level) / 2, df)) * sigma
    below = np.sqrt(np.maximum(logp - p_lo, 0.0) ** 2 + tn ** 2)
    above = np.sqrt(np.maximum(p_hi - logp, 0.0) ** 2 + tn ** 2)
    return np.exp(logp - below), np.exp(logp + above)


def summarise(run_ids, observed, predicted, lo, hi) -> dict:
    """Per-run rows and the error and coverage figures."""
    observed, predicted, lo, hi = (np.asarray(x, np.float64) for x in (observed, predicted, lo, hi))
    err = np.log(predicted) - np.log(observed)
    inside = (lo <= observed) & (observed <= hi)
    runs = [{"run_id": str(r), "observed": float(o), "predicted": float(p), "lo": float(a), "hi": float(b),
             "log_error": float(e), "covered": bool(c)}
            for r, o, p, a, b, e, c in zip(run_ids, observed, predicted, lo, hi, err, inside)]
    return {"runs": runs, "mean_abs_log_error": float(np.mean(np.abs(err))),
            "max_abs_log_error": float(np.max(np.abs(err))), "mean_log_error": float(np.mean(err)),
            "coverage": float(np.mean(inside))}


def holdout(points, k: int, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, delta: float = approach3.DELTA,
            max_iter: int = 300, starts=None, bin_dex: float = 0.1, level: float = LEVEL) -> dict:
    """The holdout check (see the module docstring) as the ``holdout`` object of ``medscale fit --json``."""
    held, fitted_budgets, held_budgets, how = split(points, k, bin_dex)
    bootstrap = int(bootstrap) if bootstrap else DEFAULT_BOOTSTRAP
    train = points[~held].reset_index(drop=True)
    test = points[held].reset_index(drop=True)
    n, d, loss = (train[c].to_numpy(np.float64) for c in ("params", "tokens", "loss"))
    f = approach3.fit(n, d, loss, starts=starts, delta=delta, max_iter=max_iter)
    counts = resample.design_counts(train, bootstrap, seed, bin_dex)
    th, _, conv = approach3.bootstrap(n, d, loss, f, bootstrap, seed=seed, delta=delta, max_iter=max_iter,
                                      counts=counts)
    th = th[conv]
    nt, dt = (test[c].to_numpy(np.float64) for c in ("params", "tokens"))

    def log_law(E, A, B, al, be, nn, dd):
        return np.log(E + A * nn ** -al + B * dd ** -be)

    logp = log_law(f.E, f.A, f.B, f.alpha, f.beta, nt, dt)
    with np.errstate(over="ignore", invalid="ignore"):
        log_draws = log_law(*(np.exp(th[:, [2]]), np.exp(th[:, [0]]), np.exp(th[:, [1]]), th[:, [3]], th[:, [4]]),
                            nt[None], dt[None])
    resid = log_law(f.E, f.A, f.B, f.alpha, f.beta, n, d) - np.log(loss)
    nz = noise(train, resid)
    lo, hi = interval(logp, log_draws, nz["sigma_log"], nz["df"], level)
    ids = test["run_id"].to_numpy() if "run_id" in test.columns else [f"row{i}" for i in np.flatnonzero(held)]
    out = {"k": int(k), "level": level, "groups_from": how, "budgets_fitted": fitted_budgets,
           "budgets_held_out": held_budgets, "n_fit": len(train), "n_held_out": len(test),
           "law": {"E": f.E, "A": f.A, "B": f.B, "alpha": f.alpha, "beta": f.beta, "converged": f.converged},
           "bootstrap": {"n": bootstrap, "seed": int(seed), "converged": int(conv.sum())},
           "noise": nz,
           "interval": "parameter percentiles of the bootstrap refits and t x sigma of the run noise, added in "
                       "quadrature on log loss"}
    out.update(summarise(ids, test["loss"].to_numpy(np.float64), np.exp(logp), lo, hi))
    return out


def summary_line(h: dict) -> str:
    """One line of a holdout result (or of its error): what the quickstart and the report's console print."""
    if h.get("error"):
        return f"holdout top {h.get('k')}: not run ({h['error']})"
    return (f"holdout top {h['k']}: mean |log error| {h['mean_abs_log_error']:.3f} (max "
            f"{h['max_abs_log_error']:.3f}), {round(100 * h['level'])}% intervals cover {h['coverage']:.0%} of "
            f"{h['n_held_out']} held-out runs (noise from {h['noise']['source']})")


def format_holdout(h: dict) -> list[str]:
    """Text lines of a holdout result (``medscale fit --holdout-top K``); one line for an error dict."""
    if h.get("error"):
        return [summary_line(h)]
    nz = h["noise"]
    lines = [(f"Holdout  fit on {len(h['budgets_fitted'])} budgets (up to {h['budgets_fitted'][-1]:.3g} FLOPs), "
             f"predict the top {h['k']} ({', '.join(f'{c:.3g}' for c in h['budgets_held_out'])}): "
             f"{h['n_held_out']} runs"),
             (f"  {round(100 * h['level'])}% prediction intervals: {h['bootstrap']['converged']} of "
             f"{h['bootstrap']['n']} bootstrap refits + run noise sigma {nz['sigma_log']:.4f} (log loss, "
             f"{nz['source']}, df {nz['df']})"),
             f"  {'run':40s}{'observed':>10s}{'predicted':>11s}  interval"]
    for r in h["runs"]:
        lines.append(f"  {r['run_id'][:40]:40s}{r['observed']:10.4f}{r['predicted']:11.4f}  "
                     f"[{r['lo']:.4f}, {r['hi']:.4f}]{'' if r['covered'] else '  outside'}")
    lines.append(f"  mean |log error| {h['mean_abs_log_error']:.4f} (max {h['max_abs_log_error']:.4f}, mean "
                 f"{h['mean_log_error']:+.4f}); coverage {h['coverage']:.0%}")
    return lines
