"""Per-modality laws against the total: does the weighted sum of the modality laws give the total law?

How the total is made (``medscale.model.encdec.EncDec.loss`` and ``train.loop``'s evaluation): the eval loss is
the token-weighted mean of the per-token cross-entropy over all valid decoder targets of the fixed eval set,
so with ``n_m`` the eval set's target tokens of modality m,

    L_total = sum_m w_m L_m,   w_m = n_m / sum_k n_k.

The eval set and its masking are fixed (a fixed masking seed), so the weights are the same for every run
evaluated on the same data configuration (encoder and decoder lengths, modalities); they change with the
lengths (the masking budget) and are not written to the run summaries. ``weights`` recovers them from the
runs themselves by least squares of the total on the modality losses (one configuration at a time); the
residual of that identity (``identity_residual``) shows whether they are indeed fixed (rounding level) or not.

``check`` compares the weighted sum of the per-modality laws with the total law at the budget's optimum and
at every observed run (relative difference sum/total - 1). Thresholds:

- at the observed runs: 2 x the root mean square log residual of the total law. The total law itself misses
  the observed losses by about that much, so two separately fitted descriptions of the same data can differ
  by as much without either being wrong;
- at the budget: the relative half-width of the total law's loss interval there (or, without one, the
  observed threshold). A larger difference means the per-modality view lies outside the stated
  uncertainty of the total prediction: the interval is too narrow, or one of the laws is misspecified.
"""

from __future__ import annotations

import numpy as np


def weights(runs, modalities, enc_len=None, dec_len=None) -> dict | None:
    """``{"weights": {m: w}, "identity_residual", "n_runs", "lengths"}`` from the finished runs at these lengths
    (all lengths when None), or None when there are too few runs (fewer than modalities + 1)."""
    d = runs
    if "status" in d.columns:
        d = d[d["status"] == "done"]
    for col, v in (("enc_len", enc_len), ("dec_len", dec_len)):
        if v is not None and col in d.columns:
            d = d[d[col].astype(float) == float(v)]
    cols = [f"loss/{m}" for m in modalities]
    X = d[cols].to_numpy(np.float64)
    y = d["loss"].to_numpy(np.float64)
    ok = np.isfinite(X).all(1) & np.isfinite(y)
    X, y = X[ok], y[ok]
    if len(y) < len(cols) + 1:
        return None
    w, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = np.abs(X @ w - y) / y
    return {"weights": {m: float(v) for m, v in zip(modalities, w)}, "weights_sum": float(w.sum()),
            "identity_residual": float(resid.max()), "n_runs": len(y),
            "lengths": {"enc_len": enc_len, "dec_len": dec_len}}


def check(total_law, modality_laws: dict, w: dict, n_opt: float, d_opt: float, points,
          loss_ci=None) -> dict:
    """The comparison (see the module docstring). ``points``: the runs (params, tokens, loss) the total law was
    fitted on; ``loss_ci``: the total law's loss interval at (n_opt, d_opt), or None."""
    mods = list(w)
    n = points["params"].to_numpy(np.float64)
    d = points["tokens"].to_numpy(np.float64)
    obs = points["loss"].to_numpy(np.float64)

    def weighted(nn, dd):
        return sum(w[m] * np.asarray(modality_laws[m].loss(nn, dd), np.float64) for m in mods)

    tot_runs = np.asarray(total_law.loss(n, d), np.float64)
    rel_runs = weighted(n, d) / tot_runs - 1.0
    rms_resid = float(np.sqrt(np.mean((np.log(tot_runs) - np.log(obs)) ** 2)))
    thr_runs = 2.0 * rms_resid
    tot_t = float(total_law.loss(n_opt, d_opt))
    rel_t = float(weighted(n_opt, d_opt)) / tot_t - 1.0
    if loss_ci:
        thr_t = max(tot_t - loss_ci[0], loss_ci[1] - tot_t) / tot_t
        thr_src = "half-width of the total law's loss interval at the budget"
    else:
        thr_t = thr_runs
        thr_src = "2 x RMS log residual of the total law (no loss interval at the budget)"
    return {
        "modalities": mods, "weights": w,
        "at_budget": {"n_opt": n_opt, "d_opt": d_opt, "total": tot_t, "weighted_sum": tot_t * (1 + rel_t),
                      "relative_difference": rel_t, "threshold": thr_t, "threshold_source": thr_src,
                      "flagged": bool(abs(rel_t) > thr_t)},
        "at_runs": {"max_abs_relative_difference": float(np.max(np.abs(rel_runs))),
                    "rms_relative_difference": float(np.sqrt(np.mean(rel_runs ** 2))),
                    "threshold": thr_runs, "threshold_source": "2 x RMS log residual of the total law",
                    "flagged": bool(np.max(np.abs(rel_runs)) > thr_runs), "n_runs": len(n)},
    }
