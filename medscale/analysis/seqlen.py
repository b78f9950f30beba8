"""Sequence length as a variable of the law: per-length laws, a joint law L(N, D, l) chosen by held-out error,
and the recommendation of (N, D, encoder length) at a compute budget with intervals (docs/longseq.md,
"Sequence length as a variable").

The law. For encoder length l (one of the lengths the runs were trained at):

    L(N, D, l) = E_l + A_l / N^alpha_l + B_l / D^beta_l

with N non-embedding parameters, D tokens seen (encoder + decoder) and L the **length-independent evaluation**
(``fixed_loss``: the same held-out examples and decoder targets at every length; ``train.fixed_eval_enc_len``).
Which parameters depend on l is the *form*:

- ``pooled``: one law for every length (the length ignored; what a fit of the runs without l gives);
- ``E(l)``: E per length; A, B, alpha, beta shared (the length moves the floor only);
- ``E,B(l)``: E and B per length; A, alpha, beta shared (the length also changes what a token is worth);
- ``separate``: all five per length (independent per-length laws).

Each form is fitted with Approach 3's objective (Huber, delta 1e-3, on log-loss residuals, summed; log-sum-exp
in log A, log B, log E; alpha, beta in [0, 10]): on a grid of (alpha, beta) the law is linear in E, A, B, solved
by non-negative least squares on relative residuals; the best grid points are polished by scipy on
the exact Jacobian (trust-region reflective, ``least_squares`` with its Huber loss). ``separate`` is fitted length by length (its objective is a sum over lengths). The
form is chosen by **held-out error**: each form is refitted without the top budget of every length and scored by
the mean |log(predicted / observed)| of the held-out runs (ties to the form with fewer parameters); the chosen
form is then fitted on every run.

At a budget C, each length's law meets the compute axis through the project's accounting at that length
(``allocation.ladder_family(enc_len=l)``: a longer encoder costs more FLOPs per token), so N_opt(l), D_opt(l)
and the loss at the optimum are compared **at equal compute**; the recommended length is the one of lowest
predicted loss. Intervals: the form refitted on bootstrap draws that resample runs within each (length, budget)
cell; each draw gives its own best length, so the report states the fraction of draws that pick each length and
the interval of each length's loss difference to the recommended one (paired within draws). The law cannot
interpolate between the measured lengths (E_l is free per length): the candidates are the lengths trained.

numpy + scipy, no JAX.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medscale import rundir
from medscale.analysis.allocation import N_SEARCH_MIN, ladder_family, n_opt_encdec
from medscale.analysis.approach3 import _huber
from medscale.analysis.plots import save_figure
from medscale.errors import UserError
from medscale.sweep.registry import load_sweep

PARAMS = ("a", "b", "e", "alpha", "beta")  # log A, log B, log E, alpha, beta
FORMS = {
    "pooled": (),
    "E(l)": ("e",),
    "E,B(l)": ("e", "b"),
    "separate": PARAMS,
}
FORM_TEXT = {
    "pooled": "one law for every length (A, B, E, alpha, beta shared)",
    "E(l)": "E per length; A, B, alpha, beta shared",
    "E,B(l)": "E and B per length; A, alpha, beta shared",
    "separate": "every parameter per length (independent per-length laws)",
}
DELTA = 1e-3
LOSS_COLUMNS = ("fixed_loss", "loss")
CI_LEVEL = 0.95


# ------------------------------------------------------------------------------------------------ data
def points_from_runs(runs, loss_column: str | None = None):
    """(points DataFrame with params, tokens, flops, loss, enc_len, dec_len, budget, run_id; the loss column
    used). Only finished runs. ``loss_column`` None: ``fixed_loss`` when every finished run has it, else a
    UserError (a length study needs the length-independent evaluation; pass ``loss`` to fit each run's own
    eval loss, which is scored on different tasks at different lengths)."""
    d = runs
    if "status" in d.columns:
        d = d[d["status"].fillna("done") == "done"]
    if loss_column is None:
        if "fixed_loss" not in d.columns or not np.isfinite(d["fixed_loss"].astype(float)).all() or not len(d):
            raise UserError("the runs have no length-independent evaluation (final_fixed_eval_loss): train them "
                            "with train.fixed_eval_enc_len set to the largest encoder length (sweeps/seqlen.py:law)")
        loss_column = "fixed_loss"
    if loss_column not in LOSS_COLUMNS:
        raise UserError(f"loss column must be one of {', '.join(LOSS_COLUMNS)}, not {loss_column!r}")
    cols = ["params", "tokens", "flops", loss_column, "enc_len", "dec_len"]
    missing = [c for c in cols if c not in d.columns]
    if missing:
        raise UserError(f"the runs lack column(s) {', '.join(missing)}")
    out = d[[c for c in ("run_id", "budget", "size") if c in d.columns] + cols].copy()
    out = out.rename(columns={loss_column: "loss"})
    for c in ("params", "tokens", "flops", "loss", "enc_len", "dec_len"):
        out[c] = out[c].astype(float)
    ok = np.ones(len(out), bool)
    for c in ("params", "tokens", "flops", "loss", "enc_len"):
        v = out[c].to_numpy()
        ok &= np.isfinite(v) & (v > 0)
    out = out[ok]
    if "fixed_ref_enc_len" in d.columns and loss_column == "fixed_loss":
        refs = set(d["fixed_ref_enc_len"].astype(float).dropna())
        if len(refs) > 1:
            raise UserError(f"the runs were scored at different reference lengths ({sorted(refs)}): their "
                            "length-independent losses are not on the same targets")
    if out["dec_len"].nunique() > 1:
        raise UserError(f"the runs have decoder lengths {sorted(out['dec_len'].unique())}: the target budget must "
                        "be the same at every encoder length")
    lengths = sorted(int(x) for x in out["enc_len"].unique())
    if len(lengths) < 2:
        raise UserError(f"the runs have one encoder length ({lengths}); a length study needs two or more")
    if "budget" not in out.columns or not np.isfinite(out["budget"].astype(float)).all():
        out["budget"] = 10 ** np.round(np.log10(out["flops"].to_numpy()), 1)  # the IsoFLOP label, from C
    out["budget"] = out["budget"].astype(float)
    for l in lengths:
        n = int((out["enc_len"] == l).sum())
        if n < 3:
            raise UserError(f"encoder length {l} has {n} finished run(s); a law per length needs 3 or more")
    return out.reset_index(drop=True), loss_column


# ------------------------------------------------------------------------------------------------ the law
class Layout:
    """Which entries of the parameter vector each (length, parameter) uses under a form."""

    def __init__(self, form: str, k: int):
        if form not in FORMS:
            raise UserError(f"unknown form {form!r}; one of {', '.join(FORMS)}")
        self.form, self.k = form, int(k)
        self.index = np.zeros((self.k, len(PARAMS)), np.int64)
        n = 0
        for j, name in enumerate(PARAMS):
            if name in FORMS[form]:
                self.index[:, j] = np.arange(n, n + self.k)
                n += self.k
            else:
                self.index[:, j] = n
                n += 1
        self.size = n

    def expand(self, theta) -> np.ndarray:
        """(k, 5) per-length (a, b, e, alpha, beta) from a vector (or (..., size) -> (..., k, 5))."""
        return np.asarray(theta)[..., self.index]

    def pack(self, per_length) -> np.ndarray:
        """A vector from (k, 5) per-length values (shared entries: their mean over lengths)."""
        per_length = np.asarray(per_length, np.float64)
        theta = np.zeros(self.size)
        count = np.zeros(self.size)
        np.add.at(theta, self.index, per_length)
        np.add.at(count, self.index, 1.0)
        return theta / count

    @property
    def bounds(self):
        out = [(None, None)] * self.size
        for j, name in enumerate(PARAMS):
            if name in ("alpha", "beta"):
                for i in set(self.index[:, j].tolist()):
                    out[i] = (0.0, 10.0)
        return out


def _objective(theta, lay, g, lN, lD, lL, w):
    r, w1, w2, w3 = _residuals(theta, lay, g, lN, lD, lL)
    v = w * np.clip(r, -DELTA, DELTA)
    G = np.stack([v * w1, v * w2, v * w3, -v * w1 * lN, -v * w2 * lD], 1)  # (P, 5)
    S = np.zeros((lay.k, 5))
    np.add.at(S, g, G)
    grad = np.zeros(lay.size)
    np.add.at(grad, lay.index, S)
    return float((w * _huber(r, DELTA)).sum()), grad


ALPHA_GRID = np.array([0.02, 0.08, 0.15, 0.25, 0.35, 0.5, 0.7, 1.0, 1.5, 2.2, 3.0])


def _grid_starts(lay, g, lN, lD, lL, w, keep: int = 2) -> np.ndarray:
    """Starts for the polish: on a grid of shared (alpha, beta), the law is linear in (E_l, A, B_l), solved by
    non-negative least squares on relative residuals (rows weighted by sqrt(w) / L, ~ the log residual); the
    ``keep`` grid points of lowest Huber objective, as parameter vectors."""
    # scipy is imported only when a law is fitted (fast CLI start-up)
    from scipy.optimize import nnls

    k = lay.k
    onehot = np.eye(k)[g]
    L = np.exp(lL)
    rw = np.sqrt(w) / L
    e_cols = onehot if "e" in FORMS[lay.form] else np.ones((len(g), 1))
    b_per = "b" in FORMS[lay.form]
    a_per = "a" in FORMS[lay.form]
    found = []
    for alpha in ALPHA_GRID:
        na = np.exp(-alpha * lN)
        a_cols = onehot * na[:, None] if a_per else na[:, None]
        for beta in ALPHA_GRID:
            db = np.exp(-beta * lD)
            b_cols = onehot * db[:, None] if b_per else db[:, None]
            X = np.concatenate([e_cols, a_cols, b_cols], 1)
            coef, _ = nnls(X * rw[:, None], L * rw)
            coef = np.maximum(coef, 1e-8)
            ne, na_ = e_cols.shape[1], a_cols.shape[1]
            E, A, B = coef[:ne], coef[ne:ne + na_], coef[ne + na_:]
            per = np.zeros((k, 5))
            per[:, 0] = np.log(np.broadcast_to(A, (k,)) if len(A) == k else np.full(k, A[0]))
            per[:, 1] = np.log(B if len(B) == k else np.full(k, B[0]))
            per[:, 2] = np.log(E if len(E) == k else np.full(k, E[0]))
            per[:, 3], per[:, 4] = alpha, beta
            theta = lay.pack(per)
            found.append((float((w * _huber(np.log(X @ coef) - lL, DELTA)).sum()), theta))
    found.sort(key=lambda x: x[0])
    return np.asarray([t for _, t in found[:keep]])


def _residuals(theta, lay, g, lN, lD, lL):
    p = lay.expand(theta)[g]
    t1 = p[:, 0] - p[:, 3] * lN
    t2 = p[:, 1] - p[:, 4] * lD
    t3 = p[:, 2]
    m = np.maximum(np.maximum(t1, t2), t3)
    e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    s = e1 + e2 + e3
    return m + np.log(s) - lL, e1 / s, e2 / s, e3 / s


def _minimize(theta0s, lay, g, lN, lD, lL, w, maxiter: int = 2000, tol: float = 1e-14):
    """The Huber objective (weights ``w``) minimised from each start; the best result (``x``, ``fun``).

    scipy's ``least_squares`` with ``loss="huber"`` and ``f_scale=delta`` minimises exactly
    sum_i w_i Huber_delta(r_i) when the residuals are scaled by sqrt(w_i) (its rho is delta^2 x the Huber of
    r / delta, halved: 0.5 r^2 inside, delta (|r| - delta / 2) outside). Trust-region reflective with the exact
    Jacobian and alpha, beta in [0, 10] (no BLAS-threaded quasi-Newton: it is slow on a loaded machine)."""
    # scipy is imported only when a law is fitted (fast CLI start-up)
    from scipy.optimize import least_squares

    sw = np.sqrt(np.asarray(w, np.float64))
    rows = np.arange(len(g))
    cols = lay.index[g]  # (P, 5): the theta entry each point's (a, b, e, alpha, beta) is
    lo = np.array([-np.inf if b[0] is None else b[0] for b in lay.bounds])
    hi = np.array([np.inf if b[1] is None else b[1] for b in lay.bounds])

    def fun(th):
        return sw * _residuals(th, lay, g, lN, lD, lL)[0]

    def jac(th):
        _, w1, w2, w3 = _residuals(th, lay, g, lN, lD, lL)
        J = np.zeros((len(g), lay.size))
        for j, col in enumerate((w1, w2, w3, -w1 * lN, -w2 * lD)):
            np.add.at(J, (rows, cols[:, j]), sw * col)
        return J

    best = None
    for th0 in theta0s:
        th0 = np.clip(np.asarray(th0, np.float64), lo, hi)
        try:
            res = least_squares(fun, th0, jac=jac, bounds=(lo, hi), method="trf", loss="huber", f_scale=DELTA,
                                x_scale="jac", ftol=tol, xtol=tol, gtol=tol, max_nfev=maxiter)
        except (ValueError, np.linalg.LinAlgError):
            continue
        res.fun = _objective(res.x, lay, g, lN, lD, lL, w)[0]
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    return best


class JointFit:
    """A fitted form: per-length parameters, the points it was fitted on, the objective."""

    def __init__(self, form, lengths, theta, objective, points):
        self.form, self.lengths = form, list(lengths)
        self.layout = Layout(form, len(self.lengths))
        self.theta = np.asarray(theta, np.float64)
        self.objective = float(objective)
        self.points = points

    def per_length(self, theta=None) -> np.ndarray:
        return self.layout.expand(self.theta if theta is None else theta)

    def laws(self, theta=None) -> dict:
        """{length: {E, A, B, alpha, beta}}."""
        p = self.per_length(theta)
        return {l: {"E": float(np.exp(p[i, 2])), "A": float(np.exp(p[i, 0])), "B": float(np.exp(p[i, 1])),
                    "alpha": float(p[i, 3]), "beta": float(p[i, 4])} for i, l in enumerate(self.lengths)}

    def predict(self, n, d, enc_len, theta=None) -> np.ndarray:
        p = self.per_length(theta)
        g = np.array([self.lengths.index(int(x)) for x in np.atleast_1d(enc_len)])
        q = p[g]
        n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
        return np.exp(q[:, 2]) + np.exp(q[:, 0]) * n ** -q[:, 3] + np.exp(q[:, 1]) * d ** -q[:, 4]


def _arrays(points, lengths):
    g = np.array([lengths.index(int(x)) for x in points["enc_len"]])
    return (g, np.log(points["params"].to_numpy(float)), np.log(points["tokens"].to_numpy(float)),
            np.log(points["loss"].to_numpy(float)))


def fit_form(points, form: str, lengths=None, weights=None, starts=None) -> JointFit:
    """Fit one form on ``points`` (``points_from_runs``' frame)."""
    lengths = sorted(int(x) for x in points["enc_len"].unique()) if lengths is None else list(lengths)
    lay = Layout(form, len(lengths))
    w = np.ones(len(points)) if weights is None else np.asarray(weights, np.float64)
    if form == "separate" and starts is None:  # the objective is a sum over lengths: one pooled law per length
        per, total = np.zeros((len(lengths), 5)), 0.0
        for i, l in enumerate(lengths):
            sel = (points["enc_len"].astype(int) == l).to_numpy()
            f = fit_form(points[sel], "pooled", [l], w[sel])
            per[i], total = f.per_length()[0], total + f.objective
        return JointFit(form, lengths, lay.pack(per), total, points)
    g, lN, lD, lL = _arrays(points, lengths)
    th0 = _grid_starts(lay, g, lN, lD, lL, w) if starts is None else np.atleast_2d(starts)
    best = _minimize(th0, lay, g, lN, lD, lL, w)
    if best is None:
        raise UserError(f"the {form} law did not fit (no start reached a finite objective)")
    return JointFit(form, lengths, best.x, best.fun, points)


def _top_budget_mask(points) -> np.ndarray:
    """True at the runs of each length's largest budget."""
    top = points.groupby("enc_len")["budget"].transform("max")
    return (points["budget"] >= top).to_numpy()


def select_form(points, forms=tuple(FORMS)) -> dict:
    """Each form refitted without every length's top budget, scored on the held-out runs; the chosen form."""
    lengths = sorted(int(x) for x in points["enc_len"].unique())
    held = _top_budget_mask(points)
    train, test = points[~held], points[held]
    per_len = train.groupby("enc_len").size()
    rows = {}
    for form in forms:
        lay = Layout(form, len(lengths))
        row = {"parameters": lay.size, "text": FORM_TEXT[form]}
        if len(train) <= lay.size or (form != "pooled" and (per_len < 2).any()) or len(per_len) < len(lengths):
            row["error"] = "too few runs below the top budget to fit it"
            rows[form] = row
            continue
        f = fit_form(train, form, lengths)
        pred = f.predict(test["params"], test["tokens"], test["enc_len"])
        err = np.log(pred / test["loss"].to_numpy(float))
        row.update(mean_abs_log_error=float(np.mean(np.abs(err))), max_abs_log_error=float(np.max(np.abs(err))),
                   held_out_runs=len(test), fitted_runs=len(train))
        rows[form] = row
    scored = [(r["mean_abs_log_error"], r["parameters"], f) for f, r in rows.items() if "mean_abs_log_error" in r]
    if not scored:
        raise UserError("no form of the length law could be scored on held-out budgets: each length needs runs at "
                        "two or more budgets below its top one")
    best = min(scored)
    # within 2% (relative) of the best error, the form with fewer parameters
    chosen = min((s for s in scored if s[0] <= best[0] * 1.02), key=lambda s: (s[1], s[0]))[2]
    return {"chosen": chosen, "forms": rows, "rule": "mean |log error| on every length's top budget, fitted "
            "without it; within 2% of the best, the form with fewer parameters"}


def _cells(points) -> list[np.ndarray]:
    key = points["enc_len"].astype(int).astype(str) + "/" + points["budget"].map(lambda b: f"{b:.6g}")
    return [np.flatnonzero(key.to_numpy() == k) for k in sorted(set(key))]


def bootstrap(fit: JointFit, draws: int = 200, seed: int = 0) -> np.ndarray:
    """(draws, size) parameter vectors refitted on resampled runs (with replacement within each (length, budget)
    cell), each started from the full fit."""
    pts = fit.points
    lay = fit.layout
    g, lN, lD, lL = _arrays(pts, fit.lengths)
    rng = np.random.default_rng(seed)
    cells = _cells(pts)
    out = []
    for _ in range(int(draws)):
        w = np.zeros(len(pts))
        for ix in cells:
            np.add.at(w, rng.choice(ix, size=len(ix), replace=True), 1.0)
        best = _minimize([fit.theta], lay, g, lN, lD, lL, w, maxiter=200, tol=1e-9)
        out.append(best.x if best is not None else np.full(lay.size, np.nan))
    arr = np.asarray(out)
    return arr[np.isfinite(arr).all(1)]


# ------------------------------------------------------------------------------------------------ decisions
def _interval(values, level=CI_LEVEL):
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return None
    q = 100 * (1 - level) / 2
    return [float(np.percentile(v, q)), float(np.percentile(v, 100 - q))]


def allocate(per_length, lengths, dec_len, flops):
    """N_opt, D_opt, loss at ``flops`` per length: arrays (..., k) from per-length params (..., k, 5)."""
    p = np.asarray(per_length, np.float64)
    n_out, d_out, l_out = (np.empty(p.shape[:-1]) for _ in range(3))
    for i, l in enumerate(lengths):
        fam = ladder_family("non_embedding", int(l), int(dec_len))
        q = p[..., i, :]
        E, A, B, al, be = np.exp(q[..., 2]), np.exp(q[..., 0]), np.exp(q[..., 1]), q[..., 3], q[..., 4]
        n, d = n_opt_encdec(E, A, B, al, be, flops, fam)
        n, d = np.reshape(n, E.shape), np.reshape(d, E.shape)
        n_out[..., i], d_out[..., i] = n, d
        with np.errstate(over="ignore", under="ignore"):
            l_out[..., i] = E + A * n ** -al + B * d ** -be
    return n_out, d_out, l_out


def _log_params(laws: dict, lengths) -> np.ndarray:
    """(k, 5) (log A, log B, log E, alpha, beta); a coefficient fitted to 0 (E underflowing when the runs do
    not pin it down) gives -inf, i.e. the term is absent."""
    with np.errstate(divide="ignore"):
        return np.array([[np.log(laws[l]["A"]), np.log(laws[l]["B"]), np.log(laws[l]["E"]), laws[l]["alpha"],
                          laws[l]["beta"]] for l in lengths], np.float64)


def recommend(laws: dict, flops: float, dec_len: int, draws=None, level: float = CI_LEVEL) -> dict:
    """The (N, D, encoder length) recommendation at ``flops`` from per-length laws ``{l: {E, A, B, alpha,
    beta}}`` and optional bootstrap draws ``[{l: {...}}, ...]`` (or an array (S, k, 5) of (a, b, e, alpha,
    beta)). Every length at equal compute, the best one, and how often each length is best across draws."""
    lengths = sorted(int(l) for l in laws)
    point = _log_params(laws, lengths)
    n, d, loss = allocate(point, lengths, dec_len, flops)
    best = int(np.argmin(loss))
    S = None
    if draws is not None and len(draws):
        arr = np.asarray(draws, np.float64)
        Sn, Sd, Sl = allocate(arr, lengths, dec_len, flops)
        S = (Sn, Sd, Sl)
        picks = np.argmin(Sl, axis=1)
    rows = []
    for i, l in enumerate(lengths):
        row = {"enc_len": l, "n_opt": {"value": float(n[i])}, "d_opt": {"value": float(d[i])},
               "loss": {"value": float(loss[i])}, "examples": float(d[i] / (l + dec_len)),
               "delta_loss_vs_best": {"value": float(loss[i] - loss[best])},
               "n_opt_at_search_floor": bool(n[i] <= N_SEARCH_MIN * 1.01)}
        if S is not None:
            row["n_opt"]["ci"] = _interval(S[0][:, i], level)
            row["d_opt"]["ci"] = _interval(S[1][:, i], level)
            row["loss"]["ci"] = _interval(S[2][:, i], level)
            row["delta_loss_vs_best"]["ci"] = _interval(S[2][:, i] - S[2][:, best], level)
            row["p_best"] = float(np.mean(picks == i))
        rows.append(row)
    out = {"flops": float(flops), "dec_len": int(dec_len), "enc_len_opt": lengths[best], "by_length": rows,
           "n_opt": rows[best]["n_opt"], "d_opt": rows[best]["d_opt"], "loss": rows[best]["loss"],
           "ci_level": level, "draws": 0 if S is None else len(S[0]),
           "accounting": "C = D x flops_per_token(N) along the ladder family at each encoder length "
                         f"(Ld={int(dec_len)}); D = encoder + decoder tokens"}
    if S is not None:
        out["p_best"] = {str(l): rows[i]["p_best"] for i, l in enumerate(lengths)}
    return out


# ------------------------------------------------------------------------------------------------ study
def study(runs, flops: float, bootstrap_draws: int = 200, seed: int = 0, loss_column: str | None = None,
          source: str | None = None) -> dict:
    """Per-length laws, the form chosen by held-out error, its fit on every run with bootstrap draws, and the
    recommendation at ``flops``. Returns a JSON-able dict; ``law_file(result)`` is what ``medscale budget --law``
    reads."""
    points, col = points_from_runs(runs, loss_column)
    lengths = sorted(int(x) for x in points["enc_len"].unique())
    dec_len = int(points["dec_len"].iloc[0])
    selection = select_form(points)
    form = selection["chosen"]
    fit = fit_form(points, form, lengths)
    per_len = fit_form(points, "separate", lengths)
    pooled = fit_form(points, "pooled", lengths)
    in_sample = {}
    for name, f in (("chosen", fit), ("separate", per_len), ("pooled", pooled)):
        res = np.log(points["loss"].to_numpy(float) / f.predict(points["params"], points["tokens"],
                                                                 points["enc_len"]))
        in_sample[name] = {"rms_log_residual": float(np.sqrt(np.mean(res ** 2))),
                           "by_length": {str(l): float(np.mean(res[points["enc_len"].to_numpy() == l]))
                                         for l in lengths}}
    draws = bootstrap(fit, bootstrap_draws, seed) if bootstrap_draws else np.zeros((0, fit.layout.size))
    per_draw = fit.per_length(draws) if len(draws) else None
    laws = fit.laws()
    ci = {}
    if per_draw is not None:
        for i, l in enumerate(lengths):
            q = per_draw[:, i, :]
            ci[str(l)] = {"E": _interval(np.exp(q[:, 2])), "A": _interval(np.exp(q[:, 0])),
                          "B": _interval(np.exp(q[:, 1])), "alpha": _interval(q[:, 3]),
                          "beta": _interval(q[:, 4])}
    rec = recommend(laws, flops, dec_len, per_draw)
    top = max(float(b) for b in points["budget"].unique())
    in_range = recommend(laws, top, dec_len, per_draw)  # the same comparison where the runs are
    for row in in_range["by_length"]:
        at = points[(points["enc_len"] == row["enc_len"]) & (points["budget"] == top)]
        row["observed_best"] = float(at["loss"].min()) if len(at) else None
    rec["extrapolation"] = {"largest_budget": top, "factor": float(flops / top),
                            "decades": float(np.log10(flops / top))}
    observed = []
    for _, r in points.sort_values(["enc_len", "budget", "params"]).iterrows():
        observed.append({k: (float(r[k]) if k not in ("run_id", "size") else str(r[k]))
                         for k in ("run_id", "size", "enc_len", "budget", "params", "tokens", "flops", "loss")
                         if k in points.columns})
    return {
        "source": source, "loss_column": col, "lengths": lengths, "dec_len": dec_len, "n_runs": len(points),
        "budgets": sorted(float(b) for b in points["budget"].unique()),
        "form": form, "form_text": FORM_TEXT[form], "selection": selection,
        "laws": {str(l): v for l, v in laws.items()}, "laws_ci": ci,
        "per_length_laws": {str(l): v for l, v in per_len.laws().items()},
        "pooled_law": pooled.laws()[lengths[0]],
        "in_sample": in_sample,
        "bootstrap": {"draws": len(draws), "requested": int(bootstrap_draws), "seed": int(seed),
                      "resampling": "runs within each (encoder length, budget) cell"},
        "draws": [] if per_draw is None else per_draw.tolist(),
        "recommendation": rec,
        "at_largest_budget": in_range,
        "observed": observed,
    }


def law_file(result: dict) -> dict:
    """The JSON ``medscale budget --law FILE`` reads: ``law`` (the recommended length's law, so any reader of
    a fit file gets a law) and ``seqlen`` (every length's law and the bootstrap draws)."""
    best = str(result["recommendation"]["enc_len_opt"])
    law = {"form": "chinchilla", "name": f"seqlen law at Le={best}", "n_convention": "non_embedding",
           **result["laws"][best]}
    keep = ("source", "loss_column", "lengths", "dec_len", "form", "form_text", "laws", "laws_ci", "draws",
            "bootstrap", "selection")
    return {"law": law, "seqlen": {k: result[k] for k in keep}}


def load_law_file(path: str) -> dict | None:
    """The ``seqlen`` object of a law file, or None when the file is a plain law (or a published law's name)."""
    if not path.endswith(".json") and "/" not in path:
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # load_law reports the file's problem
    sl = data.get("seqlen") if isinstance(data, dict) else None
    if sl is None:
        return None
    try:
        laws = {int(l): {k: float(v[k]) for k in ("E", "A", "B", "alpha", "beta")} for l, v in sl["laws"].items()}
        dec_len = int(sl["dec_len"])
        draws = np.asarray(sl.get("draws") or [], np.float64)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"law file {path}: bad 'seqlen' object ({exc}); write it with medscale report --seqlen") \
            from None
    if len(draws) and draws.shape[1:] != (len(laws), len(PARAMS)):
        raise UserError(f"law file {path}: 'seqlen.draws' has shape {draws.shape}, expected (S, {len(laws)}, 5)")
    return {"laws": laws, "dec_len": dec_len, "draws": draws if len(draws) else None, "form": sl.get("form"),
            "loss_column": sl.get("loss_column")}


