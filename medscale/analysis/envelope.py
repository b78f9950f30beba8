"""Approach 1 of Hoffmann et al. 2022: the lower envelope of training curves.

Each run's curve (loss against cumulative FLOPs, from its eval rows) is interpolated, linearly in log C, onto a
common grid of ``n_grid`` log-spaced FLOP values inside the range it covers. At each grid value C the run with
the lowest loss is the envelope; its parameters are N_opt(C) and its tokens at C are D_opt(C). Grid values
covered by fewer than 2 runs are left out. Then log N_opt = log k_N + a log C and log D_opt = log k_D + b log C
by least squares over grid values.

Caveat (reported): a finite set of sizes makes N_opt a staircase; ``winners`` counts the distinct sizes on the
envelope, and with fewer than 3 the exponent is not meaningful.
"""

from __future__ import annotations

import numpy as np

from medscale.analysis.isoflop import _powerlaw
from medscale.errors import UserError


def _curves_matrix(curves, n_grid):
    key = "run_id" if "run_id" in curves.columns else "params"
    runs, N, rows = [], [], []
    for rid, c in curves.groupby(key, sort=True):
        c = c.sort_values("flops")
        lc = np.log(c["flops"].to_numpy(np.float64))
        if len(lc) < 2 or lc[-1] <= lc[0]:
            continue
        runs.append(rid)
        N.append(float(c["params"].iloc[-1]))
        rows.append((lc, c["loss"].to_numpy(np.float64), np.log(c["tokens"].to_numpy(np.float64))))
    if len(rows) < 2:
        raise UserError("approach 1 needs loss curves (several rows per run: run_id, step, loss, tokens or "
                        "flops) for 2 or more runs; give a results folder or a table with a step column")
    lo = min(r[0][0] for r in rows)
    hi = max(r[0][-1] for r in rows)
    grid = np.linspace(lo, hi, n_grid)
    L = np.full((len(rows), n_grid), np.inf)
    LD = np.full((len(rows), n_grid), np.nan)
    for i, (lc, loss, ld) in enumerate(rows):
        inside = (grid >= lc[0]) & (grid <= lc[-1])
        L[i, inside] = np.interp(grid[inside], lc, loss)
        LD[i, inside] = np.interp(grid[inside], lc, ld)
    return runs, np.array(N), grid, L, LD


def _envelope(N, L, LD, mask):
    """mask (B, R): runs present in each draw. -> log N_opt, log D_opt (B, G), NaN where < 2 runs cover."""
    Lm = np.where(mask[:, :, None], L[None], np.inf)           # (B, R, G)
    cover = np.isfinite(Lm).sum(1)
    win = Lm.argmin(1)                                          # (B, G)
    logn = np.log(N)[win]
    logd = np.take_along_axis(np.broadcast_to(LD[None], Lm.shape), win[:, None, :], 1)[:, 0]
    ok = cover >= 2
    return np.where(ok, logn, np.nan), np.where(ok, logd, np.nan), np.where(ok, win, -1)


def fit(curves, n_grid: int = 40) -> dict:
    runs, N, grid, L, LD = _curves_matrix(curves, n_grid)
    logn, logd, win = _envelope(N, L, LD, np.ones((1, len(runs)), bool))
    a, ka = _powerlaw(grid, logn)
    b, kb = _powerlaw(grid, logd)
    winner_runs = sorted({runs[w] for w in win[0] if w >= 0})
    winners = sorted({float(N[w]) for w in win[0] if w >= 0})  # distinct sizes: seeds of one size count once
    if not np.isfinite(a[0]):
        raise UserError("approach 1: fewer than 2 FLOP values are covered by 2 or more runs' curves")
    ok = win[0] >= 0
    return {"a": float(a[0]), "b": float(b[0]), "k_n": float(np.exp(ka[0])), "k_d": float(np.exp(kb[0])),
            "n_runs": len(runs), "grid_points": int(ok.sum()), "winners": len(winners),
            "winner_runs": len(winner_runs),
            "envelope": [{"C": float(np.exp(g)), "n_opt": float(np.exp(n)), "d_opt": float(np.exp(d)),
                          "run": str(runs[w])}
                         for g, n, d, w in zip(grid[ok], logn[0, ok], logd[0, ok], win[0, ok])],
            "_cache": (N, grid, L, LD)}


def bootstrap(base: dict, n_boot: int, seed: int = 0) -> dict:
    """Resample runs with replacement; a run drawn twice changes no minimum, so a draw is the set of runs
    drawn at least once. -> {"a", "b", "k_n", "k_d"}: arrays (B,)."""
    N, grid, L, LD = base["_cache"]
    rng = np.random.default_rng(seed)
    R = len(N)
    counts = rng.multinomial(R, np.full(R, 1.0 / R), size=n_boot)
    logn, logd, _ = _envelope(N, L, LD, counts > 0)
    a, ka = _powerlaw(grid, logn)
    b, kb = _powerlaw(grid, logd)
    return {"a": a, "b": b, "k_n": np.exp(ka), "k_d": np.exp(kb)}
