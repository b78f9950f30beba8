"""How the fitted allocation moves with the counting conventions (``medscale fit``'s ``conventions`` table).

Two choices that are conventions, not physics, change the fitted exponents and N_opt:

- the parameter count N (``allocation.N_CONVENTIONS``): ``non_embedding`` (the registry's ``params``),
  ``total`` (``params_total``: embeddings and heads too) or ``with_heads`` (non-embedding + output heads,
  ``params`` + ``params_heads``). At small sizes the embeddings and heads are a large, slowly growing share
  of the total, so counting them flattens N's growth with compute and lowers a (Pearce & Song 2024;
  Porian et al. 2024 explain the Kaplan/Chinchilla discrepancy this way);
- the compute C: ``6ND`` (C = 6 N D with the convention's N, the closed form of ``laws.ChinchillaLaw``) or
  ``accounted`` (the project's encoder-decoder model FLOPs, the registry's ``flops``: C = D x
  flops_per_token(N) along the ladder family, ``allocation.n_opt_encdec``).

For each parameter convention Approach 3 is refitted with N counted that way (warm-started at the main fit's
optimum plus a coarse grid). A row per (parameter, compute) convention gives a and b (under 6ND the law's
exponents; under the accounting the local slopes d log N_opt / d log C and d log D_opt / d log C at the
budget, by central differences over +-0.05 decades), N_opt and D_opt at the budget, and Approach 2's parabola
exponents with N counted that way (the budget groups are IsoFLOP in accounted FLOPs, so only the accounted
rows have them).
"""

from __future__ import annotations

import math

import numpy as np

from medscale.analysis import allocation, approach3, isoflop
from medscale.errors import UserError

COARSE = {"alphas": [0.25, 0.5, 1.0], "betas": [0.25, 0.5, 1.0], "es": [-1.0, 0.0, 1.0], "as_": [0.0, 5.0, 10.0],
              "bs": [0.0, 5.0, 10.0]}
STEP_DEX = 0.05


def n_column(points, n_convention: str):
    """The parameter counts of the runs under a convention (array), or (None, reason)."""
    if n_convention == "non_embedding":
        return points["params"].to_numpy(np.float64), None
    need = {"total": ("params_total",), "with_heads": ("params_heads",)}[n_convention]
    for col in need:
        if col not in points.columns or not np.isfinite(points[col].to_numpy(np.float64)).all():
            return None, f"the runs do not all record {col}"
    if n_convention == "total":
        return points["params_total"].to_numpy(np.float64), None
    return points["params"].to_numpy(np.float64) + points["params_heads"].to_numpy(np.float64), None


def _fit(n, d, loss, warm=None, delta=approach3.DELTA):
    starts = approach3.start_grid(**COARSE)
    if warm is not None:
        starts = np.concatenate([np.asarray(warm, np.float64)[None], starts])
    return approach3.fit(n, d, loss, starts=starts, delta=delta)


def _accounted(f, C, fam):
    """N_opt, D_opt at C and the local exponents under C = D flops_per_token(N)."""
    nd = [allocation.n_opt_encdec(f.E, f.A, f.B, f.alpha, f.beta, C * 10 ** s, fam)
          for s in (-STEP_DEX, 0.0, STEP_DEX)]
    n = [float(np.ravel(x[0])[0]) for x in nd]
    d = [float(np.ravel(x[1])[0]) for x in nd]
    a = (math.log10(n[2]) - math.log10(n[0])) / (2 * STEP_DEX)
    b = (math.log10(d[2]) - math.log10(d[0])) / (2 * STEP_DEX)
    return n[1], d[1], a, b


def table(points, budget: float | None = None, enc_len=None, dec_len=None, base_theta=None,
          delta: float = approach3.DELTA, approach2: bool = True) -> list[dict]:
    """The convention table (see the module docstring): one dict per (n_convention, flops_convention)."""
    d = points["tokens"].to_numpy(np.float64)
    loss = points["loss"].to_numpy(np.float64)
    rows = []
    for conv in allocation.N_CONVENTIONS:
        n, why = n_column(points, conv)
        if n is None:
            for fc in ("6ND", "accounted"):
                rows.append({"n_convention": conv, "flops_convention": fc, "available": False, "reason": why})
            continue
        f = _fit(n, d, loss, warm=base_theta, delta=delta)
        law = {"E": f.E, "A": f.A, "B": f.B, "alpha": f.alpha, "beta": f.beta, "converged": f.converged}
        row6 = {"n_convention": conv, "flops_convention": "6ND", "available": True, "a": f.a, "b": f.b, **law,
                "C": budget, "n_opt": None, "d_opt": None, "approach2_a": None, "approach2_b": None}
        if budget is not None:
            G = (f.alpha * f.A / (f.beta * f.B)) ** (1.0 / (f.alpha + f.beta))
            row6["n_opt"] = G * (budget / 6.0) ** f.a
            row6["d_opt"] = (budget / 6.0) ** f.b / G
        rowa = {"n_convention": conv, "flops_convention": "accounted", "available": True, "a": None, "b": None,
                **law, "C": budget, "n_opt": None, "d_opt": None, "approach2_a": None, "approach2_b": None,
                "lengths": {"enc_len": enc_len, "dec_len": dec_len}}
        if budget is not None:
            try:
                fam = allocation.ladder_family(conv, enc_len, dec_len)
                rowa["n_opt"], rowa["d_opt"], rowa["a"], rowa["b"] = _accounted(f, budget, fam)
            except UserError as exc:
                rowa["reason"] = str(exc)
        if approach2:
            p2 = points.copy()
            p2["params"] = n
            try:
                r2 = isoflop.fit(p2)
                rowa["approach2_a"], rowa["approach2_b"] = r2["a"], r2["b"]
            except UserError as exc:
                rowa["approach2_reason"] = str(exc)
        rows += [row6, rowa]
    return rows


def shifts(rows: list[dict]) -> dict:
    """How far each row moves from the (non_embedding, 6ND) row: {"<n>/<flops>": {"a", "n_opt_ratio"}}."""
    ref = next((r for r in rows if r["n_convention"] == "non_embedding" and r["flops_convention"] == "6ND"), None)
    out = {}
    if ref is None:
        return out
    for r in rows:
        if not r.get("available"):
            continue
        key = f"{r['n_convention']}/{r['flops_convention']}"
        out[key] = {"a_minus_reference": None if r.get("a") is None else r["a"] - ref["a"],
                    "n_opt_ratio": (r["n_opt"] / ref["n_opt"]) if r.get("n_opt") and ref.get("n_opt") else None}
    return out
