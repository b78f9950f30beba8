"""``medscale fit RESULTS --repetition``: the repetition constants R*_D (and R*_N where the design allows)
measured from runs on repeated data (``sweeps/repetition.py``), so they describe the user's own modality mix.

Data: one row per run with ``params`` (N), ``tokens`` (D), ``loss`` and the unique tokens it drew from
(``unique_tokens``; from a results folder, ``tokens / epochs`` of the run's data record: a fresh run has U_D = D).
Models (``medscale.analysis.repetition`` for D' and N'), fitted by least squares on log loss:

- ``per-size`` (fewer than 3 sizes): L = c_size + B / D'^beta, one constant per size, N' = N. With two sizes the
  size term cannot be told from excess parameters, so the R*_N correction is left out: exact when the sizes are
  no larger than what the unique data trains compute-optimally (N <= N_opt(U_D)); otherwise R*_D absorbs part of
  the excess-parameter loss of the repeated runs. R*_N is reported as not identified.
- ``law`` (3 sizes or more): L = E + A / N'^alpha + B / D'^beta with U_N = min(N, N_opt(U_D)) from the law being
  fitted, fitting R*_D and R*_N with it.

Intervals: profile likelihood. For each R* on a log grid the other parameters are refitted; the 95% interval is
where n log(RSS(R*) / RSS_min) <= 3.84 (chi-square, 1 degree of freedom). An interval that reaches the grid's end
(1e-2 .. 1e4) is open on that side: the design cannot pin the constant down there, and the fit says so.
"""

from __future__ import annotations

import math
import os

import numpy as np

from medscale.analysis import repetition as rep
from medscale.errors import UserError
from medscale.laws import ChinchillaLaw
from medscale.sweep.registry import load_sweep

CHI2_95 = 3.841458820694124  # chi-square(1) 0.95 quantile
GRID_LO, GRID_HI = 1e-2, 1e4  # the range searched for R*_D and R*_N
GRID = np.exp(np.linspace(math.log(GRID_LO), math.log(GRID_HI), 9))  # starts of the free constants


def read_runs(path: str):
    """(params, tokens, loss, unique_tokens) arrays from a results folder (finished runs) or a CSV/Parquet table
    with those columns (``epochs`` instead of ``unique_tokens`` works too: U_D = tokens / epochs)."""
    import pandas as pd

    if not os.path.exists(path):
        raise UserError(f"input {path} not found")
    if os.path.isdir(path):
        df = load_sweep(path)
        df = df[df["status"] == "done"] if "status" in df.columns else df
    else:
        try:
            df = pd.read_parquet(path) if path.lower().endswith((".parquet", ".pq")) else pd.read_csv(path)
        except (ValueError, OSError, ImportError, pd.errors.ParserError) as exc:
            raise UserError(f"input {path} does not parse ({type(exc).__name__}: {exc})") from None
    need = [c for c in ("params", "tokens", "loss") if c not in df.columns]
    if "unique_tokens" not in df.columns and "epochs" not in df.columns:
        need.append("unique_tokens (or epochs)")
    if need:
        raise UserError(f"{path}: --repetition needs column(s) {', '.join(need)}; columns are {list(df.columns)}")
    cols = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) for c in ("params", "tokens", "loss")}
    if "unique_tokens" in df.columns:
        u = pd.to_numeric(df["unique_tokens"], errors="coerce").to_numpy(np.float64)
    else:
        u = cols["tokens"] / pd.to_numeric(df["epochs"], errors="coerce").to_numpy(np.float64)
    ok = np.isfinite(u) & (u > 0)
    for v in cols.values():
        ok &= np.isfinite(v) & (v > 0)
    if ok.sum() < 5:
        raise UserError(f"{path}: {int(ok.sum())} usable runs; --repetition needs at least 5 (sizes on 1-64 "
                        "epochs and fresh data: sweeps/repetition.py)")
    return cols["params"][ok], cols["tokens"][ok], cols["loss"][ok], u[ok]


def _design(n, d, u):
    repeated = d > u * (1 + 1e-9)
    if not repeated.any():
        raise UserError("no run repeats its data (tokens > unique tokens); --repetition needs runs on a "
                        "fixed-size set for several epochs (sweeps/repetition.py)")
    if repeated.all():
        raise UserError("every run repeats its data; --repetition needs fresh-data runs (1 epoch) too")


