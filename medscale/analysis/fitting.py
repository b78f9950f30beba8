"""All fits of a table of runs in one call, as one JSON-ready dict (what ``medscale fit --json`` prints).

``fit_all(points, approaches=("3", "2"), bootstrap=0, seed=0, budgets=(), curves=None)``; ``write_fit_file``
writes the fit file that ``medscale.laws.load_law`` (and ``medscale budget --law FILE``) reads.
Allocation of a fitted Approach 3 law: closed form under C = 6 N D (``laws.ChinchillaLaw.n_opt``), or under the
project's encoder-decoder accounting with ``allocation.n_opt_accounting``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from medscale import rundir
from medscale.analysis import allocation, approach3, conventions, envelope, holdout, isoflop, resample
from medscale.errors import UserError
from medscale.laws import ChinchillaLaw

N_PARAMS = 5


def _summary(draws: dict) -> tuple[dict, dict]:
    """{name: array (B,)} -> (ci {name: [2.5%, 97.5%]}, percentiles {name: {p10, p50, p90}}), NaN draws out."""
    ci, pct = {}, {}
    for k, v in draws.items():
        v = np.asarray(v, np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            continue
        lo, hi, p10, p50, p90 = np.percentile(v, [2.5, 97.5, 10, 50, 90])
        ci[k] = [float(lo), float(hi)]
        pct[k] = {"p10": float(p10), "p50": float(p50), "p90": float(p90)}
    return ci, pct


def _at_budgets(point_fn, draws_fn, budgets, have_draws):
    out = []
    for c in budgets:
        n, d = point_fn(c)
        row = {"C": float(c), "n_opt": float(n), "d_opt": float(d)}
        if have_draws:
            nd, dd = draws_fn(c)
            row["ci"], row["percentiles"] = _summary({"n_opt": nd, "d_opt": dd})
        out.append(row)
    return out


def fit_approach3(points, bootstrap=0, seed=0, budgets=(), starts=None, delta=approach3.DELTA,
                  max_iter=300, accounting="6nd", n_convention="non_embedding", enc_len=None,
                  dec_len=None) -> dict:
    P = len(points)
    if P <= N_PARAMS:
        raise UserError(f"approach 3 fits {N_PARAMS} parameters and needs at least {N_PARAMS + 1} runs; "
                        f"the data have {P}")
    n, d, loss = (points[c].to_numpy(np.float64) for c in ("params", "tokens", "loss"))
    f = approach3.fit(n, d, loss, starts=starts, delta=delta, max_iter=max_iter)
    law = ChinchillaLaw("fit", E=f.E, A=f.A, B=f.B, alpha=f.alpha, beta=f.beta)
    res = {"E": f.E, "A": f.A, "B": f.B, "alpha": f.alpha, "beta": f.beta, "a": law.a, "b": law.b, "G": law.G,
           "objective": f.objective, "converged": f.converged, "grad_norm": f.grad_norm, "delta": delta,
           "n_starts": f.n_starts, "starts_converged": f.starts_converged, "starts_diverged": f.starts_diverged,
           "starts_unfinished": f.starts_unfinished, "seconds": f.seconds,
           "local_optima": [o["objective"] for o in f.optima]}
    if f.unconstrained is not None:  # a lower objective with a non-positive exponent, not a law of this form
        res["unconstrained"] = f.unconstrained
    draws = None
    if bootstrap:
        counts = resample.design_counts(points, bootstrap, seed)
        th, _obj, conv = approach3.bootstrap(n, d, loss, f, bootstrap, seed=seed, delta=delta,
                                                max_iter=max_iter, counts=counts)
        E, A, B, al, be = np.exp(th[:, 2]), np.exp(th[:, 0]), np.exp(th[:, 1]), th[:, 3], th[:, 4]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            G = (al * A / (be * B)) ** (1.0 / (al + be))
        draws = {"E": E, "A": A, "B": B, "alpha": al, "beta": be, "a": be / (al + be), "b": al / (al + be),
                 "G": G}
        res["ci"], res["percentiles"] = _summary(draws)
        res["bootstrap"] = {"n": int(bootstrap), "seed": int(seed), "converged_fraction": float(conv.mean()),
                            "inadmissible_draws": int(np.sum(~((al > 0) & (be > 0)))),
                            "resampled": "design", "design": resample.describe(points)}
        res["_draws"] = {**draws, "converged": conv}
    else:
        res["ci"], res["percentiles"] = {}, {}

    def draws_fn(c):
        with np.errstate(invalid="ignore", over="ignore"):
            return draws["G"] * (c / 6.0) ** draws["a"], (c / 6.0) ** draws["b"] / draws["G"]

    res["allocation"] = _at_budgets(lambda c: (law.n_opt(c), law.d_opt(c)), draws_fn, budgets, draws is not None)
    res["allocation_convention"] = "C = 6 N D (closed form)"
    if accounting == "encdec":
        fam = allocation.ladder_family(n_convention, enc_len, dec_len)
        rows = []
        for c in budgets:
            n_, d_ = allocation.n_opt_encdec(f.E, f.A, f.B, f.alpha, f.beta, c, fam)
            row = {"C": c, "n_opt": float(np.ravel(n_)[0]), "d_opt": float(np.ravel(d_)[0])}
            if draws is not None:
                nd, dd = allocation.n_opt_encdec(draws["E"], draws["A"], draws["B"], draws["alpha"],
                                                 draws["beta"], c, fam)
                row["ci"], row["percentiles"] = _summary({"n_opt": nd, "d_opt": dd})
            rows.append(row)
        res["allocation_encdec"] = rows
        res["allocation_encdec_convention"] = (
            f"C = D * flops_per_token(N), ladder shape family (medscale.accounting), N {n_convention}, "
            f"D encoder+decoder tokens")
    elif accounting != "6nd":
        raise UserError(f"accounting must be 6nd or encdec, not {accounting!r}")
    res["n_convention"] = n_convention
    return res


def _powerlaw_result(base: dict, draws: dict | None, budgets) -> dict:
    res = {k: base[k] for k in ("a", "b", "k_n", "k_d")}
    if draws is not None:
        res["ci"], res["percentiles"] = _summary(draws)
    else:
        res["ci"], res["percentiles"] = {}, {}

    def draws_fn(c):
        return draws["k_n"] * c ** draws["a"], draws["k_d"] * c ** draws["b"]

    res["allocation"] = _at_budgets(lambda c: (base["k_n"] * c ** base["a"], base["k_d"] * c ** base["b"]),
                                    draws_fn, budgets, draws is not None)
    return res


def fit_approach2(points, bootstrap=0, seed=0, budgets=(), bin_dex=0.1) -> dict:
    base = isoflop.fit(points, bin_dex=bin_dex)
    draws = isoflop.bootstrap(points, base, bootstrap, seed=seed) if bootstrap else None
    res = {"a": base["a"], "b": base["b"], "k_n": base["k_n"], "k_d": base["k_d"], "method": "parabola",
           "groups_from": base["groups_from"], "n_groups": base["n_groups"], "groups": base["groups"],
           "parabola_minus_spline_a": base["parabola_minus_spline_a"]}
    for m in isoflop.METHODS:
        r = _powerlaw_result(base[m], None if draws is None else draws[m], budgets) if np.isfinite(
            base[m]["a"]) else {"a": None, "b": None, "reason": "fewer than 2 groups with a minimum"}
        r["groups_used"] = base[m]["groups_used"]
        res[m] = r
    res["ci"], res["percentiles"] = res["parabola"]["ci"], res["parabola"]["percentiles"]
    res["allocation"] = res["parabola"]["allocation"]
    res["spline_check"] = base["spline_check"]
    if bootstrap:
        dg = draws["_degenerate"]
        usable = np.isfinite(draws["parabola"]["a"])
        res["draws"] = int(bootstrap)
        res["degenerate_draws"] = int(dg["lost"].any(1).sum())
        res["failed_draws"] = int((~usable).sum())
        C = base["_logc"]
        res["bootstrap"] = {
            "n": int(bootstrap), "seed": int(seed), "resampled": "design", "design": resample.describe(points),
            "draws": int(bootstrap), "degenerate_draws": res["degenerate_draws"], "failed_draws": res["failed_draws"],
            "degenerate_by_group": [{"C": float(np.exp(C[g])), "fewer_than_3_sizes": int(dg["few_sizes"][:, g].sum()),
                                     "no_minimum_inside": int(dg["no_minimum"][:, g].sum())}
                                    for g in range(len(C)) if dg["lost"][:, g].any()],
            "degenerate_handling": "a degenerate draw keeps the budgets that still have a minimum (the power law "
                                   "over those); a draw left with fewer than 2 is a failed draw, outside the "
                                   "intervals"}
    return res


def fit_approach1(curves, bootstrap=0, seed=0, budgets=(), n_grid=40) -> dict:
    if curves is None:
        raise UserError("approach 1 needs loss curves (several rows per run with a step column, or a results "
                        "folder); this input has one row per run")
    base = envelope.fit(curves, n_grid=n_grid)
    draws = envelope.bootstrap(base, bootstrap, seed=seed) if bootstrap else None
    res = _powerlaw_result(base, draws, budgets)
    res.update({k: base[k] for k in ("n_runs", "grid_points", "winners", "winner_runs", "envelope")})
    if bootstrap:
        res["bootstrap"] = {"n": int(bootstrap), "seed": int(seed), "resampled": "runs"}
    return res


def warnings_of(result: dict) -> list[str]:
    out = []
    a3 = result.get("approach3")
    if a3 is not None:
        if not a3["converged"]:
            out.append(f"approach 3 did NOT converge: best objective {a3['objective']:.6g}, relative gradient "
                       f"{a3['grad_norm']:.2g}; treat its parameters as unreliable")
        un = a3.get("unconstrained")
        if un:
            out.append(f"approach 3: the lowest objective ({un['objective']:.6g}) has alpha {un['alpha']:.3g}, beta "
                       f"{un['beta']:.3g}, not a law of this form (loss must fall with N and D); the fit is the best "
                       f"with positive exponents ({a3['objective']:.6g}): the runs do not pin the N term down")
        bs = a3.get("bootstrap")
        if bs and bs.get("inadmissible_draws"):
            out.append(f"approach 3 bootstrap: {bs['inadmissible_draws']} of {bs['n']} refits have a non-positive "
                       "exponent; their allocations are left out of the intervals")
        if bs and bs["converged_fraction"] < 0.99:
            out.append(f"approach 3 bootstrap: only {bs['converged_fraction']:.1%} of the refits converged")
    a2 = result.get("approach2")
    if a2 is not None:
        ex = [g for g in a2["groups"] if g["excluded"]]
        if ex:
            out.append("approach 2 left out group(s) " + "; ".join(f"C={g['C']:.3g}: {g['excluded']}" for g in ex))
        wide = [g for g in a2["groups"] if g["spread_dex"] > 0.2]
        if wide:
            out.append(f"approach 2: {len(wide)} group(s) span more than 0.2 decades of compute (up to "
                       f"{max(g['spread_dex'] for g in wide):.2f}); the runs are not an IsoFLOP design and the "
                       "profiles mix budgets")
        if a2.get("degenerate_draws"):
            out.append(f"approach 2 bootstrap: {a2['degenerate_draws']} of {a2['draws']} draws are degenerate (a "
                       "budget drew fewer than 3 distinct sizes or its parabola lost its minimum; those draws fit "
                       f"the other budgets), {a2.get('failed_draws', 0)} failed (fewer than 2 budgets left)")
        sc = a2.get("spline_check") or {}
        diff = sc.get("parabola_minus_spline_a")
        if sc.get("status") == "not run":
            out.append(f"approach 2: the parabola-vs-spline bias check did not run: {sc.get('reason')}")
        if diff is not None and abs(diff) > 0.02:
            out.append(f"approach 2: parabola and spline minima disagree on a by {diff:+.3f} (parabola bias on "
                       "lopsided IsoFLOP curves, or too few sizes per group)")
    a1 = result.get("approach1")
    if a1 is not None and a1["winners"] < 3:
        out.append(f"approach 1: only {a1['winners']} distinct size(s) on the envelope; its exponents are not "
                   "meaningful")
    return out


def check(points, approaches, curves=None, bin_dex=0.1) -> None:
    """Raise UserError when the data cannot support a requested approach (before any work is done)."""
    for a in approaches:
        if a not in ("1", "2", "3"):
            raise UserError(f"unknown approach {a!r}: use 1, 2 or 3")
    if "3" in approaches and len(points) <= N_PARAMS:
        raise UserError(f"approach 3 fits {N_PARAMS} parameters and needs at least {N_PARAMS + 1} runs; "
                        f"the data have {len(points)}")
    if "2" in approaches:
        _, C, how = isoflop.assign_groups(points, bin_dex)
        if len(C) < 2:
            raise UserError(f"approach 2 needs IsoFLOP groups at 2 or more compute budgets; the data form one "
                            f"({how}); add runs at other budgets or pass --approach 3")
    if "1" in approaches and curves is None:
        raise UserError("approach 1 needs loss curves (several rows per run with a step column, or a results "
                        "folder); this input has one row per run")


def default_approaches(points, curves, bin_dex: float = 0.1) -> tuple:
    """The approaches ``points`` support (``medscale fit``'s and the report's default): Approach 3, plus 2 when the runs form 2+ IsoFLOP groups, plus 1 with curves."""
    out = ["3"]
    try:
        groups = len(isoflop.assign_groups(points, bin_dex)[1])
    except UserError:
        groups = int(points["budget"].nunique()) if "budget" in points.columns else 0
    if groups >= 2:
        out.append("2")
    if curves is not None and len(curves):
        out.append("1")
    return tuple(out)


def fit_all(points, approaches=("3", "2"), bootstrap=0, seed=0, budgets=(), curves=None, source=None,
            starts=None, delta=approach3.DELTA, bin_dex=0.1, max_iter=300, accounting="6nd",
            n_convention="non_embedding", enc_len=None, dec_len=None, progress=None, holdout_top=None,
            convention_table=True) -> dict:
    """Fit the requested approaches ("1", "2", "3") to ``points`` (one row per run, canonical columns; see
    ``inputs.read_table``) and ``curves`` (Approach 1). Returns the ``--json`` object. The input is checked
    for every requested approach before any fitting starts; then ``progress(message)`` is called, if given.

    With Approach 3, ``convention_table`` adds ``conventions`` (``conventions.table``: a, b, N_opt at the first
    budget under each parameter and FLOPs convention); ``holdout_top=K`` adds ``holdout``
    (``holdout.holdout``: fit on all budgets but the top K, predict the held-out runs)."""
    budgets = [float(c) for c in budgets]
    for c in budgets:
        if not (math.isfinite(c) and c > 0):
            raise UserError(f"budget {c} FLOPs must be positive")
    check(points, approaches, curves, bin_dex)
    if holdout_top is not None:
        holdout.split(points, holdout_top, bin_dex)
    if progress is not None:
        progress(f"fitting approach(es) {', '.join(approaches)} to {len(points)} runs"
                 + (f" with {bootstrap} bootstrap draws" if bootstrap else ""))
    result = {"n_points": len(points)}
    if source is not None:
        result["source"] = source
    if "3" in approaches:
        result["approach3"] = fit_approach3(points, bootstrap, seed, budgets, starts=starts, delta=delta,
                                             max_iter=max_iter, accounting=accounting,
                                             n_convention=n_convention, enc_len=enc_len, dec_len=dec_len)
        if convention_table:
            result["conventions"], result["conventions_info"] = _conventions(
                points, result["approach3"], budgets, enc_len, dec_len, delta, n_convention, "2" in approaches)
    if "2" in approaches:
        result["approach2"] = fit_approach2(points, bootstrap, seed, budgets, bin_dex=bin_dex)
    if "1" in approaches:
        result["approach1"] = fit_approach1(curves, bootstrap, seed, budgets)
    if holdout_top is not None:
        if progress is not None:
            progress(f"holdout: fitting all budgets but the top {holdout_top}")
        result["holdout"] = holdout.holdout(points, holdout_top, bootstrap=bootstrap or holdout.DEFAULT_BOOTSTRAP,
                                            seed=seed, delta=delta, max_iter=max_iter, starts=starts,
                                            bin_dex=bin_dex)
    result["warnings"] = warnings_of(result)
    return clean(result)


def _conventions(points, a3, budgets, enc_len, dec_len, delta, n_convention, with_a2) -> tuple[list, dict]:
    """``conventions`` (the rows of ``conventions.table``) and ``conventions_info`` (budget, shifts from
    non-embedding/6ND, what the FLOPs conventions mean)."""
    if n_convention != "non_embedding":
        return [], {"reason": "the params column is not the non-embedding count (--n-convention "
                              f"{n_convention}); the table starts from non-embedding parameters"}
    theta = approach3.law_to_theta(a3["E"], a3["A"], a3["B"], a3["alpha"], a3["beta"])
    C = budgets[0] if budgets else None
    rows = conventions.table(points, C, enc_len, dec_len, base_theta=theta, delta=delta, approach2=with_a2)
    return rows, {"C": C, "shifts": conventions.shifts(rows), "enc_len": enc_len, "dec_len": dec_len,
                  "note": "6ND: C = 6 N D with the row's N (closed form); accounted: the project's "
                          "encoder-decoder model FLOPs along the ladder family (local exponents at C)"}


def clean(obj):
    """JSON-safe: numpy scalars to Python, NaN/inf to None, private keys (leading _) dropped."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_fit_file(path: str, result: dict, points=None) -> None:
    """The fit file: ``{"law": {form chinchilla, E, A, B, alpha, beta}, "ci", "percentiles", "bootstrap",
    "fit": <the fit_all object>, "data": {"columns", "rows"}}``, written atomically (temp file + rename)."""
    a3 = result.get("approach3")
    if a3 is None:
        raise UserError("--out writes the Approach 3 law; run with --approach 3 (or all)")
    src = result.get("source", {}).get("path", "")
    doc = {
        "law": {"form": "chinchilla", "name": os.path.splitext(os.path.basename(path))[0],
                "n_convention": a3.get("n_convention", "non_embedding"),
                "E": a3["E"], "A": a3["A"], "B": a3["B"], "alpha": a3["alpha"], "beta": a3["beta"],
                "citation": f"medscale fit, Approach 3 (Hoffmann et al. 2022) on {src or 'a table of runs'}"},
        "converged": a3["converged"], "objective": a3["objective"],
        "ci": a3.get("ci", {}), "percentiles": a3.get("percentiles", {}), "bootstrap": a3.get("bootstrap"),
        "fit": result,
    }
    if points is not None:
        cols = [c for c in ("run_id", "params", "tokens", "flops", "budget", "loss") if c in points.columns]
        doc["data"] = {"columns": cols, "rows": clean(points[cols].to_numpy().tolist())}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--out {path}: folder {folder} does not exist")
    rundir.write_text(path, json.dumps(clean(doc), indent=1))
