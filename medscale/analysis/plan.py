"""The next runs worth buying (``medscale plan next``): the K runs that most shrink the 95% interval of N_opt at
the target budget, chosen greedily from a grid of candidate runs.

How a candidate set S is scored (``Planner.score``): the current fit's bootstrap draws stand for the laws the
data still allow. A few of them (``truths``, spread over the draws' N_opt quantiles) are taken in turn as the
truth: the runs of S are simulated from it (its loss at the run's N and D, times exp(sigma e), sigma the sweep's
seed noise of log loss, e one normal draw per run and truth, fixed for the whole search), added to the real
runs, and the augmented table is fitted and bootstrapped as ``medscale fit`` would do it, cheaply: the new fit
is the better of two starts (the current fit and the truth: the basins a global search would reach), and the
bootstrap (``resample.design_counts``: cells within budget groups, seed replicates within cells) refits each
draw from that new fit (the IRLS-damped Newton of ``approach3``, warm-started as ``approach3.bootstrap`` is).
The 95% percentile interval of log10 N_opt over the refits, averaged over the truths, is the expected interval
after S; with S empty the same computation gives the interval now, so before and after differ only by the
simulated runs. The greedy search (``Planner.greedy``) adds moves until K runs are chosen: one run at a budget
the sweep has, or two adjacent sizes at a budget it lacks, each time the move that narrows the expected
interval most per run (a candidate chosen twice is a seed replicate).

The current draws (``current_draws``) restart each bootstrap refit from the fit's optima and a small grid of
starts (``PLAN_STARTS``) and keep the best admissible optimum: a warm start alone cannot leave a basin where one
term of the law is dead (its gradient vanishes), and would report a certainty the runs do not give.

Candidates (``candidates_from_runs``): every size the sweep trained (its measured non-embedding parameters and
model FLOPs per token, per encoder length) at every IsoFLOP budget of the sweep and at two half-decade budgets
above the largest (up to ``max_flops``), with the next unused seed of that cell; D = budget / FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np
import pandas as pd

from medscale.analysis import allocation, approach3, inputs, report, resample
from medscale.errors import UserError

PLAN_STARTS = approach3.start_grid(alphas=[0.3, 1.0], betas=[0.3, 0.6], es=[-0.5, 0.5], as_=[3.0, 10.0],
                                   bs=[3.0, 10.0])  # 32 starts for the current draws (see the module docstring)
LEVEL = 0.95
REFIT_ITER = 120  # iterations of a cheap refit (warm starts converge in ~60; a straggler stops here)


# ------------------------------------------------------------------------------------------- the target


@dataclasses.dataclass
class Target:
    """The budget whose N_opt the plan is about, and how a law meets it: ``log10_n_opt(theta (S, 5)) -> (S,)``."""

    flops: float
    label: str
    fam: tuple | None = None  # (log N, log flops_per_token) of the ladder family; None: C = 6 N D

    def log10_n_opt(self, theta) -> np.ndarray:
        theta = np.atleast_2d(np.asarray(theta, np.float64))
        a_, b_, e_, al, be = theta.T
        out = np.full(len(theta), np.nan)
        ok = np.isfinite(theta).all(1) & (al > 0) & (be > 0)
        if not ok.any():
            return out
        if self.fam is None:  # closed form (Hoffmann et al. 2022, App. D): N_opt = G (C/6)^(beta/(alpha+beta))
            with np.errstate(all="ignore"):
                lg = (np.log(al) + a_ - np.log(be) - b_) / (al + be)
                out[ok] = ((lg + be / (al + be) * math.log(self.flops / 6.0)) / math.log(10.0))[ok]
            return out
        with np.errstate(all="ignore"):
            n, _ = allocation.n_opt_encdec(np.exp(e_[ok]), np.exp(a_[ok]), np.exp(b_[ok]), al[ok], be[ok],
                                           self.flops, self.fam)
        out[ok] = np.log10(np.ravel(n))
        return out


def target_6nd(flops: float) -> Target:
    return Target(float(flops), "C = 6 N D (closed form)")


def target_encdec(flops: float, enc_len=None, dec_len=None) -> Target:
    """The report's compute model: C = D x flops_per_token(N) along the ladder family at the sweep's lengths."""
    return Target(float(flops), f"C = D x flops_per_token(N) (ladder family, Le={enc_len}, Ld={dec_len})",
                  allocation.ladder_family("non_embedding", enc_len, dec_len))


# ------------------------------------------------------------------------------------------- the current fit


def noise_sigma(points, theta) -> dict:
    """The noise of a simulated run's log loss: the pooled seed noise of the sweep's replicated cells
    (``resample.seed_noise``), else the RMS of the fit's log residuals."""
    sn = resample.seed_noise(points)
    if sn is not None and sn["sigma_log"] > 0:
        return {"sigma_log": sn["sigma_log"], "source": f"seed replicates ({sn['cells']} cells, {sn['df']} df)"}
    n, d, y = (points[c].to_numpy(np.float64) for c in ("params", "tokens", "loss"))
    r = _log_loss(theta, n, d) - np.log(y)
    return {"sigma_log": float(np.sqrt(np.mean(r ** 2))), "source": "RMS of the fit's log residuals"}