class _Model:
    """Residuals of log loss for one model; ``theta`` holds the free parameters, R* given separately."""

    def __init__(self, kind, n, d, u, loss):
        self.kind, self.n, self.d, self.u, self.logl = kind, n, d, u, np.log(loss)
        self.sizes, self.size_idx = np.unique(n, return_inverse=True)

    def predict(self, theta, r_d, r_n):
        dp = rep.effective_data(self.d, self.u, r_d)
        if self.kind == "per-size":
            c = np.exp(theta[:len(self.sizes)])[self.size_idx]
            b, beta = theta[len(self.sizes):]
            return c + np.exp(b - beta * np.log(dp))
        e, a, alpha, b, beta = theta
        law = ChinchillaLaw("fit", math.exp(e), math.exp(a), math.exp(b), alpha, beta)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            u_n = np.minimum(self.n, rep.params_for_tokens(law, self.u))
            npr = rep.effective_params(self.n, u_n, r_n)
            return np.asarray(law.loss(npr, dp))

    def residuals(self, theta, r_d, r_n):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            r = np.log(self.predict(theta, r_d, r_n)) - self.logl
        return np.where(np.isfinite(r), r, 1e3)

    def starts(self):
        if self.kind == "per-size":
            lows = [math.log(0.9 * float(np.min(np.exp(self.logl[self.size_idx == k]))))
                    for k in range(len(self.sizes))]
            return [np.array([*lows, 3.0, beta]) for beta in (0.2, 0.5, 1.0)]
        emin = math.log(0.8 * float(np.min(np.exp(self.logl))))
        return [np.array([emin, 4.0, 0.4, 4.0, beta]) for beta in (0.3, 0.7)]


def _refit(model, r_d, r_n, starts):
    from scipy.optimize import least_squares  # scipy only when fitting

    best = None
    for x0 in starts:
        try:
            res = least_squares(model.residuals, x0, args=(r_d, r_n), method="lm", max_nfev=800)
        except ValueError:
            continue
        rss = float(np.sum(res.fun ** 2))
        if best is None or rss < best[0]:
            best = (rss, res.x)
    if best is None:
        raise UserError("the repetition fit failed at every start; check the runs' losses")
    return best


def _profile_rss(model, which, r, other, theta):
    """Residual sum of squares with one constant (``which``: "d" or "n") fixed at ``r``, the other at ``other``,
    the remaining parameters refitted (warm-started at ``theta``)."""
    starts = [theta, model.starts()[0]]
    return _refit(model, r, other, starts)[0] if which == "d" else _refit(model, other, r, starts)[0]


def _interval(model, which, estimate, other, theta, rss_min, n_points):
    """The 95% profile-likelihood interval of one constant: from the estimate outwards in steps of x2 until the
    profile crosses n log(RSS / RSS_min) = 3.84 or leaves [GRID_LO, GRID_HI] (an open side: None), then 12
    bisections in log R*."""

    def inside(r):
        rss = _profile_rss(model, which, r, other, theta)
        return n_points * math.log(max(rss, rss_min) / rss_min) <= CHI2_95

    ends = []
    for direction in (-1.0, 1.0):
        lo = math.log(estimate)
        bound = math.log(GRID_LO if direction < 0 else GRID_HI)
        end = None
        while direction * (bound - lo) > 0:
            hi = lo + direction * math.log(2.0)
            if direction * (hi - bound) > 0:
                hi = bound
            if not inside(math.exp(hi)):
                for _ in range(12):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if inside(math.exp(mid)) else (lo, mid)
                end = math.exp(0.5 * (lo + hi))
                break
            lo = hi
        ends.append(end)
    return ends, ends[0] is None or ends[1] is None


def _refit_joint(model, r_d=None, r_n=None, starts=()):
    """Fit with R*_D / R*_N fixed where given, free (on a coarse grid, then polished) where None."""
    free_d, free_n = r_d is None, r_n is None
    cand_d = GRID if free_d else [r_d]
    cand_n = GRID if free_n else [r_n]
    best = None
    for rd in cand_d:
        for rn in cand_n:
            rss, th = _refit(model, rd, rn, starts)
            if best is None or rss < best[0]:
                best = (rss, th, rd, rn)
    if not (free_d or free_n):
        return best[0], best[1]
    from scipy.optimize import least_squares

    rss, th, rd, rn = best
    k = len(th)

    lo, hi = math.log(GRID_LO), math.log(GRID_HI)

    def r_of(v):  # the constants stay in the searched range (beyond 1e4 repetition costs nothing measurable)
        return math.exp(min(max(v, lo), hi))

    def res(x):
        return model.residuals(x[:k], r_of(x[k]) if free_d else r_d, r_of(x[-1]) if free_n else r_n)

    x0 = np.concatenate([th, [math.log(rd)] if free_d else [], [math.log(rn)] if free_n else []])
    sol = least_squares(res, x0, method="lm", max_nfev=800)
    if float(np.sum(sol.fun ** 2)) < rss:
        x = sol.x.copy()
        for i in range(k, len(x)):
            x[i] = math.log(r_of(x[i]))
        return float(np.sum(sol.fun ** 2)), x
    return rss, x0


