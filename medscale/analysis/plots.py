"""Figures of a scaling study, as reusable matplotlib (Agg) functions over the run table and fitted laws.

Inputs are the registry's run table (``medscale.sweep.registry.load_sweep``: one row per run with ``params``
(non-embedding), ``tokens``, ``flops`` (model FLOPs), ``loss``, ``loss/<modality>``, ``enc_len``, ``dec_len``,
``budget`` (IsoFLOP budget or NaN), ``size``, optional ``task/<metric>`` columns or a ``task_metrics`` dict
column), the training curves (``load_curves``: run_id, params, step, tokens, flops, loss) and laws
(:class:`medscale.laws.ChinchillaLaw` or ``KaplanLaw``).

Conventions, stated on every figure that depends on them:
- compute is the run's model FLOPs (``docs/interfaces.md``), with a PF-day axis on top (1 PF-day = 8.64e19 FLOPs);
- the fitted law is L(N, D) with N non-embedding parameters and D tokens seen (encoder + decoder); it meets the
  compute axis through a compute model passed as ``k``: ``KND(k)`` (C = k N D; a bare number means this, default
  k = the median of flops / (N D) over the runs, ``compute_factor``), ``LadderAccounting`` (C = D x
  flops_per_token(N) along the ladder family, the recommendation's model) or ``SweepAccounting`` (the runs' own
  FLOPs per token, then the ladder) — an encoder-decoder's FLOPs per parameter-token is neither 6 nor constant
  (DESIGN.md, accounting);
- published laws are drawn in their own convention (C = 6 N D, Chinchilla/Epoch N all parameters, Kaplan N
  non-embedding) and labelled so.

Each ``plot_*`` returns a Figure; :func:`save_figure` writes it as PNG and SVG atomically. :func:`write_all` writes
every figure the data allows and returns ``{name: [png, svg]}``. Nothing here prints.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from medscale import rundir
from medscale.analysis.allocation import ladder_family, log_flops_per_token, n_opt_encdec
from medscale.analysis.isoflop import assign_groups
from medscale.hardware import PF_DAY
from medscale.laws import PUBLISHED

log = logging.getLogger(__name__)

FIGURES = ("loss_vs_compute", "isoflop", "allocation", "loss_vs_seqlen", "loss_by_modality", "residuals",
           "task_metrics")
PUBLISHED_OVERLAY = ("kaplan2020", "chinchilla", "epoch2024")
_PUB_STYLE = {"kaplan2020": ":", "chinchilla": "--", "epoch2024": "-."}


def _plt():
    import matplotlib

    if "inline" not in matplotlib.get_backend().lower():  # keep a notebook's inline backend
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10,
                         "legend.fontsize": 7.5, "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "medscale"})
    return plt


# ----------------------------------------------------------------------------------------------- helpers


def done_runs(df):
    """Rows usable for fitting/plotting: status done (when a status column exists) with finite loss, N, D, C."""
    out = df
    if "status" in out.columns:
        out = out[out["status"].fillna("done") == "done"]
    for col in ("params", "tokens", "flops", "loss"):
        if col in out.columns:
            out = out[np.isfinite(out[col].astype(float)) & (out[col].astype(float) > 0)]
    return out


def compute_factor(df) -> float:
    """k in C = k N D for this sweep: the median of flops / (params x tokens) over the runs (6 for a decoder LM
    counted the Kaplan way; different for an encoder-decoder whose weights see only their own side's tokens)."""
    d = done_runs(df)
    if len(d) == 0:
        return 6.0
    ratio = d["flops"].astype(float) / (d["params"].astype(float) * d["tokens"].astype(float))
    return float(np.median(ratio))


def law_n_opt(law, c, k: float):
    """N_opt(C) of a Chinchilla-form law for compute counted as C = k N D (the law's own closed form uses 6)."""
    return law.n_opt(6.0 * np.asarray(c, dtype=float) / k)


def law_d_opt(law, c, k: float):
    return law.d_opt(6.0 * np.asarray(c, dtype=float) / k)


def law_frontier(law, c, k):
    """Loss along the compute-optimal allocation: L(N_opt(C), D_opt(C)); ``k`` a factor or a compute model."""
    n, d = as_model(k).optimum(law, c)
    return law.loss(n, d)


class KND:
    """Compute model C = k N D (k = 6 for a decoder-only LM counted the Kaplan way)."""

    def __init__(self, k: float):
        self.k = float(k)
        self.label = f"C = {self.k:.3g} N D"

    def tokens(self, n, c):
        return np.asarray(c, dtype=float) / (self.k * np.asarray(n, dtype=float))

    def optimum(self, law, c):
        return law_n_opt(law, c, self.k), law_d_opt(law, c, self.k)

    def optimum_draws(self, laws, c):
        """(N (B, len(c)), D (B, len(c))) over bootstrap laws."""
        c = np.atleast_1d(np.asarray(c, dtype=float))
        n = np.array([law_n_opt(g, c, self.k) for g in laws])
        return n, c[None, :] / (self.k * n)


class Accounting:
    """Compute model C = D x flops_per_token(N) with log flops_per_token piecewise linear in log N through the
    knots ``fam = (log N, log flops_per_token)`` (extrapolated with the end slopes). N_opt(C) minimises
    L(N, C / flops_per_token(N)) (``medscale.analysis.allocation.n_opt_encdec``)."""

    def __init__(self, fam, label: str):
        self.fam = (np.asarray(fam[0], dtype=float), np.asarray(fam[1], dtype=float))
        self.label = label
        self._n_opt = n_opt_encdec

    def flops_per_token(self, n):
        return np.exp(log_flops_per_token(np.log(np.asarray(n, dtype=float)), self.fam))

    def tokens(self, n, c):
        return np.asarray(c, dtype=float) / self.flops_per_token(n)

    def optimum(self, law, c):
        scalar = np.ndim(c) == 0
        cs = np.atleast_1d(np.asarray(c, dtype=float))
        nd = [self._n_opt(law.E, law.A, law.B, law.alpha, law.beta, ci, self.fam) for ci in cs]
        n = np.array([float(np.ravel(a)[0]) for a, _ in nd])
        d = np.array([float(np.ravel(b)[0]) for _, b in nd])
        return (float(n[0]), float(d[0])) if scalar else (n, d)

    def optimum_draws(self, laws, c):
        cs = np.atleast_1d(np.asarray(c, dtype=float))
        par = [np.array([getattr(g, f) for g in laws]) for f in ("E", "A", "B", "alpha", "beta")]
        cols = [self._n_opt(*par, ci, self.fam) for ci in cs]
        return np.stack([np.ravel(a) for a, _ in cols], 1), np.stack([np.ravel(b) for _, b in cols], 1)


class LadderAccounting(Accounting):
    """The project's accounting along the ladder's shape family at the given sequence lengths — the model of
    ``medscale fit --accounting encdec`` (the recommended run is a ladder size)."""

    def __init__(self, enc_len=None, dec_len=None, n_convention: str = "non_embedding"):
        fam = ladder_family(n_convention, enc_len, dec_len)
        super().__init__(fam, f"C = D x flops_per_token(N) (ladder family, Le={enc_len}, Ld={dec_len})")
        self.enc_len, self.dec_len = enc_len, dec_len


class SweepAccounting(Accounting):
    """The sweep's own FLOPs per token (median over its runs at the given encoder length, per size) up to its
    largest size, continued by the ladder family above it: the law drawn through the data range follows the
    runs' real cost, and beyond it the ladder's (where the recommended run lives)."""

    def __init__(self, runs, enc_len=None, dec_len=None):
        d = done_runs(runs)
        if enc_len is not None and "enc_len" in d.columns:
            d = d[d["enc_len"].astype(float) == float(enc_len)]
        per = (d["flops"].astype(float) / d["tokens"].astype(float)).groupby(d["params"].astype(float)).median()
        x, y = np.log(per.index.to_numpy(dtype=float)), np.log(per.to_numpy(dtype=float))
        lx, ly = ladder_family("non_embedding", enc_len, dec_len)
        keep = lx > (x.max() if len(x) else -np.inf) + 0.1
        fx, fy = np.concatenate([x, lx[keep]]), np.concatenate([y, ly[keep]])
        if len(fx) < 2:
            raise ValueError("too few sizes to tabulate FLOPs per token")
        super().__init__((fx, fy), f"C = D x flops_per_token(N) (the runs' own up to N = {np.exp(x.max()):.3g}, "
                                   f"then the ladder family; Le={enc_len}, Ld={dec_len})")
        self.enc_len, self.dec_len = enc_len, dec_len


def as_model(k, df=None):
    """A compute model from a factor k (C = k N D), a model, or None (k from the runs)."""
    if k is None:
        return KND(compute_factor(df) if df is not None else 6.0)
    if isinstance(k, (int, float, np.floating)):
        return KND(float(k))
    return k


def _quiet_minor(axis):
    from matplotlib.ticker import NullFormatter

    axis.set_minor_formatter(NullFormatter())


def loss_axis(ax, which: str = "y"):
    """A log loss axis labelled with plain numbers (loss spans less than a decade)."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def pf_axis(ax, which: str = "x"):
    """A secondary PF-day axis (top for x, right for y) mirroring a FLOPs log axis."""
    fwd, inv = (lambda v: np.asarray(v) / PF_DAY), (lambda v: np.asarray(v) * PF_DAY)
    if which == "x":
        sec = ax.secondary_xaxis("top", functions=(fwd, inv))
        sec.set_xlabel("compute (PF-days)")
        _quiet_minor(sec.xaxis)
        _quiet_minor(ax.xaxis)
    else:
        sec = ax.secondary_yaxis("right", functions=(fwd, inv))
        sec.set_ylabel("compute (PF-days)")
        _quiet_minor(sec.yaxis)
        _quiet_minor(ax.yaxis)
    return sec


def save_figure(fig, out_dir: str, name: str, formats=("png", "svg")) -> list[str]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format (temp file + rename); close it; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for fmt in formats:
        path = os.path.join(out_dir, f"{name}.{fmt}")
        with rundir.atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    _plt().close(fig)
    return paths


def _size_colors(values):
    plt = _plt()
    uniq = sorted(set(values))
    cmap = plt.get_cmap("viridis")
    return {v: cmap(i / max(1, len(uniq) - 1) * 0.9) for i, v in enumerate(uniq)}


def _c_grid(df, extend_to: float | None = None, n: int = 200):
    d = done_runs(df)
    lo, hi = float(d["flops"].min()), float(d["flops"].max())
    if extend_to is not None and math.isfinite(extend_to):
        hi = max(hi, float(extend_to))
    return np.logspace(math.log10(lo) - 0.2, math.log10(hi) + 0.2, n)


def frontier_points(df, curves=None, y: str = "loss"):
    """The empirical compute-optimal frontier: the lower envelope of loss vs compute (running minimum over compute
    sorted ascending) over training-curve points when given, else over the runs' final points."""
    if curves is not None and len(curves) and y in curves.columns:
        src = curves[np.isfinite(curves[y].astype(float)) & (curves["flops"].astype(float) > 0)]
    else:
        src = done_runs(df)
        src = src[np.isfinite(src[y].astype(float))] if y in src.columns else src.iloc[0:0]
    if len(src) == 0:
        return np.array([]), np.array([])
    c_all, l_all = src["flops"].to_numpy(dtype=float), src[y].to_numpy(dtype=float)
    order = np.lexsort((l_all, c_all))  # by compute, the lowest loss first among equal compute
    c, l_ = c_all[order], l_all[order]
    prior = np.concatenate([[np.inf], np.minimum.accumulate(l_)[:-1]])
    keep = l_ < prior  # strictly better than everything at lower or equal compute
    return c[keep], l_[keep]


def isoflop_groups(df, bin_dex: float = 0.1):
    """``(runs, C per run)``: the finished runs and the IsoFLOP group compute of each, formed as Approach 2 forms
    them (``medscale.analysis.isoflop.assign_groups``: the ``budget`` column when every run has one, else runs
    clustered by compute where log10 C jumps by more than ``bin_dex``)."""
    d = done_runs(df)
    if len(d) == 0:
        return d, np.array([])
    gid, centres, _ = assign_groups(d.reset_index(drop=True), bin_dex)
    return d, np.asarray(centres, dtype=float)[np.asarray(gid)]


def isoflop_minima(df, y: str = "loss"):
    """Per IsoFLOP group (``isoflop_groups``): the minimum of a parabola in log10 N fitted to loss, as rows
    ``(C, n_opt, loss_min, n_points, d_opt)``; groups with fewer than 3 distinct sizes, no curvature or a minimum outside
    the sampled sizes are skipped. For display: the study's numbers come from the fit (Approach 2)."""
    d, groups = isoflop_groups(df)
    rows = []
    for c in np.unique(groups):
        g = d[groups == c]
        g = g[np.isfinite(g[y].astype(float))]
        x = np.log10(g["params"].to_numpy(dtype=float))
        if len(np.unique(x)) < 3:
            continue
        coef = np.polyfit(x, g[y].to_numpy(dtype=float), 2)
        if coef[0] <= 0:
            continue
        xm = -coef[1] / (2 * coef[0])
        if not x.min() <= xm <= x.max():
            continue
        order = np.argsort(x)  # D at the minimum: log D interpolated in log N across the group's runs
        logd = np.interp(xm, x[order], np.log10(g["tokens"].to_numpy(dtype=float))[order])
        rows.append((float(c), float(10**xm), float(np.polyval(coef, xm)), len(g), float(10**logd)))
    return rows


def _legend(ax, **kw):
    handles, _labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**kw)


