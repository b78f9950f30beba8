"""Approach 2 of Hoffmann et al. 2022: IsoFLOP profiles.

Runs are grouped by compute: by their ``budget`` label when the table has one, otherwise by clustering
log10(flops) (a new group starts where sorted log10 C jumps by more than ``bin_dex``). In each group the loss is
a function of x = log N; its minimum is located two ways:

- ``parabola``: least squares L = c0 + c1 x + c2 x^2, minimum at -c1 / (2 c2) (the paper's method). On lopsided
  profiles (the loss rises faster on the small-N side, as the law implies) the parabola's vertex is biased;
  the bias depends on how the sizes sit around the optimum (Besiroglu et al. 2024, Sec. 4; also the
  Open-Athena scaling-law-analysis notes).
- ``spline``: a cubic smoothing spline (scipy ``make_smoothing_spline``, smoothing chosen by GCV on the
  group's data, and kept for its bootstrap draws) minimised on a fine grid; needs >= 5 distinct sizes. The
  comparison of the two (``spline_check``) is always reported: per group ``ok``, ``skipped`` (too few sizes)
  or ``failed`` (minimum on an end), and the difference in a over the groups where both have a minimum.

The bootstrap keeps the design (``resample.design_counts``: cells redrawn within each group, seed replicates
within their cell); draws in which a group loses its minimum are counted as degenerate (``degenerate_draws``).

A group's minimum must lie inside its sampled range of N (otherwise it is an extrapolation and the group is
left out of the power-law fit, with the reason). The tokens at the minimum come from the group's own
log D vs log N line (exactly C / (6 N) when C = 6 N D). Then log N_opt = log k_N + a log C and
log D_opt = log k_D + b log C by least squares over groups.
"""

from __future__ import annotations

import numpy as np

from medscale.errors import UserError

METHODS = ("parabola", "spline")


def assign_groups(points, bin_dex: float = 0.1):
    """(group index per row, compute C per group, how groups were formed)."""
    if "budget" in points.columns and points["budget"].notna().all():
        labels, inv = np.unique(points["budget"].to_numpy(np.float64), return_inverse=True)
        return inv, labels, "budget column"
    lc = np.log10(points["flops"].to_numpy(np.float64))
    order = np.argsort(lc)
    gid = np.zeros(len(lc), int)
    gid[order] = np.concatenate([[0], np.cumsum(np.diff(lc[order]) > bin_dex)])
    C = np.array([10 ** lc[gid == g].mean() for g in range(gid.max() + 1)])
    return gid, C, f"flops clustered (gaps > {bin_dex} decades)"