def fit_repetition(n, d, loss, u, model: str | None = None) -> dict:
    """Fit R*_D (and R*_N with the ``law`` model) with profile-likelihood intervals (the module docstring)."""
    n, d, loss, u = (np.asarray(v, np.float64) for v in (n, d, loss, u))
    _design(n, d, u)
    n_sizes = len(np.unique(n))
    kind = model or ("law" if n_sizes >= 3 else "per-size")
    if kind == "law" and n_sizes < 3:
        raise UserError(f"the law model needs 3 sizes or more ({n_sizes} given); use the per-size model")
    m = _Model(kind, n, d, u, loss)
    starts = m.starts()
    if kind == "per-size":
        rss, x = _refit_joint(m, r_d=None, r_n=rep.PUBLISHED_R_N, starts=starts)
        theta, r_d, r_n = x[:-1], math.exp(x[-1]), None
    else:
        rss, x = _refit_joint(m, r_d=None, r_n=None, starts=starts)
        theta, r_d, r_n = x[:-2], math.exp(x[-2]), math.exp(x[-1])
    npts = len(loss)
    rss = max(rss, 1e-300)
    ci_d, open_d = _interval(m, "d", r_d, rep.PUBLISHED_R_N if r_n is None else r_n, theta, rss, npts)
    out = {"model": kind, "n_runs": int(npts), "n_sizes": int(n_sizes),
           "n_repeated": int(np.sum(d > u * (1 + 1e-9))), "max_epochs": float(np.max(d / u)),
           "r_star_d": r_d, "r_star_d_ci": ci_d, "r_star_d_identified": not open_d,
           "r_star_n": r_n, "r_star_n_ci": None, "r_star_n_identified": False,
           "rms_log_residual": math.sqrt(rss / npts),
           "published": {"r_star_d": rep.PUBLISHED_R_D, "r_star_n": rep.PUBLISHED_R_N, "citation": rep.CITATION},
           "notes": []}
    if kind == "per-size":
        out["sizes"] = {f"{s:.6g}": float(math.exp(theta[i])) for i, s in enumerate(m.sizes)}
        out["B"], out["beta"] = float(math.exp(theta[-2])), float(theta[-1])
        out["notes"].append(f"R*_N not identified: {n_sizes} size(s), a size term per size (3 sizes or more fit "
                            f"it with the law model); budget --repetition-constants keeps the published "
                            f"{rep.PUBLISHED_R_N}")
    else:
        ci_n, open_n = _interval(m, "n", r_n, r_d, theta, rss, npts)
        out.update(r_star_n_ci=ci_n, r_star_n_identified=not open_n)
        out["law"] = {"form": "chinchilla", "E": math.exp(theta[0]), "A": math.exp(theta[1]),
                      "alpha": float(theta[2]), "B": math.exp(theta[3]), "beta": float(theta[4])}
        if open_n:
            out["notes"].append("R*_N's 95% interval is open: the design's sizes do not exceed what the unique "
                                "data trains compute-optimally by enough to pin it down")
    if open_d:
        out["notes"].append("R*_D's 95% interval is open: the design cannot pin it down on that side (more "
                            "epochs, more sizes or more seeds would)")
    return out


def constants_file(result: dict) -> dict:
    """What ``--out FILE`` writes: readable by ``medscale budget --repetition-constants FILE``."""
    return {"repetition": {"r_star_d": result["r_star_d"],
                           "r_star_n": result["r_star_n"] if result["r_star_n"] is not None else rep.PUBLISHED_R_N,
                           "r_star_d_ci": result["r_star_d_ci"], "r_star_n_ci": result["r_star_n_ci"],
                           "model": result["model"], "n_runs": result["n_runs"],
                           "r_star_n_source": "fitted" if result["r_star_n"] is not None else rep.CITATION}}


def format_result(res: dict) -> str:
    def ci(v):
        if v is None:
            return "-"
        lo, hi = ("open" if x is None else f"{x:.3g}" for x in v)
        return f"[{lo}, {hi}]"

    lines = [(f"repetition fit ({res['model']} model): {res['n_runs']} runs, {res['n_sizes']} sizes, "
             f"{res['n_repeated']} on repeated data (up to {res['max_epochs']:.3g} epochs)"),
             (f"  R*_D  {res['r_star_d']:.4g}  95% interval {ci(res['r_star_d_ci'])}   (published "
             f"{rep.PUBLISHED_R_D}, {rep.CITATION})")]
    if res["r_star_n"] is not None:
        lines.append(f"  R*_N  {res['r_star_n']:.4g}  95% interval {ci(res['r_star_n_ci'])}   (published "
                     f"{rep.PUBLISHED_R_N})")
    lines.append(f"  rms log-loss residual {res['rms_log_residual']:.4g}")
    lines += [f"  note: {x}" for x in res["notes"]]
    return "\n".join(lines)