# ----------------------------------------------------------------------------------------------- figures


def plot_loss_vs_compute(df, law=None, curves=None, k=None, extend_to: float | None = None,
                         y: str = "loss", title: str | None = None, ax=None):
    """Final eval loss of every run vs compute, coloured by model size; training curves (thin) when given; the
    empirical compute-optimal frontier; the fitted law along its optimal allocation."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.2, 3.8))
    d = done_runs(df)
    d = d[np.isfinite(d[y].astype(float))] if y in d.columns else d.iloc[0:0]
    model = as_model(k, df)
    colors = _size_colors(d["params"].astype(float))
    if curves is not None and len(curves) and y in curves.columns:
        for _, g in curves.groupby("run_id"):
            n = float(g["params"].iloc[0])
            ax.plot(g["flops"], g[y], lw=0.6, alpha=0.45, color=colors.get(n, "0.6"))
    for n, g in d.groupby("params"):
        ax.scatter(g["flops"], g[y], s=18, color=colors[float(n)], edgecolor="k", linewidth=0.3, zorder=3,
                   label=f"N = {float(n):.3g}")
    fc, fl = frontier_points(df, curves, y)
    if len(fc):
        ax.step(fc, fl, where="post", color="crimson", lw=1.2, label="empirical frontier")
    if law is not None and len(d):
        cg = _c_grid(df, extend_to)
        ax.plot(cg, law_frontier(law, cg, model), color="k", lw=1.4,
                label=f"fitted law at optimum (E={law.E:.3g}, α={law.alpha:.3g}, β={law.beta:.3g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    loss_axis(ax)
    ax.set_xlabel("compute C (model FLOPs)")
    ax.set_ylabel(f"{'eval' if y == 'loss' else y.split('/', 1)[1] + ' eval'} loss (nats/token)")
    pf_axis(ax)
    ax.set_title(title or "Loss vs compute")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def isoflop_law_curves(df, law, k=None, pad_dex: float = 0.1, n: int = 100):
    """``{C: (N, D, L)}`` per IsoFLOP group (``isoflop_groups``): the fitted law along the group at the tokens its
    runs actually had. Inside the group's sampled sizes log D is interpolated in log N through its runs (each
    run's own D = C_run / its FLOPs per token, so the curve passes through L(N_i, D_i) of every run); beyond them
    (``pad_dex`` each side) D continues from the end run with the slope of the compute model ``k`` (``as_model``,
    e.g. ``SweepAccounting``). The N grid contains every run's N."""
    model = as_model(k, df)
    iso, groups = isoflop_groups(df)
    out = {}
    for b in sorted(np.unique(groups)):
        g = iso[groups == b]
        ln_run = np.log(g["params"].to_numpy(dtype=float))
        ld_run = np.log(g["tokens"].to_numpy(dtype=float))
        xs = np.unique(ln_run)
        ys = np.array([ld_run[ln_run == x].mean() for x in xs])  # repeated sizes (seeds): mean log D
        pad = pad_dex * math.log(10)
        ln = np.union1d(np.linspace(xs[0] - pad, xs[-1] + pad, n), xs)
        ns = np.exp(ln)
        ld = np.interp(ln, xs, ys)
        with np.errstate(all="ignore"):
            lm = np.log(model.tokens(ns, b))  # the compute model's log D at this budget, for the slope outside
            lo, hi = ln < xs[0], ln > xs[-1]
            ld[lo] = ys[0] + lm[lo] - np.log(model.tokens(np.exp(xs[0]), b))
            ld[hi] = ys[-1] + lm[hi] - np.log(model.tokens(np.exp(xs[-1]), b))
        ds = np.exp(ld)
        out[float(b)] = (ns, ds, np.asarray(law.loss(ns, ds), dtype=float))
    return out