def _parabola_min(x, y, W):
    """Weighted parabola per draw. x, y (n,), W (B, n) -> x* (B,), curvature c2 (B,)."""
    X = np.stack([np.ones_like(x), x, x * x], 1)
    XtWX = np.einsum("bn,ni,nj->bij", W, X, X)
    XtWy = np.einsum("bn,ni,n->bi", W, X, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.linalg.matrix_rank(XtWX) == 3
        c = np.full((W.shape[0], 3), np.nan)
        if ok.any():
            c[ok] = np.linalg.solve(XtWX[ok], XtWy[ok][..., None])[..., 0]
        xs = -c[:, 1] / (2 * c[:, 2])
    return np.where(c[:, 2] > 0, xs, np.nan), c[:, 2]


def _gcv_lam(x, y, w):
    """The GCV smoothing parameter scipy's make_smoothing_spline picks for these points (read through its
    private helper, so that bootstrap draws can reuse it: a GCV search per draw costs 10x the fit). None when
    that helper is not there (then each draw runs its own GCV)."""
    from scipy.interpolate import _bsplines, make_smoothing_spline

    helper = getattr(_bsplines, "_compute_optimal_gcv_parameter", None)
    if helper is None:
        return None
    seen = []

    def spy(*args, **kwargs):
        seen.append(helper(*args, **kwargs))
        return seen[-1]

    _bsplines._compute_optimal_gcv_parameter = spy
    try:
        make_smoothing_spline(x, y, w=w)
    finally:
        _bsplines._compute_optimal_gcv_parameter = helper
    return float(seen[0]) if seen else None


def _spline_min(x, y, w, lam=None, grid=512):
    """Minimum of a cubic smoothing spline through (x, y) with weights w (duplicates merged), smoothing ``lam``
    (None: GCV); NaN when there are fewer than 5 distinct x or the minimum sits on an end of the range."""
    from scipy.interpolate import make_smoothing_spline

    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    ux, inv = np.unique(x, return_inverse=True)
    if len(ux) < SPLINE_MIN_SIZES:
        return np.nan
    ww = np.bincount(inv, weights=w)
    yy = np.bincount(inv, weights=w * y) / ww
    try:
        spl = make_smoothing_spline(ux, yy, w=ww / ww.mean(), lam=lam)
    except (ValueError, np.linalg.LinAlgError):
        return np.nan
    xg = np.linspace(ux[0], ux[-1], grid)
    k = int(np.argmin(spl(xg)))
    if k == 0 or k == grid - 1:
        return np.nan
    return float(xg[k])


SPLINE_MIN_SIZES = 5


def spline_status(x, y) -> tuple[str, str | None]:
    """Whether the spline check runs on one group's points (x = log N): ``("ok", None)``, or ``("skipped" |
    "failed", reason)``."""
    ux = np.unique(x)
    if len(ux) < SPLINE_MIN_SIZES:
        return "skipped", (f"{len(ux)} distinct size(s); the smoothing spline needs {SPLINE_MIN_SIZES}")
    if not np.isfinite(_spline_min(x, y, np.ones_like(x))):
        return "failed", "the spline's minimum sits on an end of the sampled sizes (or the spline fit failed)"
    return "ok", None


def _log_d_at(x, logd, W, xs):
    """Weighted line log D = u + v log N per draw, evaluated at xs (B,)."""
    X = np.stack([np.ones_like(x), x], 1)
    XtWX = np.einsum("bn,ni,nj->bij", W, X, X)
    XtWy = np.einsum("bn,ni,n->bi", W, X, logd)
    with np.errstate(invalid="ignore"):
        ok = np.abs(np.linalg.det(XtWX)) > 1e-12
        c = np.full((W.shape[0], 2), np.nan)
        if ok.any():
            c[ok] = np.linalg.solve(XtWX[ok], XtWy[ok][..., None])[..., 0]
    return c[:, 0] + c[:, 1] * xs


def _powerlaw(logc, logy):
    """Least squares log y = k + s log C per row of logy (B, G), NaN entries left out. -> slope, intercept."""
    m = np.isfinite(logy)
    n = m.sum(1)
    xc = np.where(m, logc, 0.0)
    yc = np.where(m, logy, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = xc.sum(1) / n, yc.sum(1) / n
        sxx = (np.where(m, (logc - mx[:, None]) ** 2, 0)).sum(1)
        sxy = (np.where(m, (logc - mx[:, None]) * (logy - my[:, None]), 0)).sum(1)
        slope = sxy / sxx
        icpt = my - slope * mx
    bad = n < 2
    return np.where(bad, np.nan, slope), np.where(bad, np.nan, icpt)


def _minima(points, gid, W):
    """Per draw (rows of W: weights on points) and group: log N_opt and log D_opt for both methods."""
    x_all = np.log(points["params"].to_numpy(np.float64))
    y_all = points["loss"].to_numpy(np.float64)
    ld_all = np.log(points["tokens"].to_numpy(np.float64))
    G = gid.max() + 1
    B = W.shape[0]
    out = {m: {"logn": np.full((B, G), np.nan), "logd": np.full((B, G), np.nan)} for m in METHODS}
    reasons = {}
    for g in range(G):
        sel = gid == g
        x, y, ld, Wg = x_all[sel], y_all[sel], ld_all[sel], W[:, sel]
        lo, hi = x.min(), x.max()
        xs, c2 = _parabola_min(x, y, Wg)
        inside = (xs >= lo) & (xs <= hi)
        xs = np.where(inside, xs, np.nan)
        out["parabola"]["logn"][:, g] = xs
        out["parabola"]["logd"][:, g] = _log_d_at(x, ld, Wg, xs)
        if B == 1 and not np.isfinite(xs[0]):
            reasons[g] = "fewer than 3 sizes" if len(np.unique(x)) < 3 else (
                "no minimum (loss not convex in log N)" if not c2[0] > 0 else "minimum outside the sampled sizes")
        ux, inv = np.unique(x, return_inverse=True)
        lam = None
        if B > 1 and len(ux) >= SPLINE_MIN_SIZES:  # the full data's GCV smoothing, kept for every draw
            cnt = np.bincount(inv)
            lam = _gcv_lam(ux, np.bincount(inv, weights=y) / cnt, cnt / cnt.mean())
        xsp = np.array([_spline_min(x, y, Wg[b], lam=lam) for b in range(B)])
        out["spline"]["logn"][:, g] = xsp
        out["spline"]["logd"][:, g] = _log_d_at(x, ld, Wg, xsp)
    return out, reasons


def fit(points, bin_dex: float = 0.1) -> dict:
    """Approach 2 on one row per run (params, tokens, loss, flops[, budget])."""
    gid, C, how = assign_groups(points, bin_dex)
    if len(C) < 2:
        raise UserError(f"approach 2 needs IsoFLOP groups at 2 or more compute budgets; the data form one "
                        f"({how}); add runs at other budgets or pass --approach 3")
    W = np.ones((1, len(points)))
    mins, reasons = _minima(points, gid, W)
    logc = np.log(C)
    res = {"groups_from": how, "n_groups": len(C), "groups": []}
    lf = np.log10(points["flops"].to_numpy(np.float64))
    for g in range(len(C)):
        sel = gid == g
        res["groups"].append({
            "C": float(C[g]), "n_runs": int(sel.sum()), "spread_dex": float(lf[sel].max() - lf[sel].min()),
            "n_opt_parabola": _exp(mins["parabola"]["logn"][0, g]),
            "d_opt_parabola": _exp(mins["parabola"]["logd"][0, g]),
            "n_opt_spline": _exp(mins["spline"]["logn"][0, g]),
            "d_opt_spline": _exp(mins["spline"]["logd"][0, g]),
            "excluded": reasons.get(g)})
        st, why = spline_status(np.log(points["params"].to_numpy(np.float64)[sel]),
                                points["loss"].to_numpy(np.float64)[sel])
        res["groups"][-1]["spline_status"], res["groups"][-1]["spline_reason"] = st, why
    for m in METHODS:
        a, ka = _powerlaw(logc, mins[m]["logn"])
        b, kb = _powerlaw(logc, mins[m]["logd"])
        used = int(np.isfinite(mins[m]["logn"][0]).sum())
        res[m] = {"a": _f(a[0]), "b": _f(b[0]), "k_n": _exp(ka[0]), "k_d": _exp(kb[0]), "groups_used": used}
    if not np.isfinite(res["parabola"]["a"]):
        raise UserError("approach 2: fewer than 2 IsoFLOP groups have a minimum inside their sampled sizes "
                        f"({'; '.join(f'C={C[g]:.3g}: {r}' for g, r in reasons.items())}); "
                        "sample sizes on both sides of each group's optimum")
    res["a"], res["b"] = res["parabola"]["a"], res["parabola"]["b"]
    res["k_n"], res["k_d"] = res["parabola"]["k_n"], res["parabola"]["k_d"]
    res["parabola_minus_spline_a"] = (res["parabola"]["a"] - res["spline"]["a"]
                                      if np.isfinite(res["spline"]["a"]) else None)
    res["spline_check"] = _spline_check(res["groups"], mins, logc)
    res["_gid"], res["_logc"] = gid, logc
    res["_logn_parabola"] = mins["parabola"]["logn"][0]
    return res


def _spline_check(groups, mins, logc) -> dict:
    """The parabola-vs-spline bias check, always reported: per group its status and reason, and the difference
    of the exponent a over the groups where both methods have a minimum (None with the reason when fewer than 2)."""
    both = np.isfinite(mins["parabola"]["logn"][0]) & np.isfinite(mins["spline"]["logn"][0])
    out = {"groups": [{"C": g["C"], "status": g["spline_status"], "reason": g["spline_reason"]} for g in groups],
           "groups_compared": int(both.sum()), "parabola_a": None, "spline_a": None,
           "parabola_minus_spline_a": None}
    if both.sum() >= 2:
        pa, _ = _powerlaw(logc, np.where(both, mins["parabola"]["logn"][0], np.nan)[None])
        sa, _ = _powerlaw(logc, np.where(both, mins["spline"]["logn"][0], np.nan)[None])
        out.update(status="ran", parabola_a=_f(pa[0]), spline_a=_f(sa[0]),
                   parabola_minus_spline_a=_f(pa[0] - sa[0]), reason=None)
    else:
        st = [g["spline_status"] for g in groups]
        out.update(status="not run", reason=(
            f"{int(both.sum())} budget(s) have both a parabola and a spline minimum, 2 are needed; spline "
            f"skipped at {st.count('skipped')} budget(s) (fewer than {SPLINE_MIN_SIZES} distinct sizes), failed "
            f"at {st.count('failed')} (minimum on an end of the sizes)"))
    return out


def bootstrap(points, base: dict, n_boot: int, seed: int = 0, counts=None) -> dict:
    """Refit both methods on ``n_boot`` resamples: ``counts`` (n_boot, P) weights per run (default
    ``resample.design_counts``: cells redrawn within each IsoFLOP group, seed replicates within their cell).
    Returns {method: {"a", "b", "k_n", "k_d"}: arrays (B,)} and "_degenerate": per draw and group whether a group
    that has a parabola minimum in the full fit lost it in the draw (fewer than 3 distinct sizes drawn, or the
    parabola has no minimum inside the drawn sizes), with the reasons counted per group."""
    # resample groups runs with assign_groups above: imported here, a cycle at the top
    from medscale.analysis import resample

    gid = base["_gid"]
    W = resample.design_counts(points, n_boot, seed) if counts is None else np.asarray(counts, np.float64)
    mins, _ = _minima(points, gid, W)
    out = {}
    for m in METHODS:
        a, ka = _powerlaw(base["_logc"], mins[m]["logn"])
        b, kb = _powerlaw(base["_logc"], mins[m]["logd"])
        out[m] = {"a": a, "b": b, "k_n": np.exp(ka), "k_d": np.exp(kb)}
    x_all = np.log(points["params"].to_numpy(np.float64))
    G = gid.max() + 1
    used = np.array([np.isfinite(base["_logn_parabola"][g]) for g in range(G)])
    few = np.zeros((W.shape[0], G), bool)
    for g in range(G):
        sel = gid == g
        xs = x_all[sel]
        ux, inv = np.unique(xs, return_inverse=True)
        present = np.stack([(W[:, sel][:, inv == j] > 0).any(1) for j in range(len(ux))], 1)
        few[:, g] = present.sum(1) < 3
    lost = ~np.isfinite(mins["parabola"]["logn"]) & used[None]
    out["_degenerate"] = {"lost": lost, "few_sizes": few & lost, "no_minimum": lost & ~few}
    return out


def _f(v):
    return float(v) if np.isfinite(v) else float("nan")


def _exp(v):
    return float(np.exp(v)) if np.isfinite(v) else None
