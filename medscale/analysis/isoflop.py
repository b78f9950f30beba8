"""Approach 2 of Hoffmann et al. 2022: IsoFLOP profiles.

Runs are grouped by compute: by their ``budget`` label when the table has one, otherwise by clustering
log10(flops) (a new group starts where sorted log10 C jumps by more than ``bin_dex``). In each group the loss is
a function of x = log N; its minimum is located two ways:

- ``parabola``: least squares L = c0 + c1 x + c2 x^2, minimum at -c1 / (2 c2) (the paper's method). On lopsided
  profiles (the loss rises faster on the small-N side, as the law implies) the parabola's vertex is biased;
  the bias depends on how the sizes sit around the optimum (Besiroglu et al. 2024, Sec. 4; also the
  Open-Athena scaling-law-analysis notes).
- ``spline``: a cubic smoothing spline (scipy ``make_smoothing_spline``, smoothing chosen by GCV on the
  group's data, and kept for its bootstrap draws) minimised on a fine grid; needs >= 5 distinct sizes.

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
    if len(ux) < 5:
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
        ux = np.unique(x)
        lam = None
        if B > 1 and len(ux) >= 5 and len(ux) == len(x):
            lam = _gcv_lam(x[np.argsort(x)], y[np.argsort(x)], np.ones_like(x))
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
    res["_gid"], res["_logc"] = gid, logc
    return res


def bootstrap(points, base: dict, n_boot: int, seed: int = 0) -> dict:
    """Resample runs with replacement within each IsoFLOP group (the design is kept; each group's profile is
    redrawn) and refit both methods: {method: {"a", "b", "k_n", "k_d"}: arrays (B,)}."""
    rng = np.random.default_rng(seed)
    gid = base["_gid"]
    W = np.zeros((n_boot, len(points)))
    for g in range(gid.max() + 1):
        idx = np.flatnonzero(gid == g)
        W[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    mins, _ = _minima(points, gid, W)
    out = {}
    for m in METHODS:
        a, ka = _powerlaw(base["_logc"], mins[m]["logn"])
        b, kb = _powerlaw(base["_logc"], mins[m]["logd"])
        out[m] = {"a": a, "b": b, "k_n": np.exp(ka), "k_d": np.exp(kb)}
    return out


def _f(v):
    return float(v) if np.isfinite(v) else float("nan")


def _exp(v):
    return float(np.exp(v)) if np.isfinite(v) else None
