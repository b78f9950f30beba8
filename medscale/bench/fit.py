"""``medscale bench fit``: the vectorised Approach 3 fit against a plain scipy loop on the same data and starts.

Timings are wall-clock seconds in this process (``time.perf_counter``) plus CPU seconds (``time.process_time``,
less sensitive to other jobs on a shared machine); the ratio of the two fits' times is the figure to quote.
When the scipy loop runs on a subset of the starts (``scipy_starts``), its full-grid time is extrapolated
linearly and said to be so.
"""

from __future__ import annotations

import os
import time

import numpy as np

from medscale.analysis import approach3, inputs
from medscale.errors import UserError

PUBLISHED = os.path.join("..", "shared", "data", "chinchilla_epoch_extracted.csv")


def default_data() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.normpath(os.path.join(repo, PUBLISHED))


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def bench(path=None, columns=None, scipy_starts=450, bootstrap=1000, seed=0, progress=None,
          scipy_options="default") -> dict:
    path = path or default_data()
    if not os.path.exists(path):
        raise UserError(f"benchmark data {path} not found; give --data FILE (a table of params, tokens, loss)")
    import pandas as pd

    cols = dict(columns or {})
    if not cols and path.lower().endswith(".csv"):
        head = pd.read_csv(path, nrows=1).columns
        if "Model Size" in head and "params" not in head:   # the published Chinchilla points
            cols = {"params": "Model Size", "flops": "Training FLOP"}
    points, _, _ = inputs.read_table(path, cols)
    n, d, loss = (points[c].to_numpy(np.float64) for c in ("params", "tokens", "loss"))
    grid = approach3.start_grid()
    S = len(grid)
    k = int(min(max(scipy_starts, 1), S))
    sub = grid[np.unique(np.linspace(0, S - 1, k).round().astype(int))]
    out = {"data": os.path.abspath(path), "n_points": len(n), "n_starts": S, "scipy_starts": len(sub)}

    full, w, c = _timed(lambda: approach3.fit(n, d, loss))
    out["vectorised"] = {"starts": S, "wall_s": w, "cpu_s": c, "objective": full.objective,
                         "converged": full.converged, "starts_converged": full.starts_converged,
                         "starts_diverged": full.starts_diverged, "starts_unfinished": full.starts_unfinished,
                         "law": approach3.theta_to_law(full.theta)}
    same, w2, c2 = _timed(lambda: approach3.fit(n, d, loss, starts=sub))
    out["vectorised_same_starts"] = {"starts": len(sub), "wall_s": w2, "cpu_s": c2, "objective": same.objective,
                                     "converged": same.converged}
    if scipy_options not in ("default", "tight"):
        raise UserError("scipy options: default or tight")
    opts = {} if scipy_options == "default" else approach3.TIGHT
    (th, obj, ok, _), w3, c3 = _timed(lambda: approach3.reference_fit(n, d, loss, sub, progress=progress,
                                                                      options=opts))
    best = int(np.argmin(obj))
    scale = S / len(sub)
    out["scipy"] = {"starts": len(sub), "options": scipy_options, "options_used": opts, "wall_s": w3, "cpu_s": c3, "objective": float(obj[best]),
                    "success_fraction": float(ok.mean()), "law": approach3.theta_to_law(th[best]),
                    "full_grid_wall_s": w3 * scale, "full_grid_cpu_s": c3 * scale,
                    "full_grid_extrapolated": len(sub) < S}
    out["speedup_wall"] = w3 * scale / out["vectorised"]["wall_s"]
    out["speedup_cpu"] = c3 * scale / out["vectorised"]["cpu_s"]
    out["objective_rel_diff_same_starts"] = abs(same.objective - obj[best]) / obj[best]
    out["objective_rel_diff_full_vs_scipy"] = (full.objective - obj[best]) / obj[best]
    if bootstrap:
        _, w4, c4 = _timed(lambda: approach3.bootstrap(n, d, loss, full, bootstrap, seed=seed))
        out["bootstrap"] = {"draws": bootstrap, "wall_s": w4, "cpu_s": c4}
    return out