def budget_seqlen(path: str, flops: float) -> dict | None:
    """``medscale budget --law FILE``'s length recommendation at ``flops`` (None for a law without lengths)."""
    sl = load_law_file(path)
    if sl is None:
        return None
    rec = recommend(sl["laws"], flops, sl["dec_len"], sl["draws"])
    rec["form"], rec["loss_column"] = sl["form"], sl["loss_column"]
    return rec


# ------------------------------------------------------------------------------------------------ report
def figure(result: dict, out_dir: str, budget_flops: float) -> list[str]:
    """``seqlen_law.png``/``.svg``: left, the fitted law's optimal loss vs compute per encoder length (equal
    compute) with the runs' length-independent losses; right, at the budget, each length's predicted loss with
    its interval and the share of bootstrap draws that pick it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, dec_len = result["lengths"], result["dec_len"]
    point = _log_params({int(l): v for l, v in result["laws"].items()}, lengths)
    draws = np.asarray(result.get("draws") or [], np.float64)
    obs = result["observed"]
    cmin = min(o["flops"] for o in obs) / 2
    cs = np.geomspace(cmin, max(budget_flops, cmin * 10) * 2, 40)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, l in enumerate(lengths):
        col = colors[i % len(colors)]
        curve = np.array([allocate(point, lengths, dec_len, c)[2][i] for c in cs])
        ax.plot(cs, curve, color=col, label=f"Le = {l}: law at its optimum")
        if len(draws):
            sub = draws[:: max(1, len(draws) // 60)]
            band = np.array([allocate(sub, lengths, dec_len, c)[2][:, i] for c in cs])
            lo, hi = np.percentile(band, 5, axis=1), np.percentile(band, 95, axis=1)
            ax.fill_between(cs, lo, hi, color=col, alpha=0.15, lw=0)
        pts = [o for o in obs if int(o["enc_len"]) == l]
        ax.scatter([o["flops"] for o in pts], [o["loss"] for o in pts], color=col, s=18, edgecolor="k", lw=0.4,
                   zorder=3)
    ax.axvline(budget_flops, color="0.4", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (model FLOPs, project accounting at each length)")
    ax.set_ylabel(f"loss ({result['loss_column']})")
    ax.set_title(f"equal compute by encoder length (form {result['form']}; 90% band)", fontsize=9)
    ax.legend(fontsize=7)
    rec = result["recommendation"]
    xs = np.arange(len(lengths))
    vals = [r["loss"]["value"] for r in rec["by_length"]]
    errs = np.array([[r["loss"]["value"] - (r["loss"].get("ci") or [r["loss"]["value"]] * 2)[0],
                      (r["loss"].get("ci") or [r["loss"]["value"]] * 2)[1] - r["loss"]["value"]]
                     for r in rec["by_length"]]).T
    bx.errorbar(xs, vals, yerr=errs, fmt="o", color="k", capsize=4)
    for x, r in zip(xs, rec["by_length"]):
        if "p_best" in r:
            bx.annotate(f"best in {100 * r['p_best']:.0f}%", (x, r["loss"]["value"]), textcoords="offset points",
                        xytext=(8, 0), fontsize=8)
    bx.set_xticks(xs, [str(l) for l in lengths])
    bx.set_xlabel("encoder length")
    bx.set_ylabel("predicted loss at the optimum")
    bx.set_title(f"at the budget C = {budget_flops:.3g} FLOPs ({round(100 * rec['ci_level'])}% intervals)",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, "seqlen_law")


def report_section(seqlen_dir: str, flops: float, out_dir: str, bootstrap_draws: int = 200, seed: int = 0,
                   figures: bool = True, progress=None) -> dict:
    """The report's sequence-length section for the runs under ``seqlen_dir``: the study at the report's budget,
    ``seqlen_law.json`` (for ``medscale budget --law``) in ``out_dir`` and the figure."""
    step = progress or (lambda msg: None)
    if not os.path.isdir(seqlen_dir):
        raise UserError(f"--seqlen {seqlen_dir} is not a results folder")
    runs = load_sweep(seqlen_dir)
    step(f"sequence length: fitting the length law on {seqlen_dir} ({bootstrap_draws} bootstrap draws)")
    result = study(runs, flops, bootstrap_draws=bootstrap_draws, seed=seed, source=seqlen_dir)
    law_path = os.path.join(out_dir, "seqlen_law.json")
    rundir.write_text(law_path, json.dumps(law_file(result), indent=1) + "\n")
    result["law_file"] = os.path.relpath(law_path, out_dir)
    result["figures"] = []
    if figures:
        paths = figure(result, os.path.join(out_dir, "figures"), flops)
        result["figures"] = [os.path.relpath(p, out_dir) for p in paths]
    return result


def _f(x, digits=3):
    if x is None:
        return "–"
    return f"{x:.{digits}g}"


def _ci(d, digits=3):
    s = _f(d["value"], digits)
    return s + (f" [{_f(d['ci'][0], digits)}, {_f(d['ci'][1], digits)}]" if d.get("ci") else "")


def markdown(r: dict, report_dir_arg: str | None = None) -> list[str]:
    """report.md's "Sequence length" section from ``report_section``'s dict."""
    rec = r["recommendation"]
    level = round(100 * rec["ci_level"])
    L = ["## Sequence length\n"]
    L.append(f"From the length study `{r['source']}`: {r['n_runs']} runs at encoder lengths "
             f"{', '.join(map(str, r['lengths']))} (decoder length {r['dec_len']}), budgets "
             f"{', '.join(_f(b) for b in r['budgets'])} FLOPs. Loss: `{r['loss_column']}`"
             + (" — the length-independent evaluation (the same held-out examples and decoder targets at every "
                "length, inputs refitted to each run's encoder; docs/longseq.md), not the eval loss of the law "
                "above." if r["loss_column"] == "fixed_loss" else " — each run's own eval loss: lengths are scored "
                "on different tasks.") + "\n")
    L.append(f"Law: L(N, D, l) = E_l + A_l / N^alpha_l + B_l / D^beta_l, form **{r['form']}** ({r['form_text']}), "
             f"chosen by held-out error ({r['selection']['rule']}):\n")
    L.append("| form | parameters | held-out mean abs log error | max | runs fitted / held out |\n|---|---|---|---|---|")
    for name, row in r["selection"]["forms"].items():
        if "error" in row:
            L.append(f"| {name} | {row['parameters']} | not scored: {row['error']} | | |")
        else:
            L.append(f"| {name}{' (chosen)' if name == r['form'] else ''} | {row['parameters']} | "
                     f"{row['mean_abs_log_error']:.4f} | {row['max_abs_log_error']:.4f} | "
                     f"{row['fitted_runs']} / {row['held_out_runs']} |")
    L.append("")
    L.append(f"Fitted on every run ({r['bootstrap']['draws']} bootstrap refits resampling {r['bootstrap']['resampling']}; "
             f"{level}% intervals):\n")
    L.append("| Le | E | A | B | alpha | beta | per-length law alone: E, alpha, beta | pooled-law mean log residual |"
             "\n|---|---|---|---|---|---|---|---|")
    for l in map(str, r["lengths"]):
        law, ci, sep = r["laws"][l], r["laws_ci"].get(l) or {}, r["per_length_laws"][l]

        def cell(k, law=law, ci=ci):
            return _f(law[k]) + (f" [{_f(ci[k][0])}, {_f(ci[k][1])}]" if ci.get(k) else "")
        L.append(f"| {l} | {cell('E')} | {cell('A')} | {cell('B')} | {cell('alpha')} | {cell('beta')} | "
                 f"{_f(sep['E'])}, {_f(sep['alpha'])}, {_f(sep['beta'])} | "
                 f"{r['in_sample']['pooled']['by_length'][l]:+.3f} |")
    L.append(f"\nIn-sample RMS log residual: chosen form {r['in_sample']['chosen']['rms_log_residual']:.4f}, "
             f"per-length laws {r['in_sample']['separate']['rms_log_residual']:.4f}, one pooled law "
             f"{r['in_sample']['pooled']['rms_log_residual']:.4f}.\n")
    L.append(f"**At the budget ({_f(rec['flops'])} FLOPs), equal compute** ({rec['accounting']}):\n")
    L.append("| Le | N_opt | D_opt (tokens) | examples | predicted loss | loss − best | best in |\n"
             "|---|---|---|---|---|---|---|")
    for row in rec["by_length"]:
        mark = " **(recommended)**" if row["enc_len"] == rec["enc_len_opt"] else ""
        L.append(f"| {row['enc_len']}{mark} | {_ci(row['n_opt'])}{' (search floor)' if row['n_opt_at_search_floor'] else ''} | "
                 f"{_ci(row['d_opt'])} | {_f(row['examples'])} | {_ci(row['loss'], 4)} | "
                 f"{_ci(row['delta_loss_vs_best'], 3)} | "
                 f"{'–' if 'p_best' not in row else '%.0f%% of draws' % (100 * row['p_best'])} |")
    best = next(x for x in rec["by_length"] if x["enc_len"] == rec["enc_len_opt"])
    others = [x for x in rec["by_length"] if x is not best and x["delta_loss_vs_best"].get("ci")]
    sure = [x["enc_len"] for x in others if x["delta_loss_vs_best"]["ci"][0] > 0]
    unsure = [x["enc_len"] for x in others if x["delta_loss_vs_best"]["ci"][0] <= 0]
    L.append("")
    L.append(f"Recommended encoder length: **{rec['enc_len_opt']}** with N_opt {_ci(rec['n_opt'])}, D_opt "
             f"{_ci(rec['d_opt'])} tokens, predicted loss {_ci(rec['loss'], 4)}"
             + (f"; its loss is below that of length(s) {', '.join(map(str, sure))} over the whole {level}% "
                "interval of the paired difference (same bootstrap draw)" if sure else "")
             + (f"; length(s) {', '.join(map(str, unsure))} are not distinguishable from it (their paired "
                "difference interval includes 0)" if unsure else "")
             + ". The candidates are the lengths trained (E_l is free per length: the law does not interpolate "
             "between them). " + (f"`medscale budget --law {r['law_file']} ...` gives this at any budget."
                                  if r.get("law_file") else "") + "\n")
    ex = rec.get("extrapolation")
    if ex:
        L.append(f"The budget is {ex['decades']:.1f} decades beyond the study's largest budget "
                 f"({_f(ex['largest_budget'])} FLOPs): the ranking above is the laws' extrapolation. Where the runs "
                 "are, at that largest budget (equal compute, the same law):\n")
        at = r.get("at_largest_budget") or {}
        L.append("| Le | N_opt | predicted loss at the optimum | best observed loss (sizes trained) |\n"
                 "|---|---|---|---|")
        for row in at.get("by_length", []):
            L.append(f"| {row['enc_len']} | {_ci(row['n_opt'])} | {_ci(row['loss'], 4)} | "
                     f"{_f(row.get('observed_best'), 4)} |")
        L.append("")
    floor = [x["enc_len"] for x in rec["by_length"] if x["n_opt_at_search_floor"]]
    if floor:
        L.append(f"> **Size not identified** at length(s) {', '.join(map(str, floor))}: N_opt is the floor of the "
                 "allocation search (the fitted law gives model size no weight there); the length comparison is "
                 "then a comparison of token-limited losses.\n")
    for p in r.get("figures") or []:
        if p.endswith(".png"):
            L.append(f"![seqlen_law]({p})\n")
    return L