def plot_isoflop(df, law=None, k=None, y: str = "loss", minima=None, ax=None):
    """Loss vs parameters per IsoFLOP group, the parabola in log N through each and its minimum; the fitted law
    along each group at the (N, D) its runs had (``isoflop_law_curves``) dashed when given: its gap to the points
    is the law's residual there (``residuals``)."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.2, 3.8))
    model = as_model(k, df)
    iso, groups = isoflop_groups(df)
    budgets = sorted(np.unique(groups))
    colors = _size_colors(budgets)
    mins = {m[0]: (m[1], m[2]) for m in (minima if minima is not None else isoflop_minima(df, y))}
    curves = isoflop_law_curves(df, law, model) if law is not None else {}
    for b in budgets:
        g = iso[groups == b].sort_values("params")
        col = colors[b]
        ax.scatter(g["params"], g[y], s=18, color=col, edgecolor="k", linewidth=0.3, zorder=3,
                   label=f"C = {b:.2g} FLOPs ({b / PF_DAY:.2g} PF-d)")
        x = np.log10(g["params"].to_numpy(dtype=float))
        if len(np.unique(x)) >= 3:
            coef = np.polyfit(x, g[y].to_numpy(dtype=float), 2)
            xs = np.linspace(x.min() - 0.1, x.max() + 0.1, 100)
            ax.plot(10**xs, np.polyval(coef, xs), color=col, lw=1.0)
        if law is not None and b in curves:
            ns, _ds, ls = curves[b]
            ax.plot(ns, ls, color=col, lw=0.9, ls="--", alpha=0.8)
        if b in mins:
            ax.plot([mins[b][0]], [mins[b][1]], marker="*", ms=11, color=col, markeredgecolor="k", zorder=4)
    if len(budgets):
        ax.plot([], [], "k*", ms=9, label="parabola minimum")
        if law is not None:
            ax.plot([], [], "k--", lw=0.9, label="fitted law")
    ax.set_xscale("log")
    ax.set_yscale("log")
    loss_axis(ax)
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("eval loss (nats/token)" if y == "loss" else y)
    ax.set_title("IsoFLOP curves")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def _band(draws, c, model, level: float = 0.95):
    """The central ``level`` interval of N_opt and D_opt over bootstrap laws at each C: ((lo, hi), (lo, hi))."""
    if len(draws) < 2:
        return None
    with np.errstate(all="ignore"):
        n, d = model.optimum_draws(draws, c)
    ok = np.all(np.isfinite(n), 1) & np.all(np.isfinite(d), 1)
    if ok.sum() < 2:
        return None
    q = (1 - level) / 2 * 100
    return tuple((np.percentile(v[ok], q, axis=0), np.percentile(v[ok], 100 - q, axis=0)) for v in (n, d))


def plot_allocation(df, law=None, draws=(), k=None, minima=None, power_laws=None,
                    extend_to: float | None = None, published=PUBLISHED_OVERLAY, budget: float | None = None):
    """Two panels: N_opt vs C and D_opt vs C. IsoFLOP minima (points), the fitted law's allocation under the
    compute model ``k`` (line) with the 95% bootstrap band, power laws of other approaches (``power_laws``:
    {label: (kN, a, kD, b)} meaning N_opt = kN C^a, D_opt = kD C^b), the published laws (their C = 6ND
    convention), and the target budget."""
    plt = _plt()
    fig, (axn, axd) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    model = as_model(k, df)
    cg = _c_grid(df, extend_to if budget is None else max(budget, extend_to or 0), n=60)
    mins = minima if minima is not None else isoflop_minima(df)
    if mins:
        cb = np.array([m[0] for m in mins])
        nb = np.array([m[1] for m in mins])
        axn.scatter(cb, nb, color="C0", edgecolor="k", zorder=4, label="IsoFLOP minima")
        axd.scatter(cb, [m[4] for m in mins], color="C0", edgecolor="k", zorder=4, label="IsoFLOP minima")
    if law is not None:
        n_line, d_line = model.optimum(law, cg)
        band = _band(draws, cg, model)
        for i, (ax, line) in enumerate(((axn, n_line), (axd, d_line))):
            ax.plot(cg, line, color="k", lw=1.5, label="Approach 3 (fitted law)")
            if band is not None:
                ax.fill_between(cg, band[i][0], band[i][1], color="k", alpha=0.15, lw=0,
                                label=f"bootstrap 95% ({len(draws)} draws)")
    for i, (label, (kn, a, kd, b)) in enumerate((power_laws or {}).items()):
        axn.plot(cg, kn * cg**a, color=f"C{i + 1}", lw=1.2, label=label)
        axd.plot(cg, kd * cg**b, color=f"C{i + 1}", lw=1.2, label=label)
    for name in published:
        pub = PUBLISHED[name]
        axn.plot(cg, pub.n_opt(cg), color="0.45", lw=1.0, ls=_PUB_STYLE.get(name, "--"),
                 label=f"{name} (C=6ND)")
        axd.plot(cg, pub.d_opt(cg), color="0.45", lw=1.0, ls=_PUB_STYLE.get(name, "--"),
                 label=f"{name} (C=6ND)")
    for ax, ylabel in ((axn, "N_opt (parameters)"), (axd, "D_opt (tokens)")):
        if budget is not None:
            ax.axvline(budget, color="crimson", lw=0.9, ls=":", label=f"budget {budget:.2g} FLOPs")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(ylabel)
        pf_axis(ax)
    axn.set_title("Compute-optimal parameters")
    axd.set_title("Compute-optimal tokens")
    _legend(axn, loc="upper left")
    fig.tight_layout()
    return fig


def seq_len_column(df) -> str | None:
    """The column naming a run's sequence length: ``seq_len`` if present, else enc_len + dec_len."""
    if "seq_len" in df.columns:
        return "seq_len"
    if "enc_len" in df.columns and "dec_len" in df.columns:
        return "__seq_len"
    return None


