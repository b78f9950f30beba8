"""Bootstrap resampling that keeps an IsoFLOP design: budget groups, (budget, size) cells and seed replicates.

A sweep is a set of budget groups (``isoflop.assign_groups``: the ``budget`` column, else FLOPs clustered); in
each group the runs at one model size and token count are one *cell* (several runs when the size was trained
with several seeds). A bootstrap draw is two-stage and stratified:

1. in every budget group, its cells are drawn with replacement (as many draws as the group has cells), so each
   draw keeps the number of budgets and of cells per budget -- the design -- and only redraws which sizes carry
   the profile;
2. every time a cell is drawn, its seed replicates are drawn with replacement (as many as it has), so the seed
   noise of the optimum's loss enters the intervals instead of being averaged away.

The result is a weight per run and draw (how many times the run appears), which the fits take as point
weights. With one run per cell this is the run bootstrap stratified by budget. Runs that are not an IsoFLOP
design (some budget group with a single size) are resampled as one stratum of cells.
"""

from __future__ import annotations

import numpy as np

from medscale.analysis import isoflop


def cells(points, bin_dex: float = 0.1):
    """``(stratum per row, cell per row)``: the budget group of each run and its (group, params) cell, as
    integer codes. When some group has a single cell the runs are not an IsoFLOP design (e.g. a grid of sizes
    and token counts, or every run at its own compute): stratifying would freeze those runs in every draw, so
    all runs form one stratum (``stratified`` below says which)."""
    gid, _, _ = isoflop.assign_groups(points, bin_dex)
    n = points["params"].to_numpy(np.float64)
    # seed replicates share N and D; D in the key keeps apart runs of one size at one budget that differ in
    # something else (e.g. sequence length, which changes the tokens a budget buys)
    ld = np.round(np.log(points["tokens"].to_numpy(np.float64)), 6)
    _, cell = np.unique(np.stack([gid.astype(np.float64), n, ld], 1), axis=0, return_inverse=True)
    gid, cell = np.asarray(gid), np.asarray(cell).ravel()
    if not stratified(gid, cell):
        gid = np.zeros_like(gid)
    return gid, cell


def stratified(gid, cell) -> bool:
    """Whether every budget group has 2 or more cells (then the draws are stratified by group)."""
    return all(len(np.unique(cell[gid == g])) >= 2 for g in np.unique(gid))


def design_counts(points, n_boot: int, seed: int = 0, bin_dex: float = 0.1) -> np.ndarray:
    """``(n_boot, len(points))`` bootstrap counts per run (see the module docstring), from ``seed``."""
    rng = np.random.default_rng(seed)
    gid, cell = cells(points, bin_dex)
    P = len(gid)
    counts = np.zeros((n_boot, P))
    for g in np.unique(gid):
        g_cells = np.unique(cell[gid == g])
        k = len(g_cells)
        cell_draws = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)     # (B, k)
        for j, c in enumerate(g_cells):
            rows = np.flatnonzero(cell == c)
            r = len(rows)
            if r == 1:
                counts[:, rows[0]] = cell_draws[:, j]
            else:  # each drawn copy of the cell redraws its r seeds: r * copies draws among the r runs
                counts[:, rows] = rng.multinomial(cell_draws[:, j] * r, np.full(r, 1.0 / r))
    return counts


def describe(points, bin_dex: float = 0.1) -> dict:
    """What the resampling keeps, for the fit JSON: groups, cells, cells with seed replicates, stratification."""
    groups = isoflop.assign_groups(points, bin_dex)[0]
    gid, cell = cells(points, bin_dex)
    reps = np.bincount(cell)
    strat = len(np.unique(gid)) == len(np.unique(groups))
    return {"budget_groups": len(np.unique(groups)), "cells": len(reps), "stratified_by_budget": strat,
            "cells_with_replicates": int((reps > 1).sum()), "max_replicates": int(reps.max()) if len(reps) else 0,
            "scheme": ("cells (budget, size) drawn with replacement within each budget group" if strat else
                       "cells (budget, size) drawn with replacement from all runs (some budget has one size: "
                       "not an IsoFLOP design)") + ", then each drawn cell's seed replicates drawn with replacement"}


def seed_noise(points, bin_dex: float = 0.1) -> dict | None:
    """The seed noise of log loss from cells with replicates: pooled within-cell standard deviation of log loss
    (``{"sigma_log", "df", "cells"}``), or None when no cell has two runs."""
    _, cell = cells(points, bin_dex)
    y = np.log(points["loss"].to_numpy(np.float64))
    ss, df, used = 0.0, 0, 0
    for c in np.unique(cell):
        v = y[cell == c]
        if len(v) > 1:
            ss += float(((v - v.mean()) ** 2).sum())
            df += len(v) - 1
            used += 1
    if df == 0:
        return None
    return {"sigma_log": float(np.sqrt(ss / df)), "df": int(df), "cells": used}
