"""Data-constrained scaling: a finite set of unique tokens bounds the allocation (``medscale budget
--unique-tokens``), and the repetition constants are measured from a repetition sweep (``medscale fit
--repetition``).

Effective data and parameters (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models",
arXiv:2305.16264, Sec. 3, Eqs. 5-7): with U_D unique tokens and D tokens trained on,

    D' = D                                                  when D <= U_D
    D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D)),  R_D = D / U_D - 1      otherwise

(repeated tokens are worth less and less: D' never exceeds U_D (1 + R*_D)); and with U_N = min(N, N_opt(U_D)),
the law's compute-optimal size for U_D tokens (the size that U_D tokens train compute-optimally),

    N' = U_N + U_N R*_N (1 - exp(-R_N / R*_N)),  R_N = N / U_N - 1

(parameters beyond what the unique data can use are worth less too). The loss is the law's at (N', D'):
L = E + A / N'^alpha + B / D'^beta for the Chinchilla form (any law of ``medscale.laws`` is evaluated at N', D').
Published constants (ibid., fitted on their runs): R*_D = 15.387, R*_N = 5.309.

Allocation at a fixed budget C = 6 N D: minimise L(N', D') over N (D = C / (6 N)) on a log grid refined twice
around its minimum. When the unconstrained optimum D_opt(C) fits in the unique data (D_opt <= U_D) it is
returned exactly: there L(N', D') = L(N, D) (no repetition; N_opt(C) <= N_opt(U_D) since N_opt grows with C),
and L(N', D') >= L(N, D) everywhere (N' <= N, D' <= D), so no other allocation can beat it.

numpy only (``medscale budget`` stays fast); the fit imports scipy when it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from medscale.errors import UserError

# Muennighoff et al. 2023, arXiv:2305.16264, Sec. 3 (Eq. 5 and Eq. 6 fitted on their 400+ runs)
PUBLISHED_R_D = 15.387
PUBLISHED_R_N = 5.309
CITATION = "Muennighoff et al. 2023, arXiv:2305.16264"
EPOCH_WARNING = 4.0  # up to ~4 epochs repeated data is nearly as good as fresh (ibid., Sec. 4)
DOUBLING_GAIN = 0.01  # "more compute no longer helps": loss falls by less than 1% per doubling of compute


@dataclasses.dataclass(frozen=True)
class Constants:
    """R*_D and R*_N with where they came from."""

    r_d: float = PUBLISHED_R_D
    r_n: float = PUBLISHED_R_N
    source: str = CITATION

    def to_dict(self) -> dict:
        return {"r_star_d": self.r_d, "r_star_n": self.r_n, "source": self.source}


def load_constants(path: str | None) -> Constants:
    """The published constants (``path`` None), or a JSON file with ``r_star_d`` (and optionally ``r_star_n``)
    at its top level or under ``"repetition"`` (what ``medscale fit --repetition --out FILE`` writes). A missing
    ``r_star_n`` keeps the published value."""
    if path is None:
        return Constants()
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"--repetition-constants {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--repetition-constants {path}: not JSON ({exc}); write it with "
                        "medscale fit RESULTS --repetition --out FILE") from None
    if isinstance(data, dict) and isinstance(data.get("repetition"), dict):
        data = data["repetition"]
    if not isinstance(data, dict) or "r_star_d" not in data:
        raise UserError(f"--repetition-constants {path}: needs a number 'r_star_d' (and optionally 'r_star_n'), "
                        "as medscale fit RESULTS --repetition --out FILE writes")
    out = []
    for key, default in (("r_star_d", None), ("r_star_n", PUBLISHED_R_N)):
        value = data.get(key, default)
        if value is None and key == "r_star_n":
            value = PUBLISHED_R_N
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"--repetition-constants {path}: {key} must be a number, not {value!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--repetition-constants {path}: {key} must be a positive finite number, not {value}")
        out.append(value)
    return Constants(out[0], out[1], f"file {path}")


def effective_data(d, u_d, r_d):
    """D' of D tokens drawn from U_D unique ones (the module docstring)."""
    d, u_d = np.asarray(d, np.float64), np.asarray(u_d, np.float64)
    rep = np.maximum(d / u_d - 1.0, 0.0)
    return np.where(d > u_d, u_d + u_d * r_d * -np.expm1(-rep / r_d), d)


def effective_params(n, u_n, r_n):
    """N' of N parameters when U_N of them are what the unique data can use."""
    n, u_n = np.asarray(n, np.float64), np.asarray(u_n, np.float64)
    rep = np.maximum(n / u_n - 1.0, 0.0)
    return np.where(n > u_n, u_n + u_n * r_n * -np.expm1(-rep / r_n), n)


def params_for_tokens(law, u_d):
    """The law's compute-optimal N for U_D tokens: N_opt(C) at the C where D_opt(C) = U_D (both are power laws
    of C in every form of ``medscale.laws``, D_opt proportional to C^b)."""
    c0 = 1e21
    c = c0 * (np.asarray(u_d, np.float64) / float(law.d_opt(c0))) ** (1.0 / law.b)
    return np.asarray(law.n_opt(c), np.float64)


def constrained_loss(law, n, d, u_d, const: Constants = Constants()):
    """L(N', D'): the law's loss at the effective size and data of N parameters trained on D tokens from U_D."""
    n = np.asarray(n, np.float64)
    u_n = np.minimum(n, params_for_tokens(law, u_d))
    return np.asarray(law.loss(effective_params(n, u_n, const.r_n), effective_data(d, u_d, const.r_d)))