def _log_loss(theta, n, d):
    a, b, e, al, be = (float(x) for x in theta)
    return np.logaddexp(np.logaddexp(a - al * np.log(n), b - be * np.log(d)), e)


def current_draws(points, base, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(B', 5)`` admissible bootstrap refits of the current runs (design-keeping resampling), each from the
    fit's optima and ``PLAN_STARTS``, the best admissible optimum per draw."""
    n, d, y = (points[c].to_numpy(np.float64) for c in ("params", "tokens", "loss"))
    starts = np.concatenate([np.array([o["theta"] for o in base.optima], np.float64), PLAN_STARTS])
    counts = resample.design_counts(points, n_boot, seed)
    S = len(starts)
    res = approach3.minimize_batch(n, d, y, np.tile(starts, (n_boot, 1)), W=np.repeat(counts, S, 0),
                                   max_iter=900, hessian="irls")
    obj = np.where(approach3._admissible(res), res.objective, np.inf).reshape(n_boot, S)
    keep = np.isfinite(obj).any(1)
    th = res.theta.reshape(n_boot, S, 5)[np.arange(n_boot), obj.argmin(1)]
    return th[keep]


# ------------------------------------------------------------------------------------------- candidates

CAND_COLUMNS = ("size", "enc_len", "dec_len", "params", "tokens", "flops", "budget", "seed")


def _round_budget(c: float) -> float:
    return float(f"{c:.2g}")


def candidates_from_runs(runs, max_flops: float | None = None, extra_budgets: int = 2) -> pd.DataFrame:
    """The candidate grid of a sweep's finished runs (see the module docstring); columns ``CAND_COLUMNS``."""
    d = runs[(runs["status"] == "done") & np.isfinite(runs["loss"].astype(float))].copy()
    for col in ("size", "enc_len", "params", "tokens", "flops"):
        if col not in d.columns or d[col].isna().all():
            raise UserError(f"the runs have no {col!r} column; plan next needs runs made by medscale sweep run")
    d["fpt"] = d["flops"].astype(float) / d["tokens"].astype(float)
    if "budget" in d.columns and np.isfinite(d["budget"].astype(float)).any():
        budgets = sorted({_round_budget(b) for b in d["budget"].astype(float) if np.isfinite(b)})
    else:
        budgets = sorted({_round_budget(c) for c in d["flops"].astype(float)})
    top = budgets[-1]
    budgets += [_round_budget(top * 10 ** (0.5 * (i + 1))) for i in range(extra_budgets)]
    if max_flops is not None:
        budgets = [b for b in budgets if b <= max_flops * (1 + 1e-9)]
        if not budgets:
            raise UserError(f"--max-flops {max_flops:g} is below every candidate budget (the smallest is "
                            f"{min({_round_budget(c) for c in d['flops'].astype(float)}):g} FLOPs); raise it")
    seeds = d.groupby(["size", "enc_len", d["flops"].astype(float).map(_round_budget)])["seed"].max() \
        if "seed" in d.columns else None
    rows = []
    for (size, enc), g in d.groupby(["size", "enc_len"]):
        fpt, n = float(g["fpt"].median()), float(g["params"].astype(float).median())
        dec = g["dec_len"].iloc[0] if "dec_len" in g.columns else None
        for b in budgets:
            s = 0
            if seeds is not None and (size, enc, b) in seeds.index:
                s = int(seeds.loc[(size, enc, b)]) + 1
            rows.append({"size": str(size), "enc_len": int(enc), "dec_len": None if dec is None else int(dec),
                         "params": n, "tokens": b / fpt, "flops": b, "budget": b, "seed": s})
    return pd.DataFrame(rows, columns=list(CAND_COLUMNS))


# ------------------------------------------------------------------------------------------- the planner


class Planner:
    """Scores candidate sets and chooses the next runs (see the module docstring).

    ``points``: the fit's table (``inputs.read_table``); ``base``: its Approach 3 fit (``approach3.fit``);
    ``draws``: the current bootstrap laws (``current_draws``); ``candidates``: a table with ``params``,
    ``tokens``, ``flops`` (and ``budget`` when the points have it)."""

    def __init__(self, points, base, draws, target: Target, candidates, *, truths: int = 4, inner: int = 32,
                 seed: int = 0, sigma: float | None = None):
        if len(candidates) == 0:
            raise UserError("no candidate runs to choose from")
        self.points = points.reset_index(drop=True)
        self.base_theta = np.asarray(base.theta, np.float64)
        self.target, self.inner, self.seed = target, int(inner), int(seed)
        self.cand = candidates.reset_index(drop=True)
        self.sigma = noise_sigma(points, self.base_theta) if sigma is None else {"sigma_log": float(sigma),
                                                                                 "source": "given"}
        lno = target.log10_n_opt(draws)
        ok = np.isfinite(lno)
        if ok.sum() < 2:
            raise UserError("fewer than 2 bootstrap refits give an N_opt at the budget; the runs do not support a "
                            "plan (check medscale fit's warnings)")
        draws, lno = np.asarray(draws)[ok], lno[ok]
        self.draws, self.draws_log10_n_opt = draws, lno
        # the truths: the draws nearest evenly spaced quantiles of their N_opt (spread over what the data allow)
        order = np.argsort(lno)
        picks = order[np.unique(np.round((np.arange(truths) + 0.5) / truths * len(lno) - 0.5).astype(int))]
        self.truths = draws[picks]
        rng = np.random.default_rng(seed)
        self.eps = rng.standard_normal((len(self.truths), 4 * len(self.cand) + 64))  # per truth and run slot
        self.has_budget = "budget" in self.points.columns
        self.evaluations = 0

    def _table(self, chosen):
        cols = ["params", "tokens", "flops"] + (["budget"] if self.has_budget else [])
        new = self.cand.loc[list(chosen), cols].copy()
        return pd.concat([self.points[cols], new], ignore_index=True)

    def score(self, chosen) -> dict:
        """The expected 95% interval of log10 N_opt after adding the candidates ``chosen`` (row indices; may
        repeat): ``{"lo", "hi", "width_dex"}`` averaged over the truths, ``floor_fraction`` (refits whose N_opt
        is at the allocation's search floor)."""
        self.evaluations += 1
        chosen = list(chosen)
        P0, k, R, B = len(self.points), len(chosen), len(self.truths), self.inner
        table = self._table(chosen)
        counts = resample.design_counts(table, B, self.seed)          # (B, P0 + k), common to every truth
        n0, d0, y0 = (self.points[c].to_numpy(np.float64) for c in ("params", "tokens", "loss"))
        nk = self.cand.loc[chosen, "params"].to_numpy(np.float64)
        dk = self.cand.loc[chosen, "tokens"].to_numpy(np.float64)
        n = np.concatenate([n0] + [nk] * R)
        d = np.concatenate([d0] + [dk] * R)
        ys = [y0]
        for r, th in enumerate(self.truths):
            ys.append(np.exp(_log_loss(th, nk, dk) + self.sigma["sigma_log"] * self.eps[r, :k]))
        y = np.concatenate(ys)
        P = P0 + R * k
        own = np.zeros((R, P))  # each truth's table: the real runs and that truth's simulated runs
        own[:, :P0] = 1.0
        for r in range(R):
            own[r, P0 + r * k:P0 + (r + 1) * k] = 1.0
        # the new fit of each truth's table, as medscale fit would find it: the better of the current fit and the
        # truth as starts (the basins a global search reaches)
        th0 = np.stack([np.tile(self.base_theta, (R, 1)), self.truths], 1).reshape(-1, 5)
        res = approach3.minimize_batch(n, d, y, th0, W=np.repeat(own, 2, 0), max_iter=3 * REFIT_ITER,
                                       hessian="irls", threads=1)
        obj = np.where(approach3._admissible(res), res.objective, np.inf).reshape(R, 2)
        fits = res.theta.reshape(R, 2, 5)[np.arange(R), obj.argmin(1)]
        # its bootstrap: rows truth r x draw b, warm-started at that new fit (as approach3.bootstrap does)
        W = np.zeros((R, B, P))
        W[:, :, :P0] = counts[None, :, :P0]
        for r in range(R):
            W[r, :, P0 + r * k:P0 + (r + 1) * k] = counts[:, P0:]
        res = approach3.minimize_batch(n, d, y, np.repeat(fits, B, 0), W=W.reshape(-1, P), max_iter=REFIT_ITER,
                                       hessian="irls", threads=1)
        lno = self.target.log10_n_opt(res.theta)
        lno[~(np.isfinite(res.objective) & approach3._admissible(res))] = np.nan
        lno = lno.reshape(R, B)
        q = (1 - LEVEL) / 2 * 100
        los, his = [], []
        for r in range(R):
            v = lno[r][np.isfinite(lno[r])]
            if len(v) >= 2:
                lo, hi = np.percentile(v, [q, 100 - q])
                los.append(lo)
                his.append(hi)
        if not los:
            return {"lo": None, "hi": None, "width_dex": math.inf, "floor_fraction": None}
        floor = math.log10(allocation.N_SEARCH_MIN) + 0.02
        fin = lno[np.isfinite(lno)]
        return {"lo": float(np.mean(los)), "hi": float(np.mean(his)), "width_dex": float(np.mean(np.subtract(his, los))),
                "floor_fraction": float(np.mean(fin <= floor)) if len(fin) else None}

    def _budget_key(self, c) -> float:
        return _round_budget(float(c))

    def _units(self, chosen, left: int) -> list[tuple]:
        """The moves of one greedy step: a single run at a budget that already has runs; at a budget without
        any, two runs of adjacent sizes (a budget group of one cell would turn the design-keeping bootstrap
        into an unstratified one for every run, ``resample.cells``), when ``left`` >= 2."""
        col = "budget" if self.has_budget else "flops"
        have = {self._budget_key(c) for c in self.points[col].astype(float)}
        have |= {self._budget_key(self.cand.loc[i, "budget"]) for i in chosen}
        units = []
        for b, g in self.cand.groupby(self.cand["budget"].astype(float).map(self._budget_key), sort=True):
            idx = list(g.sort_values("params").index)
            if b in have:
                units += [(int(i),) for i in idx]
            elif left >= 2:
                units += [(int(i), int(j)) for i, j in itertools.pairwise(idx)]
        return units

    def _key(self, unit, s, now: float):
        """Largest narrowing per run first (the narrowest interval when nothing narrows it); on a tie (to
        1e-6 dex) fewer refits at the search floor, then the cheaper move."""
        gain = (now - s["width_dex"]) / len(unit) if math.isfinite(now) else -s["width_dex"]
        ff = s["floor_fraction"]
        return (-round(gain, 6), round(s["width_dex"], 6), 1.0 if ff is None else ff,
                float(self.cand.loc[list(unit), "flops"].sum()))

    def greedy(self, k: int, progress=None) -> dict:
        """Choose ``k`` runs, a move at a time (``_units``), each the move that narrows the expected interval
        most per run."""
        t0 = time.perf_counter()
        before = self.score([])
        chosen, steps, now = [], [], before["width_dex"]
        while len(chosen) < k:
            units = self._units(chosen, k - len(chosen))
            if not units:
                raise UserError("no candidate run fits the remaining count (every candidate budget is new to the "
                                "sweep and needs two runs); ask for --runs 2 or more")
            best, best_s, widths = None, None, []
            for n_done, unit in enumerate(units, 1):
                s = self.score(chosen + list(unit))
                widths.append({"runs": list(unit), "width_dex": s["width_dex"]})
                if best_s is None or self._key(unit, s, now) < self._key(best, best_s, now):
                    best, best_s = unit, s
                if progress is not None:
                    el = time.perf_counter() - t0
                    progress(f"run {len(chosen) + 1}/{k}: move {n_done}/{len(units)}, best expected width "
                             f"{best_s['width_dex']:.3f} dex; {el:.0f} s")
            chosen += list(best)
            now = best_s["width_dex"]
            steps += [{"candidate": int(i), **best_s, "widths": widths} for i in best]
        return {"before": before, "after": steps[-1] if steps else before, "chosen": chosen, "steps": steps,
                "seconds": time.perf_counter() - t0, "evaluations": self.evaluations}


def proposal_rows(cand, chosen) -> list[dict]:
    """The chosen candidates as runs, a repeated candidate getting the next seed."""
    out, used = [], {}
    for i in chosen:
        row = {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
               for k, v in cand.loc[i].to_dict().items()}
        extra = used.get(i, 0)
        used[i] = extra + 1
        if "seed" in row and row["seed"] is not None:
            row["seed"] = int(row["seed"]) + extra
        for key in ("enc_len", "dec_len"):
            if row.get(key) is not None:
                row[key] = int(row[key])
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- plan next


def _measured_mfu(done):
    if "mfu" not in done.columns:
        return None, None
    m = done["mfu"].astype(float)
    kinds = sorted({str(x) for x in done.get("device_kind", []) if isinstance(x, str)})
    return (float(np.nanmedian(m)) if np.isfinite(m).any() else None), (", ".join(kinds) or None)


def _interval(s: dict) -> dict:
    lo, hi = s.get("lo"), s.get("hi")
    return {"n_opt": None if lo is None else [10 ** lo, 10 ** hi], "log10_n_opt": None if lo is None else [lo, hi],
            "width_dex": None if not math.isfinite(s["width_dex"]) else s["width_dex"],
            "floor_fraction": s.get("floor_fraction")}


def plan_next(results_dir: str, runs: int, *, max_flops: float | None = None, hardware=None, gpus=None, days=None,
              mfu=None, precision=None, flops=None, draws: int = 64, truths: int = 4, inner: int = 32,
              seed: int = 0, progress=None) -> dict:
    """``medscale plan next``: the ``runs`` runs that most shrink the expected 95% interval of N_opt at the target
    budget (the report's: one DGX-1 for 7 days unless given; its compute model), as a JSON-ready dict."""
    # the report owns the target budget and the compute model; the plan uses exactly its choices
    for name, v, lo in (("--runs", runs, 1), ("--draws", draws, 8), ("--truths", truths, 1), ("--inner", inner, 8)):
        if int(v) != v or v < lo:
            raise UserError(f"{name} must be a whole number >= {lo}, got {v}")
    if max_flops is not None and not (math.isfinite(max_flops) and max_flops > 0):
        raise UserError(f"--max-flops must be a positive number, got {max_flops:g}")
    step = progress or (lambda msg: None)
    t0 = time.perf_counter()
    table, _ = report.load_runs(results_dir)
    done = table[table["status"] == "done"] if "status" in table.columns else table
    measured, kinds = _measured_mfu(done)
    budget = report.resolve_budget(hardware, gpus, days, mfu, precision, flops, measured, kinds)
    model = report.compute_model(table)
    if hasattr(model, "fam"):
        target = Target(float(budget["flops"]), model.label, model.fam)
    else:
        raise UserError("the runs have no encoder/decoder lengths to place a law on the ladder's compute model; "
                        "plan next needs runs made by medscale sweep run")
    points, _, _ = inputs.read_table(results_dir)
    if len(points) <= 5:
        raise UserError(f"approach 3 fits 5 parameters and needs at least 6 runs; {results_dir} has {len(points)}")
    cand = candidates_from_runs(table, max_flops)
    step(f"fitting approach 3 to {len(points)} runs")
    base = approach3.fit(*(points[c].to_numpy(np.float64) for c in ("params", "tokens", "loss")))
    step(f"{draws} bootstrap refits of the current runs (each from {len(PLAN_STARTS) + len(base.optima)} starts)")
    cur = current_draws(points, base, draws, seed)
    planner = Planner(points, base, cur, target, cand, truths=truths, inner=inner, seed=seed)
    step(f"choosing {runs} of {len(cand)} candidate runs ({len(planner.truths)} truths x {inner} refits each)")
    g = planner.greedy(runs, progress=progress)
    prop = proposal_rows(cand, g["chosen"])
    steps = [{"run": r, **_interval(s),
              "moves": [{"runs": w["runs"], "width_dex": round(w["width_dex"], 4) if math.isfinite(w["width_dex"])
                         else None} for w in s["widths"]]} for r, s in zip(prop, g["steps"])]
    before, after = _interval(g["before"]), _interval(g["after"])
    warnings = []
    if (g["before"].get("floor_fraction") or 0) > 0.5:
        warnings.append(f"N_opt is at the floor of the allocation search ({allocation.N_SEARCH_MIN:.0e} parameters) "
                        f"in {g['before']['floor_fraction']:.0%} of the refits: the runs do not identify the N term, "
                        "and a narrower interval there means the law is surer that size does not matter, not that "
                        "the optimum is known; runs on both sides of each budget's best size are what identify it")
    first = [w["width_dex"] for w in (g["steps"][0]["widths"] if g["steps"] else [])]
    if first and math.isfinite(g["before"]["width_dex"]) and all(
            abs(w - g["before"]["width_dex"]) <= 1e-6 for w in first if math.isfinite(w)):
        warnings.append("no candidate run is expected to change the interval under the current fit's draws: the "
                        "proposal is the cheapest move, not an informative one")
    return {
        "results_dir": results_dir, "runs_requested": int(runs),
        "target": {**budget, "compute_model": target.label,
                   "n_opt_fit": float(10 ** target.log10_n_opt(base.theta)[0])},
        "fit": {"E": base.E, "A": base.A, "B": base.B, "alpha": base.alpha, "beta": base.beta,
                "converged": base.converged},
        "noise": planner.sigma,
        "current": before, "expected_after": after, "steps": steps, "proposal": prop,
        "candidates": {"count": len(cand), "sizes": sorted(cand["size"].unique().tolist()),
                       "budgets": sorted(cand["budget"].unique().tolist()), "max_flops": max_flops},
        "settings": {"level": LEVEL, "draws": int(draws), "draws_usable": len(planner.draws),
                     "truths": len(planner.truths), "inner": int(inner), "seed": int(seed),
                     "refit": f"new fit from 2 starts (current fit, truth), its bootstrap warm-started at it; IRLS "
                              f"Newton, at most {REFIT_ITER} iterations",
                     "evaluations": g["evaluations"]},
        "warnings": warnings, "seconds": time.perf_counter() - t0,
    }
