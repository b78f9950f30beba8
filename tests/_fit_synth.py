"""Synthetic scaling data drawn from a known law, for the fit tests (not a test module)."""

import numpy as np
import pandas as pd

from medscale.laws import ChinchillaLaw

# two laws with different exponents and allocation (a = 0.52 and a = 0.38)
LAW_X = ChinchillaLaw("x", E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.37)
LAW_Y = ChinchillaLaw("y", E=2.5, A=1500.0, B=600.0, alpha=0.45, beta=0.28)


def isoflop_design(law, budgets=None, n_sizes=9, span=0.6, noise=0.01, seed=0, offset=0.15, centre_seeds=1,
                   extra=None, seed_ids=False):
    """An IsoFLOP sweep: per budget, n_sizes sizes spread +-span decades around a guess of the optimum that is
    off by up to 10^offset (as a real design is), D = C / (6 N), loss times exp(noise * normal); the middle size
    of each budget is trained with ``centre_seeds`` seeds (run ids end in ``s<seed>`` when ``seed_ids``);
    ``extra(n) -> dict`` adds columns per size."""
    budgets = np.logspace(17, 21, 8) if budgets is None else budgets
    rng = np.random.default_rng(seed)
    rows = []
    for k, c in enumerate(budgets):
        centre = law.n_opt(c) * 10 ** (offset * np.sin(1.7 * k + seed))
        for j, n in enumerate(centre * 10 ** np.linspace(-span, span, n_sizes)):
            for s in range(centre_seeds if j == n_sizes // 2 else 1):
                d = c / (6 * n)
                loss = float(law.loss(n, d)) * np.exp(noise * rng.standard_normal())
                rows.append({"run_id": f"c{k}n{j}" + (f"s{s}" if seed_ids else ""), "params": n, "tokens": d,
                             "flops": c, "budget": c, "loss": loss, **(extra(n) if extra else {})})
    return pd.DataFrame(rows)


def curves(law, sizes, max_flops=1e21, n_points=60, noise=0.002, seed=0):
    """Loss curves of runs at the given sizes, each evaluated along D up to max_flops / (6 N)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(sizes):
        d_end = max_flops / (6 * n)
        for s, d in enumerate(np.geomspace(d_end / 3e3, d_end, n_points)):
            loss = float(law.loss(n, d)) * np.exp(noise * rng.standard_normal())
            rows.append({"run_id": f"r{i}", "step": s, "params": n, "tokens": d, "flops": 6 * n * d, "loss": loss})
    return pd.DataFrame(rows)
