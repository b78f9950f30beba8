"""Compute-optimal allocation of a fitted law L(N, D) = E + A/N^alpha + B/D^beta.

- ``6nd``: C = 6 N D, closed form (Hoffmann et al. 2022, Eq. 4 / App. D): N_opt = G (C/6)^a,
  D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta)
  (``laws.ChinchillaLaw``).
- ``encdec``: the project's own accounting (``medscale.accounting``): a model of size N costs
  flops_per_token(N) model FLOPs per encoder+decoder token, so C = D * flops_per_token(N) with D the
  encoder+decoder tokens. flops_per_token(N) comes from the ladder's shape family (depth and width grown together,
  ``configs/ladder.py``) at the given sequence lengths: log flops_per_token is interpolated linearly in log N
  between the ladder sizes (extrapolated with the end slopes). N_opt(C) minimises L(N, C / flops_per_token(N))
  over log N on a fine grid refined around its minimum (vectorised over bootstrap draws).
"""

from __future__ import annotations

import numpy as np

from medscale import accounting
from medscale.errors import UserError

N_CONVENTIONS = ("non_embedding", "total", "with_heads")


def count(counts: dict, n_convention: str) -> float:
    """A parameter count under a convention from ``accounting.param_counts``' dict: ``with_heads`` is the
    non-embedding parameters plus the output heads (the heads are matrices the FLOPs of every token pass
    through, unlike the embedding tables)."""
    if n_convention == "with_heads":
        return float(counts["non_embedding"] + counts["heads"])
    return float(counts[n_convention])


def ladder_family(n_convention: str = "non_embedding", enc_len=None, dec_len=None):
    """(log N, log flops_per_token) of the ladder sizes, N counted under ``n_convention``."""
    if n_convention not in N_CONVENTIONS:
        raise UserError(f"n_convention must be one of {', '.join(N_CONVENTIONS)}, not {n_convention!r}")
    specs = accounting.ladder_specs(enc_len=enc_len, dec_len=dec_len)
    n = np.array([count(accounting.param_counts(s), n_convention) for s in specs], np.float64)
    fpt = np.array([accounting.flops_per_token(s) for s in specs], np.float64)
    order = np.argsort(n)
    return np.log(n[order]), np.log(fpt[order])


def log_flops_per_token(logn, fam):
    """log flops_per_token at log N ``logn`` from the knots ``fam`` = (log N, log flops_per_token): linear between
    them, extrapolated with the end slopes."""
    x, y = fam
    out = np.interp(logn, x, y)
    lo_s = (y[1] - y[0]) / (x[1] - x[0])
    hi_s = (y[-1] - y[-2]) / (x[-1] - x[-2])
    out = np.where(logn < x[0], y[0] + lo_s * (logn - x[0]), out)
    return np.where(logn > x[-1], y[-1] + hi_s * (logn - x[-1]), out)


N_SEARCH_MIN = 1e3  # the smallest N the encoder-decoder allocation searches


def n_opt_encdec(E, A, B, alpha, beta, C, fam, grid=4000):
    """N_opt, D_opt at compute C for laws given as arrays (any shape, broadcast) under C = D flops_per_token(N)."""
    E, A, B, alpha, beta = (np.asarray(v, np.float64)[..., None] for v in (E, A, B, alpha, beta))
    logC = np.log(float(C))
    # search N from 1e3 up to the size that would leave 1 token: flops_per_token(N) <= C
    ln = np.linspace(np.log(N_SEARCH_MIN), logC - 1.0, grid)
    lf = log_flops_per_token(ln, fam)
    ln, lf = ln[lf < logC], lf[lf < logC]
    if len(ln) < 3:
        raise UserError(f"compute {C:g} FLOPs is below one token of the smallest model")
    for _ in range(2):  # coarse grid, then a fine one around each minimum
        logd = logC - lf
        with np.errstate(over="ignore", under="ignore"):
            L = E + A * np.exp(-alpha * ln) + B * np.exp(-beta * logd)
        k = np.argmin(np.where(np.isfinite(L), L, np.inf), axis=-1)
        step = ln[1] - ln[0] if ln.ndim == 1 else None
        centre = ln[k] if ln.ndim == 1 else np.take_along_axis(ln, k[..., None], -1)[..., 0]
        if step is None:
            break
        ln = centre[..., None] + np.linspace(-2 * step, 2 * step, 401)
        lf = log_flops_per_token(ln, fam)
    logd_best = logC - log_flops_per_token(centre, fam)
    return np.exp(centre), np.exp(logd_best)
