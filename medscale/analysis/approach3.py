"""Approach 3 of Hoffmann et al. 2022: the parametric law L(N, D) = E + A / N^alpha + B / D^beta.

Objective (the paper's, Sec. 3.3 and App. D.2): with the log-sum-exp parametrisation
``log L_hat = LSE(a - alpha log N, b - beta log D, e)`` (A = e^a, B = e^b, E = e^e), minimise the **sum** over
points of Huber_delta(log L_hat - log L) with delta = 1e-3. (Summing, not averaging: with the mean, L-BFGS
stops at its default tolerance long before the optimum -- Besiroglu et al. 2024, arXiv:2404.10102, Sec. 3.)

Solver. All starts of the grid are optimised at once, in float64 numpy (no JAX, so the float32 default of the
rest of the process is untouched): a batched Levenberg-Marquardt-damped Newton method on the exact gradient and
Hessian, which are closed-form for this objective (the Hessian of the LSE is diag(w) - w w^T in term space, w
the softmax weights). Each start carries its own damping; a step is taken only when it lowers that start's
objective. A start has converged when its scaled gradient is below ``gtol`` or when no step of any damping
lowers its objective any more while the gradient is already small (the minimum is reached to rounding).
The same routine, with a weight per point and per start, refits the bootstrap draws (``fit_weighted``).

``reference_fit`` is the independent slow reference: plain ``scipy.optimize.minimize(method="L-BFGS-B")``
on each start in a Python loop, with its own scalar code for objective and gradient.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from medscale.errors import UserError

DELTA = 1e-3
NAMES = ("a", "b", "e", "alpha", "beta")  # order of the parameter vector theta


def start_grid(alphas=None, betas=None, es=None, as_=None, bs=None) -> np.ndarray:
    """The paper's grid of starts: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
    a, b in {0, 5, ..., 25}: 5 * 5 * 5 * 6 * 6 = 4,500 rows of theta = (a, b, e, alpha, beta)."""
    alphas = np.arange(0, 2.01, 0.5) if alphas is None else alphas
    betas = np.arange(0, 2.01, 0.5) if betas is None else betas
    es = np.arange(-1, 1.01, 0.5) if es is None else es
    as_ = np.arange(0, 25.1, 5) if as_ is None else as_
    bs = np.arange(0, 25.1, 5) if bs is None else bs
    rows = [(a, b, e, al, be) for al, be, e, a, b in itertools.product(alphas, betas, es, as_, bs)]
    return np.asarray(rows, dtype=np.float64)


def theta_to_law(theta) -> dict:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def law_to_theta(E, A, B, alpha, beta) -> np.ndarray:
    return np.array([np.log(A), np.log(B), np.log(E), alpha, beta], dtype=np.float64)


def _huber(r, delta):
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


class _Problem:
    """Data in log space plus the feature matrices the batched Hessian needs (sums over points as matmuls)."""

    def __init__(self, n, d, loss, delta=DELTA):
        self.lN = np.log(np.asarray(n, np.float64))
        self.lD = np.log(np.asarray(d, np.float64))
        self.lL = np.log(np.asarray(loss, np.float64))
        self.delta = float(delta)
        self.irls = False
        lN, lD, one = self.lN, self.lD, np.ones_like(self.lN)
        self.F11 = np.stack([one, lN, lN * lN], 1)
        self.F12 = np.stack([one, lN, lD, lN * lD], 1)
        self.F22 = np.stack([one, lD, lD * lD], 1)
        self.F1 = np.stack([one, lN], 1)
        self.F2 = np.stack([one, lD], 1)

    def _terms(self, th):
        t1 = th[:, 0:1] - th[:, 3:4] * self.lN
        t2 = th[:, 1:2] - th[:, 4:5] * self.lD
        t3 = np.broadcast_to(th[:, 2:3], t1.shape)
        m = np.maximum(np.maximum(t1, t2), t3)
        e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
        s = e1 + e2 + e3
        r = m + np.log(s) - self.lL
        return r, e1 / s, e2 / s, e3 / s

    def objective(self, th, W=None):
        r = self._terms(th)[0]
        h = _huber(r, self.delta)
        return (h if W is None else W * h).sum(1)

    def full(self, th, W=None, block=192):
        """Objective (S,), gradient (S, 5) and Hessian (S, 5, 5) for S parameter vectors at once (computed in
        blocks of starts small enough for the temporaries to stay in cache: ~4x faster than one pass)."""
        if th.shape[0] > block:
            parts = [self.full(th[i:i + block], None if W is None else W[i:i + block], block)
                     for i in range(0, th.shape[0], block)]
            return tuple(np.concatenate(x) for x in zip(*parts))
        r, w1, w2, w3 = self._terms(th)
        dl = self.delta
        inside = np.abs(r) <= dl
        h = np.where(inside, 0.5 * r * r, dl * (np.abs(r) - 0.5 * dl))
        v = np.clip(r, -dl, dl)
        u = inside.astype(np.float64) if not self.irls else np.where(inside, 1.0, dl / np.maximum(np.abs(r), dl))
        if W is not None:
            h, v, u = W * h, W * v, W * u
        f = h.sum(1)
        vw1, vw2 = v * w1, v * w2
        g = np.empty((th.shape[0], 5))
        g[:, 0] = vw1.sum(1)
        g[:, 1] = vw2.sum(1)
        g[:, 2] = (v * w3).sum(1)
        g[:, 3] = -(vw1 @ self.lN)
        g[:, 4] = -(vw2 @ self.lD)
        c = u - v
        s11 = (c * w1 * w1 + vw1) @ self.F11          # [1, lN, lN^2]
        s22 = (c * w2 * w2 + vw2) @ self.F22          # [1, lD, lD^2]
        s12 = (c * w1 * w2) @ self.F12                # [1, lN, lD, lN lD]
        s13 = (c * w1 * w3) @ self.F1                 # [1, lN]
        s23 = (c * w2 * w3) @ self.F2                 # [1, lD]
        s33 = (c * w3 * w3 + v * w3).sum(1)
        H = np.empty((th.shape[0], 5, 5))
        # order a, b, e, alpha, beta; term1 = a - alpha lN, term2 = b - beta lD, term3 = e
        H[:, 0, 0] = s11[:, 0]
        H[:, 0, 1] = s12[:, 0]
        H[:, 0, 2] = s13[:, 0]
        H[:, 0, 3] = -s11[:, 1]
        H[:, 0, 4] = -s12[:, 2]
        H[:, 1, 1] = s22[:, 0]
        H[:, 1, 2] = s23[:, 0]
        H[:, 1, 3] = -s12[:, 1]
        H[:, 1, 4] = -s22[:, 1]
        H[:, 2, 2] = s33
        H[:, 2, 3] = -s13[:, 1]
        H[:, 2, 4] = -s23[:, 1]
        H[:, 3, 3] = s11[:, 2]
        H[:, 3, 4] = s12[:, 3]
        H[:, 4, 4] = s22[:, 2]
        iu = np.triu_indices(5, 1)
        H[:, iu[1], iu[0]] = H[:, iu[0], iu[1]]
        return f, g, H


@dataclasses.dataclass
class BatchResult:
    theta: np.ndarray       # (S, 5) final parameters
    objective: np.ndarray   # (S,)
    grad_norm: np.ndarray   # (S,) max_j |g_j| (1 + |theta_j|) / objective: relative first-order optimality
    status: np.ndarray      # (S,) 0 running at max_iter, 1 converged, 2 diverged (an exponent left +-exp_bound)
    iterations: int
    seconds: float
    work: int = 0           # start-iterations computed (the cost)
    iters: np.ndarray | None = None  # (S,) iterations each start ran

    @property
    def converged(self) -> np.ndarray:
        return self.status == CONVERGED


RUNNING, CONVERGED, DIVERGED = 0, 1, 2


def minimize_batch(n, d, loss, theta0, W=None, delta=DELTA, max_iter=300, gtol=1e-8, ftol=1e-12,
                   window=5, hessian="exact", exp_bound=10.0, threads=None) -> BatchResult:
    """Like :func:`_minimize_batch` (below), with the starts split over ``threads`` threads (default: the CPU
    cores, for 256 starts or more). Starts are independent and numpy's array work releases the GIL, so each
    thread runs the same algorithm on its own rows; the result is row for row what one thread gives."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    theta0 = np.asarray(theta0, dtype=np.float64)
    S = theta0.shape[0]
    if threads is None:
        threads = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                      8) if S >= 256 else 1
    if threads <= 1 or S < 2 * threads:
        return _minimize_batch(n, d, loss, theta0, W, delta, max_iter, gtol, ftol, window, hessian, exp_bound)
    t0 = time.perf_counter()
    parts = np.array_split(np.arange(S), threads)
    Wfull = None if W is None else np.asarray(W, np.float64)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda ix: _minimize_batch(
            n, d, loss, theta0[ix], None if Wfull is None else Wfull[ix], delta, max_iter, gtol, ftol, window,
            hessian, exp_bound), parts))
    cat = lambda name: np.concatenate([getattr(r, name) for r in results])
    return BatchResult(theta=cat("theta"), objective=cat("objective"), grad_norm=cat("grad_norm"),
                       status=cat("status"), iterations=max(r.iterations for r in results),
                       seconds=time.perf_counter() - t0, work=sum(r.work for r in results), iters=cat("iters"))


