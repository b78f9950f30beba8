"""The learning-rate rule from a tuning sweep: the best peak rate per width, and a power law through them.

A tuning sweep (``sweeps/lr_tune.py``) trains each width at several peak rates on the same tokens. Per width,
the final eval loss against log(rate) is fitted by a parabola through the best rate and its two neighbours (the
grid's edge is reported as such, not extrapolated); the rule is ``lr(d) = lr_ref * (d_ref / d) ** exponent``,
a least-squares line through (log d, log best rate).
"""

from __future__ import annotations

import math

import numpy as np

from medscale.errors import UserError
from medscale.sweep.design import shape_of
from medscale.sweep.registry import load_sweep


def best_rate(rates, losses) -> dict:
    """``{"lr", "loss", "edge"}``: the vertex of the parabola through the lowest loss and its neighbours in
    log(rate); ``edge`` is True (and ``lr`` the grid's best) when the lowest loss is at the grid's end or the
    three points do not curve upwards."""
    order = np.argsort(rates)
    x = np.log(np.asarray(rates, float)[order])
    y = np.asarray(losses, float)[order]
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        return {"lr": float(math.exp(x[i])), "loss": float(y[i]), "edge": True}
    c2, c1, c0 = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    if c2 <= 0:
        return {"lr": float(math.exp(x[i])), "loss": float(y[i]), "edge": True}
    v = -c1 / (2 * c2)
    return {"lr": float(math.exp(v)), "loss": float(c0 + c1 * v + c2 * v * v), "edge": False}


def fit_rule(widths, best_lrs, d_ref: int = 64) -> dict:
    """``{"lr_ref", "d_ref", "exponent"}`` of ``lr(d) = lr_ref * (d_ref / d) ** exponent`` through the best rates
    (least squares in log-log)."""
    if len(widths) < 2:
        raise UserError("the learning-rate rule needs best rates at two widths or more")
    slope, icpt = np.polyfit(np.log(np.asarray(widths, float)), np.log(np.asarray(best_lrs, float)), 1)
    return {"lr_ref": float(math.exp(icpt + slope * math.log(d_ref))), "d_ref": int(d_ref),
            "exponent": float(-slope)}


def rule_from_sweep(path: str, d_ref: int = 64) -> dict:
    """The rule from a finished tuning sweep's folder: ``{"widths": {d_model: best_rate(...)}, "rows": [...],
    **fit_rule(...)}`` (widths whose best rate sits at the grid's edge are kept and flagged)."""
    df = load_sweep(path)
    df = df[df["status"] == "done"]
    if df.empty:
        raise UserError(f"{path}: no finished runs to fit a learning-rate rule to")
    rows, widths = [], {}
    for size, group in df.groupby("size"):
        d = shape_of(str(size))["d_model"]
        widths[d] = best_rate(group["lr"].to_numpy(), group["loss"].to_numpy())
        rows += [{"size": str(size), "d_model": d, "lr": float(r.lr), "loss": float(r.loss)}
                 for r in group.sort_values("lr").itertuples()]
    ds = sorted(widths)
    return {"widths": {d: widths[d] for d in ds}, "rows": rows,
            **fit_rule(ds, [widths[d]["lr"] for d in ds], d_ref=d_ref)}