def _argmin_n(law, flops, u_d, const: Constants, grid: int = 2001, decades: float = 6.0):
    """(log N, loss) of the data-constrained optimum at each compute in ``flops`` (1-D array), by a log grid of
    +-``decades`` around the unconstrained N_opt refined twice around its minimum."""
    flops = np.asarray(flops, np.float64)[:, None]
    centre = np.log(np.asarray(law.n_opt(flops), np.float64))
    span = decades * math.log(10.0)
    offsets = np.linspace(-span, span, grid)
    ln = centre + offsets[None, :]
    step = offsets[1] - offsets[0]
    for _ in range(3):
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            L = constrained_loss(law, np.exp(ln), flops / (6.0 * np.exp(ln)), u_d, const)
        L = np.where(np.isfinite(L), L, np.inf)
        k = np.argmin(L, axis=1)
        best = np.take_along_axis(ln, k[:, None], 1)
        loss = np.take_along_axis(L, k[:, None], 1)[:, 0]
        ln = best + np.linspace(-2 * step, 2 * step, 401)[None, :]
        step = 4 * step / 400
    return best[:, 0], loss


def optimum(law, flops: float, u_d: float, const: Constants = Constants()) -> dict:
    """The loss-minimising (N, D) at compute ``flops`` (C = 6 N D) with ``u_d`` unique tokens."""
    flops, u_d = float(flops), float(u_d)
    n_free, d_free = float(law.n_opt(flops)), float(law.d_opt(flops))
    loss_free = float(law.loss(n_free, d_free))
    if d_free <= u_d:  # exact: see the module docstring
        n, d, loss = n_free, d_free, loss_free
    else:
        ln, L = _argmin_n(law, [flops], u_d, const)
        n = float(np.exp(ln[0]))
        d, loss = flops / (6.0 * n), float(L[0])
    u_n = min(n, float(params_for_tokens(law, u_d)))
    return {"n_params_opt": n, "tokens_opt": d, "epochs": d / u_d, "predicted_loss": loss,
            "effective_tokens": float(effective_data(d, u_d, const.r_d)),
            "effective_params": float(effective_params(n, u_n, const.r_n)),
            "params_data_can_use": float(params_for_tokens(law, u_d)),
            "unconstrained": {"n_params_opt": n_free, "tokens_opt": d_free, "predicted_loss": loss_free,
                              "epochs": d_free / u_d},
            "loss_lost_to_repetition": loss - loss_free,
            "constrained": d_free > u_d}


def best_loss(law, flops, u_d, const: Constants = Constants()):
    """The data-constrained optimum's loss at each compute of ``flops`` (array)."""
    flops = np.atleast_1d(np.asarray(flops, np.float64))
    out = np.asarray(law.loss(law.n_opt(flops), law.d_opt(flops)), np.float64)
    over = np.asarray(law.d_opt(flops)) > u_d
    if over.any():
        out = out.copy()
        out[over] = _argmin_n(law, flops[over], u_d, const)[1]
    return out


def diminishing_budget(law, flops: float, u_d: float | None, const: Constants = Constants(),
                       gain: float = DOUBLING_GAIN) -> float:
    """The compute beyond which doubling it lowers the best loss by less than ``gain`` (relative): the smallest C
    such that 1 - L*(2C') / L*(C') < gain for every C' >= C on a quarter-doubling grid from 2^-40 to 2^80 times
    ``flops``, refined by bisection. ``u_d`` None: unlimited data (the law's own optimum)."""
    u = np.inf if u_d is None else float(u_d)

    def fall(c):
        c = np.asarray(c, np.float64)
        a, b = best_loss(law, c, u, const), best_loss(law, 2 * c, u, const)
        return 1.0 - b / a

    grid = float(flops) * 2.0 ** np.arange(-40, 80.01, 0.25)
    f = fall(grid)
    above = np.nonzero(f >= gain)[0]
    if len(above) == 0:
        return float(grid[0])
    k = above[-1]
    if k == len(grid) - 1:
        return float("inf")
    lo, hi = math.log(grid[k]), math.log(grid[k + 1])
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if fall([math.exp(mid)])[0] >= gain:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def plan(law, flops: float, u_d: float, const: Constants = Constants()) -> dict:
    """The data-constrained allocation with its warnings and the compute beyond which more stops helping."""
    u_d = float(u_d)
    if not (math.isfinite(u_d) and u_d > 0):
        raise UserError(f"--unique-tokens must be a positive number, got {u_d:g}")
    out = optimum(law, flops, u_d, const)
    out["unique_tokens"] = u_d
    out["constants"] = const.to_dict()
    limit = diminishing_budget(law, flops, u_d, const)
    out["diminishing_flops"] = limit
    out["diminishing_flops_unlimited"] = diminishing_budget(law, flops, None, const)
    warnings = []
    if out["epochs"] > EPOCH_WARNING:
        warnings.append(f"the optimum repeats the unique data {out['epochs']:.1f} times; beyond ~{EPOCH_WARNING:g} "
                        f"epochs repeated tokens are worth less than fresh ones ({CITATION}): predicted loss "
                        f"{out['predicted_loss']:.4f} against {out['unconstrained']['predicted_loss']:.4f} with "
                        "unlimited data")
    if float(flops) > limit:
        warnings.append(f"more compute no longer helps: beyond {limit:.3g} FLOPs each doubling lowers the loss by "
                        f"less than {DOUBLING_GAIN:.0%} with {u_d:.3g} unique tokens (the budget is "
                        f"{float(flops):.3g}); more unique data would")
    out["warnings"] = warnings
    return out