def _with_seq_len(df):
    d = done_runs(df).copy()
    if "seq_len" not in d.columns and "enc_len" in d.columns and "dec_len" in d.columns:
        d["seq_len"] = d["enc_len"].astype(float) + d["dec_len"].astype(float)
    return d


def plot_loss_vs_seqlen(df):
    """Left: loss vs sequence length (encoder + decoder tokens per example), one line per model size (runs at the
    same size and token budget), or, when no size was trained on the same tokens at two lengths, each length's
    empirical frontier read at equal compute. Right: loss vs compute coloured by sequence length (what each length costs)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    d = _with_seq_len(df)
    if "seq_len" not in d.columns:
        d["seq_len"] = np.nan
    colors = _size_colors(d["params"].astype(float))
    d["_tok"] = d["tokens"].astype(float).round(-3)
    paired = 0
    for (n, tok), g in d.groupby(["params", "_tok"]):
        if g["seq_len"].nunique() < 2:
            continue
        paired += 1
        g = g.groupby("seq_len", as_index=False)["loss"].min().sort_values("seq_len")
        ax1.plot(g["seq_len"], g["loss"], marker="o", ms=4, color=colors[float(n)],
                 label=f"N = {float(n):.3g}, D = {tok:.2g}")
    if not paired:  # no size trained on the same tokens at two lengths: compare the lengths' frontiers instead
        fronts = {s_: frontier_points(d[d["seq_len"] == s_]) for s_ in sorted(d["seq_len"].dropna().unique())}
        fronts = {s_: f for s_, f in fronts.items() if len(f[0]) >= 2}
        if len(fronts) >= 2:
            lo = max(np.log10(f[0].min()) for f in fronts.values())
            hi = min(np.log10(f[0].max()) for f in fronts.values())
            ccol = _size_colors(list(range(3)))
            for i, lc in enumerate(np.linspace(lo, hi, 3) if hi > lo else []):
                xs = list(fronts)
                ys = [10 ** np.interp(lc, np.log10(fronts[s_][0]), np.log10(fronts[s_][1])) for s_ in xs]
                ax1.plot(xs, ys, marker="o", ms=4, color=ccol[i], label=f"frontier at C = {10 ** lc:.2g} FLOPs")
        ax1.set_title("Loss vs sequence length at equal compute (frontiers)")
    lens = sorted(d["seq_len"].dropna().unique())
    lcol = _size_colors(lens)
    for s in lens:
        g = d[d["seq_len"] == s]
        ax2.scatter(g["flops"], g["loss"], s=18, color=lcol[s], edgecolor="k", linewidth=0.3,
                    label=f"L = {int(s)} tokens")
        fc, fl = frontier_points(g)
        if len(fc) > 1:
            ax2.plot(fc, fl, color=lcol[s], lw=1.0)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(lens, [f"{int(v)}" for v in lens])  # the lengths the runs used
    _quiet_minor(ax1.xaxis)
    ax1.set_xlabel("sequence length (encoder + decoder tokens)")
    ax1.set_ylabel("eval loss (nats/token)")
    if paired:
        ax1.set_title("Loss vs sequence length at equal size and tokens")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    loss_axis(ax2)
    ax2.set_xlabel("compute C (model FLOPs)")
    ax2.set_ylabel("eval loss (nats/token)")
    pf_axis(ax2)
    ax2.set_title("Loss vs compute by sequence length")
    _legend(ax1)
    _legend(ax2)
    fig.tight_layout()
    return fig


def modality_columns(df) -> list[str]:
    """The ``loss/<modality>`` columns with at least one finite value."""
    return [c for c in df.columns if c.startswith("loss/") and np.isfinite(df[c].astype(float)).any()]


def plot_loss_by_modality(df, laws: dict | None = None, k=None, extend_to: float | None = None):
    """One panel per modality: its eval loss vs compute, its frontier and its own fitted law (``laws``:
    {modality: law})."""
    plt = _plt()
    cols = modality_columns(df)
    n = max(1, len(cols))
    ncol = min(n, 2)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol, 3.4 * nrow), squeeze=False)
    for ax, col in zip(axes.flat, cols):
        mod = col.split("/", 1)[1]
        plot_loss_vs_compute(df, law=(laws or {}).get(mod), k=k, extend_to=extend_to, y=col,
                             title=f"{mod} loss vs compute", ax=ax)
        lines = [h for h in ax.get_lines() if not h.get_label().startswith("_")]
        ax.legend(handles=lines, loc="upper right", fontsize=6.5)
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def residuals(df, law):
    """log(observed loss) - log(law(N, D)) per run (the quantity Approach 3's Huber objective sees)."""
    d = done_runs(df)
    pred = law.loss(d["params"].to_numpy(dtype=float), d["tokens"].to_numpy(dtype=float))
    return np.log(d["loss"].to_numpy(dtype=float)) - np.log(pred)


def plot_residuals(df, law, delta: float = 1e-3):
    """Residuals of the fitted law against compute and against N/D (tokens per parameter), with the Huber delta."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.4), sharey=True)
    d = done_runs(df)
    r = residuals(df, law)
    colors = _size_colors(d["params"].astype(float))
    cs = [colors[float(n)] for n in d["params"]]
    ax1.scatter(d["flops"], r, c=cs, s=16, edgecolor="k", linewidth=0.3)
    ax2.scatter(d["tokens"].astype(float) / d["params"].astype(float), r, c=cs, s=16, edgecolor="k", linewidth=0.3)
    rms = float(np.sqrt(np.mean(r**2))) if len(r) else float("nan")
    for ax in (ax1, ax2):
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-delta, delta, color="C1", alpha=0.2, lw=0, label=f"Huber δ = {delta:g}")
        ax.set_xscale("log")
    ax1.set_xlabel("compute C (model FLOPs)")
    ax1.set_ylabel("log L_obs − log L_fit")
    pf_axis(ax1)
    ax2.set_xlabel("tokens per parameter D/N")
    ax1.set_title(f"Residuals of the fitted law (RMS {rms:.3g})")
    ax2.set_title("Residuals vs D/N")
    _legend(ax1, loc="best")
    fig.tight_layout()
    return fig


def task_metric_table(df):
    """A DataFrame of task metrics (columns ``task/<name>``) from ``task/*`` columns or a ``task_metrics`` dict
    column; empty columns when none."""
    import pandas as pd

    d = done_runs(df)
    out = pd.DataFrame(index=d.index)
    for c in d.columns:
        if c.startswith("task/"):
            out[c] = d[c].astype(float)
    if "task_metrics" in d.columns:
        for idx, tm in d["task_metrics"].items():
            if isinstance(tm, dict):
                for key, v in _flatten(tm).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out.loc[idx, f"task/{key}"] = float(v)
    return out[[c for c in out.columns if np.isfinite(out[c].astype(float)).any()]]


def _flatten(d, prefix=""):
    out = {}
    for key, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = v
    return out


def plot_task_metrics(df):
    """One panel per task metric (BLEU-4, box IoU / AP@0.5, mIoU, ...) vs compute, coloured by size."""
    plt = _plt()
    tm = task_metric_table(df)
    d = done_runs(df)
    cols = list(tm.columns)
    n = max(1, len(cols))
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 3.2 * nrow), squeeze=False)
    colors = _size_colors(d["params"].astype(float))
    for ax, col in zip(axes.flat, cols):
        ok = np.isfinite(tm[col].astype(float))
        dd = d[ok]
        ax.scatter(dd["flops"], tm[col][ok], c=[colors[float(v)] for v in dd["params"]], s=16, edgecolor="k",
                   linewidth=0.3)
        ax.set_xscale("log")
        ax.set_xlabel("compute C (model FLOPs)")
        ax.set_ylabel(col.split("/", 1)[1])
        pf_axis(ax)
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    if cols:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="", marker="o", color=c, markeredgecolor="k", markeredgewidth=0.3,
                          label=f"N = {n:.3g}") for n, c in colors.items()]
        axes.flat[len(cols) - 1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                        borderaxespad=0.0)
    fig.suptitle("Task metrics vs compute (held-out data)")
    fig.tight_layout()
    return fig


def missing_data(df, law=None) -> dict:
    """``{figure name: why it cannot be drawn}`` for the figures these runs do not support."""
    d = done_runs(df)
    out = {}
    if len(d) == 0:
        return {name: "no finished runs" for name in FIGURES}
    lens = _with_seq_len(df)
    if "seq_len" not in lens.columns or lens["seq_len"].nunique() < 2:
        out["loss_vs_seqlen"] = "the runs use one sequence length"
    if not modality_columns(d):
        out["loss_by_modality"] = "the summaries carry no per-modality losses"
    if law is None:
        out["residuals"] = "no fitted law"
    if not len(task_metric_table(df).columns):
        out["task_metrics"] = "no task metrics in the summaries (medscale evaluate adds them)"
    return out


def write_all(df, out_dir: str, law=None, draws=(), curves=None, modality_laws=None, power_laws=None,
              minima=None, budget: float | None = None, formats=("png", "svg"), k=None) -> dict:
    """Every figure the data allows, written to ``out_dir`` as PNG and SVG: ``{name: [paths]}``. Figures the
    data cannot support (``missing_data``: one sequence length, no per-modality losses, no task metrics, no
    law) are skipped. ``k``: the compute model placing the law on the compute axis (a factor, ``KND``,
    ``LadderAccounting``; default C = k N D with k from the runs)."""
    k = as_model(k, df)
    skip = missing_data(df, law)
    makers = {
        "loss_vs_compute": lambda: plot_loss_vs_compute(df, law=law, curves=curves, k=k),
        "isoflop": lambda: plot_isoflop(df, law=law, k=k, minima=minima),
        "allocation": lambda: plot_allocation(df, law=law, draws=draws, k=k, minima=minima, power_laws=power_laws,
                                              extend_to=budget, budget=budget),
        "loss_vs_seqlen": lambda: plot_loss_vs_seqlen(df),
        "loss_by_modality": lambda: plot_loss_by_modality(df, laws=modality_laws, k=k),
        "residuals": lambda: plot_residuals(df, law),
        "task_metrics": lambda: plot_task_metrics(df),
    }
    out = {}
    for name in FIGURES:
        if name in skip:
            log.info("figure %s not drawn: %s", name, skip[name])
            continue
        out[name] = save_figure(makers[name](), out_dir, name, formats)
    return out