def _minimize_batch(n, d, loss, theta0, W=None, delta=DELTA, max_iter=300, gtol=1e-8, ftol=1e-12,
                    window=5, hessian="exact", exp_bound=10.0) -> BatchResult:
    """Minimise the summed Huber objective from every row of ``theta0`` at once (see module docstring).

    ``W`` (S, P) or None: per-start weights on the points (bootstrap counts). ``hessian="exact"`` uses the exact
    Hessian (Newton); ``"irls"`` replaces the zero curvature of the Huber loss's linear part by the IRLS weight
    delta/|r| (a positive majoriser, much better in the L1-like regime far from the optimum). A start converges
    when its relative gradient ``grad_norm <= gtol``, or when its objective fell by less than ``ftol`` (relative)
    over the last ``window`` iterations while ``grad_norm <= 1e-3`` (the optimum to rounding: the Huber
    objective's curvature jumps at |r| = delta, which stops the gradient short of zero in floating point).
    A start whose alpha or beta leaves [-exp_bound, exp_bound] is marked diverged (N^-10 < 1e-40 for N > 1e4:
    that term is dead and the start cannot come back). Only starts still running are computed each iteration."""
    t0 = time.perf_counter()
    prob = _Problem(n, d, loss, delta)
    prob.irls = hessian == "irls"
    th = np.array(theta0, dtype=np.float64, copy=True)
    S = th.shape[0]
    Wfull = None if W is None else np.asarray(W, np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        f, g, H = prob.full(th, Wfull)
    lam = np.full(S, 1e-3)
    status = np.full(S, RUNNING)
    status[~np.isfinite(f)] = DIVERGED
    iters = np.zeros(S, int)
    hist = np.repeat(f[:, None], window, 1)   # objective at the last `window` iterations
    eye = np.eye(5)
    it = work = 0
    for it in range(1, max_iter + 1):
        idx = np.flatnonzero(status == RUNNING)
        if idx.size == 0:
            it -= 1
            break
        work += idx.size
        Wi = None if Wfull is None else Wfull[idx]
        fi, gi, Hi, thi, lami = f[idx], g[idx], H[idx], th[idx], lam[idx]
        scale = np.maximum(np.abs(np.diagonal(Hi, axis1=1, axis2=2)).max(1), 1e-300)
        A = Hi + (lami * scale)[:, None, None] * eye
        try:
            step = -np.linalg.solve(A, gi[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack([_safe_solve(A[k], gi[k]) for k in range(len(idx))])
        trial = thi + step
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ft, gt, Ht = prob.full(trial, Wi)
        # a step that does not lower the objective (too long, or uphill where H is indefinite) is rejected
        ok = np.isfinite(ft) & (ft < fi)
        acc = idx[ok]
        th[acc], f[acc], g[acc], H[acc] = trial[ok], ft[ok], gt[ok], Ht[ok]
        lam[acc] = np.maximum(lam[acc] / 4.0, 1e-12)
        lam[idx[~ok]] *= 8.0
        hist[idx, it % window] = f[idx]
        gn = _scaled_grad(g[idx], th[idx], f[idx])
        flat = (hist[idx].max(1) - f[idx]) <= ftol * np.abs(f[idx])
        done = (gn <= gtol) | ((it >= window) & flat & (gn <= 1e-3))
        iters[idx] = it
        bad = ~np.isfinite(th[idx]).all(1) | (np.abs(th[idx, 3:]) > exp_bound).any(1) | (lam[idx] > 1e15)
        status[idx[done]] = CONVERGED
        status[idx[bad & ~done]] = DIVERGED
    return BatchResult(theta=th, objective=f, grad_norm=_scaled_grad(g, th, f), status=status, iterations=it,
                       seconds=time.perf_counter() - t0, work=work, iters=iters)


def _safe_solve(A, b):
    try:
        return -np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        return np.zeros_like(b)


def _scaled_grad(g, th, f):
    """Max over parameters of |g_j| (1 + |theta_j|) / f: a relative first-order optimality measure."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = (np.abs(g) * (1.0 + np.abs(th))).max(1) / np.maximum(np.abs(f), 1e-300)
    return np.where(np.isfinite(out), out, np.inf)


# ---------------------------------------------------------------------------------------------------------
# the independent reference: plain scipy, one start at a time


def reference_objective(theta, lN, lD, lL, delta=DELTA):
    """Scalar objective and gradient of one start (written separately from the batched code)."""
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * lN, b - beta * lD, np.full_like(lN, e)])
    m = t.max(0)
    ex = np.exp(t - m)
    s = ex.sum(0)
    r = m + np.log(s) - lL
    w = ex / s
    hub = np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))
    dh = np.clip(r, -delta, delta)
    grad = np.array([np.sum(dh * w[0]), np.sum(dh * w[1]), np.sum(dh * w[2]),
                     -np.sum(dh * w[0] * lN), -np.sum(dh * w[1] * lD)])
    return float(hub.sum()), grad


TIGHT = {"maxiter": 10_000, "maxfun": 20_000, "ftol": 1e-15, "gtol": 1e-12}


def reference_fit(n, d, loss, starts, delta=DELTA, progress=None, options=None):
    """``scipy.optimize.minimize(L-BFGS-B)`` from each start in turn, analytic gradient. ``options``: scipy's
    L-BFGS-B options; default ``TIGHT`` (ftol 1e-15, gtol 1e-12: the optimum to rounding, for comparisons);
    ``{}`` gives scipy's defaults (ftol 2.2e-9 of max(|f|, 1): on a summed objective of ~1e-3 that is a
    relative 1e-6). Returns (theta (S,5), objective (S,), success (S,), seconds)."""
    from scipy.optimize import minimize

    lN, lD, lL = np.log(n), np.log(d), np.log(loss)
    t0 = time.perf_counter()
    thetas, objs, oks = [], [], []
    for k, x0 in enumerate(starts):
        res = minimize(reference_objective, x0, args=(lN, lD, lL, delta), jac=True, method="L-BFGS-B",
                       options=TIGHT if options is None else options)
        thetas.append(res.x)
        objs.append(res.fun)
        oks.append(bool(res.success))
        if progress is not None:
            progress(k + 1)
    return np.array(thetas), np.array(objs), np.array(oks), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# the fit and its bootstrap


@dataclasses.dataclass
class Approach3Fit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    converged: bool          # the best start, after polishing, met the convergence test
    grad_norm: float         # its relative first-order optimality (see minimize_batch)
    n_points: int
    n_starts: int
    starts_converged: int    # first pass over all starts
    starts_diverged: int
    starts_unfinished: int   # still moving at max_iter
    seconds: float
    optima: list             # distinct local optima found, best first: [{"objective", "theta"}]
    unconstrained: dict | None = None  # the lowest objective when its alpha or beta is not positive (not used)

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def theta(self) -> np.ndarray:
        return law_to_theta(self.E, self.A, self.B, self.alpha, self.beta)


def _distinct(theta, obj, k, rtol=1e-4):
    """Indices of up to k rows with the lowest objective whose parameters differ (relative rtol)."""
    keep = []
    for i in np.argsort(obj):
        if not np.isfinite(obj[i]):
            break
        if all(np.max(np.abs(theta[i] - theta[j]) / (1.0 + np.abs(theta[j]))) > rtol for j in keep):
            keep.append(i)
        if len(keep) >= k:
            break
    return keep


def _admissible(res) -> np.ndarray:
    """Per row of a batch result: a finite objective with alpha, beta > 0."""
    return np.isfinite(res.objective) & (res.theta[:, 3] > 0) & (res.theta[:, 4] > 0)


def fit(n, d, loss, starts=None, delta=DELTA, max_iter=300, polish=32, n_optima=3) -> Approach3Fit:
    """Approach 3 on points (N, D, L): every start of ``starts`` (default the paper's 4,500-start grid) at
    once with a loose stopping test (``max_iter`` iterations at most), then the ``polish`` best distinct
    results again with the strict one (``3 * max_iter`` at most: only these few starts are still computed)."""
    t0 = time.perf_counter()
    n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
    starts = start_grid() if starts is None else np.atleast_2d(np.asarray(starts, np.float64))
    first = minimize_batch(n, d, loss, starts, delta=delta, max_iter=max_iter, gtol=1e-6, ftol=1e-6)
    top = _distinct(first.theta, first.objective, polish, rtol=1e-6)
    if not top:
        raise UserError("approach 3: no start gave a finite objective; check the data (loss, params, tokens)")
    second = minimize_batch(n, d, loss, first.theta[top], delta=delta, max_iter=3 * max_iter)
    # the distinct optima: the polished ones, then other local optima of the first pass (bootstrap starts)
    pool_th = np.concatenate([second.theta, first.theta[first.converged]])
    pool_obj = np.concatenate([second.objective, first.objective[first.converged]])
    pool_ok = np.concatenate([second.converged, first.converged[first.converged]])
    order = _distinct(pool_th, pool_obj, 64, rtol=1e-3)
    # local optima that differ in objective (a degenerate plateau gives many parameter vectors, one objective)
    kept = []
    for i in order:
        if all(abs(pool_obj[i] - pool_obj[j]) > 1e-3 * pool_obj[j] for j in kept):
            kept.append(i)
    order = kept[:n_optima]
    # the law's form needs alpha, beta > 0 (loss falling with N and with D): the best admissible optimum of the
    # polished starts, else of the first pass; the unconstrained best is kept when it is not admissible
    admissible = _admissible(second)
    i = int(np.argmin(np.where(np.isfinite(second.objective), second.objective, np.inf)))
    unconstrained = None if admissible[i] else {"objective": float(second.objective[i]), **theta_to_law(second.theta[i])}
    if not admissible.any():
        ok = first.converged & _admissible(first)
        if ok.any():
            second = minimize_batch(n, d, loss, first.theta[ok][np.argsort(first.objective[ok])[:polish]],
                                    delta=delta, max_iter=3 * max_iter)
            admissible = _admissible(second)
        if not admissible.any():
            raise UserError("approach 3: no fit with positive exponents (alpha, beta > 0) on these runs: the loss "
                            "does not fall with both parameters and tokens; add sizes on both sides of each "
                            "budget's optimum")
    best = int(np.argmin(np.where(admissible, second.objective, np.inf)))
    fbest = second.objective[best]
    order = ([best] + [i for i in order if pool_obj[i] > fbest + 1e-3 * abs(fbest)])[:n_optima]
    law = theta_to_law(second.theta[best])
    counts = np.bincount(first.status, minlength=3)
    return Approach3Fit(
        **law, objective=float(second.objective[best]), converged=bool(second.converged[best]),
        grad_norm=float(second.grad_norm[best]), n_points=len(n), n_starts=len(starts),
        starts_converged=int(counts[CONVERGED]), starts_diverged=int(counts[DIVERGED]),
        starts_unfinished=int(counts[RUNNING]), seconds=time.perf_counter() - t0, unconstrained=unconstrained,
        optima=[{"objective": float(pool_obj[i]), "theta": pool_th[i].tolist(),
                 "converged": bool(pool_ok[i])} for i in order])


def bootstrap(n, d, loss, base: Approach3Fit, n_boot: int, seed: int = 0, groups=None, delta=DELTA,
              max_iter=300, counts=None):
    """Refit ``n_boot`` resamples of the runs (with replacement) at once: each draw's counts become point
    weights, and each draw starts from the distinct optima of the full fit (warm starts; the full grid per
    draw would cost 4,500x more for the same answers), with the IRLS curvature (``3 * max_iter`` iterations at
    most; it converges in fewer iterations along the ridges of resampled data). ``groups``: the run of each point (default: each point
    is one run); ``counts`` (n_boot, P): the draws' weights per point, given (e.g. ``resample.design_counts``:
    the design-keeping resampling ``medscale fit`` uses) instead of drawn here. Returns (theta (B, 5),
    objective (B,), converged (B,))."""
    rng = np.random.default_rng(seed)
    n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
    P = len(n)
    if counts is not None:
        counts = np.asarray(counts, np.float64)
        if counts.shape != (n_boot, P):
            raise ValueError(f"counts must have shape {(n_boot, P)}, not {counts.shape}")
    elif groups is None:
        counts = rng.multinomial(P, np.full(P, 1.0 / P), size=n_boot).astype(np.float64)
    else:
        codes, inv = np.unique(np.asarray(groups), return_inverse=True)
        run_counts = rng.multinomial(len(codes), np.full(len(codes), 1.0 / len(codes)), size=n_boot)
        counts = run_counts[:, inv].astype(np.float64)
    starts = np.array([o["theta"] for o in base.optima], np.float64)
    K = len(starts)
    th0 = np.tile(starts, (n_boot, 1))
    W = np.repeat(counts, K, axis=0)
    res = minimize_batch(n, d, loss, th0, W=W, delta=delta, max_iter=3 * max_iter, hessian="irls")
    obj = np.where(np.isfinite(res.objective), res.objective, np.inf).reshape(n_boot, K)
    pick = obj.argmin(1)
    rows = np.arange(n_boot) * K + pick
    return res.theta[rows], res.objective[rows], res.converged[rows]
