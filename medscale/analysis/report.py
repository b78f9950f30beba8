"""The study report: figures, the recommendation for a budget with its uncertainty, per-modality laws, the
comparison with earlier models, and the table of runs (``medscale report``).

``build_report(results_dir, out_dir, ...)`` loads the runs (``medscale.sweep.registry``), fits the laws with the
same function and arguments as ``medscale fit`` (``fit_all``), writes ``report.md``, ``report.json`` and the
figures (PNG + SVG) under ``out_dir``, and returns the report as a dict (what ``report.json`` holds).

Conventions (stated in the report too):
- N: non-embedding parameters; D: tokens seen (encoder + decoder); C: model FLOPs of the project's accounting.
- The recommendation meets the compute axis through the project's accounting, C = D x flops_per_token(N) along
  the ladder family at the sweep's lengths (``plots.LadderAccounting`` = ``medscale fit --accounting encdec``);
  the figures through the runs' own FLOPs per token, then the ladder (``plots.SweepAccounting``); without the
  accounting, C = k N D with k the sweep's median C / (N D) (``plots.KND``).
- The fit is ``medscale fit``'s (``inputs.read_table``, its default approaches, the budget as ``--budget-flops``);
  intervals are its 95% bootstrap percentile intervals; the loss interval uses the same bootstrap refits.
- Published laws are evaluated in their own convention (C = 6 N D; Chinchilla/Epoch N = all parameters).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import types

import numpy as np

from medscale import accounting, memory, rundir
from medscale import hardware as hw
from medscale.analysis import (
    allocation,
    approach3,
    comparison,
    datasets,
    holdout,
    inputs,
    modality,
    plots,
    repetition,
    resample,
)
from medscale.analysis import seqlen as length_law
from medscale.analysis.budget import DEFAULT_MFU
from medscale.analysis.fitting import default_approaches
from medscale.analysis.fitting import fit_all as default_fit_all
from medscale.configs import load_config
from medscale.errors import UserError
from medscale.hardware import PF_DAY
from medscale.laws import PUBLISHED, ChinchillaLaw
from medscale.sweep.registry import load_curves, load_sweep, sweep_usage

log = logging.getLogger(__name__)

DEFAULT_BUDGET = {"hardware": "dgx-1", "gpus": None, "days": 7.0}
DEFAULT_BATCH = 256  # sequences per optimizer step for the recommended run (global batch), stated
EXTRAPOLATION_WARN = 10.0  # warn when the budget exceeds the largest fitted run by more than this factor


# ------------------------------------------------------------------------------------------- loading


def load_runs(results_dir: str):
    """``(runs, curves)`` of a sweep folder: the registry's run table (``task_metrics`` added from the summaries
    when the table lacks them) and eval curves."""
    if not os.path.isdir(results_dir):
        raise UserError(f"results folder {results_dir} not found; give a sweep folder (results/<sweep>)")
    runs = load_sweep(results_dir)
    if runs is None or len(runs) == 0:
        raise UserError(f"no runs under {results_dir}; run a sweep first (medscale sweep run) or point at "
                        "a folder of run directories with summary.json")
    try:
        curves = load_curves(results_dir)
    except UserError:
        curves = None
    if "task_metrics" not in runs.columns and not any(c.startswith("task/") for c in runs.columns):
        runs["task_metrics"] = [_task_metrics(results_dir, r, s) for r, s in zip(runs["run_id"], runs["sweep"])]
    return runs, curves


def _task_metrics(results_dir: str, run_id: str, sweep=None):
    """``task_metrics`` of a run's summary.json (evaluation adds them; the registry table does not carry them)."""
    for path in (os.path.join(results_dir, str(run_id), rundir.SUMMARY),
                 os.path.join(results_dir, str(sweep), str(run_id), rundir.SUMMARY),
                 os.path.join(results_dir, rundir.SUMMARY)):
        if os.path.isfile(path):
            try:
                with open(path) as fh:
                    s = json.load(fh)
            except (OSError, ValueError):
                return None
            if s.get("run_id", run_id) == run_id:
                return s.get("task_metrics") or None
    return None


def fit_points(results_dir: str, runs=None, curves=None):
    """``(points, curves, source)``: exactly the table ``medscale fit RESULTS_DIR`` fits
    (``medscale.analysis.inputs.read_table``)."""
    return inputs.read_table(results_dir)


def modality_points(runs, col: str):
    """The finished runs with ``loss`` replaced by a modality's loss column, in the fit's canonical form."""
    d = plots.done_runs(runs)
    d = d[np.isfinite(d[col].astype(float))].copy()
    d["loss"] = d[col].astype(float)
    keep = [c for c in inputs.CANONICAL if c in d.columns]
    return inputs.canonicalise(d[keep].reset_index(drop=True), {}, where=col)


def run_fit(fit_fn, points, curves=None, approaches=("3", "2", "1"), bootstrap: int = 0, seed: int = 0,
            budgets=(), **extra) -> dict:
    """Call ``fit_fn`` (``fitting.fit_all``'s signature) as ``medscale fit`` does. When Approach 1 or 2
    cannot be fitted on these runs (a UserError naming why), it is dropped and the reason kept in
    ``warnings``, so the report still shows what can be fitted."""
    dropped = []
    approaches = tuple(str(a) for a in approaches)
    while True:
        try:
            fit = fit_fn(points, approaches=approaches, bootstrap=bootstrap, seed=seed, budgets=list(budgets),
                         curves=curves if "1" in approaches else None, **extra)
            break
        except UserError as exc:
            optional = [a for a in approaches if a in ("1", "2")]
            if not optional:
                raise
            named = [a for a in optional if f"approach {a}" in str(exc).lower()]
            drop = named[0] if named else optional[-1]
            dropped.append(f"approach {drop} left out: {exc}")
            approaches = tuple(a for a in approaches if a != drop)
    if dropped:
        fit = dict(fit)
        fit["warnings"] = list(fit.get("warnings") or []) + dropped
    return fit


# ------------------------------------------------------------------------------------------- fit access


def fitted_law(fit: dict, name: str = "fit") -> ChinchillaLaw | None:
    """Approach 3's law from a fit dict (None if the fit has none)."""
    p = (fit or {}).get("approach3") or {}
    try:
        return ChinchillaLaw(name, E=float(p["E"]), A=float(p["A"]), B=float(p["B"]), alpha=float(p["alpha"]),
                             beta=float(p["beta"]))
    except (KeyError, TypeError, ValueError):
        return None


def _laws_from(draws) -> list[ChinchillaLaw]:
    """Laws from a list of parameter dicts or a dict of parameter lists."""
    if isinstance(draws, dict) and all(k in draws for k in ("E", "A", "B", "alpha", "beta")):
        draws = [dict(zip(("E", "A", "B", "alpha", "beta"), row))
                 for row in zip(*(draws[k] for k in ("E", "A", "B", "alpha", "beta")))]
    out = []
    for d in draws if isinstance(draws, list) else []:
        try:
            law = ChinchillaLaw("draw", E=float(d["E"]), A=float(d["A"]), B=float(d["B"]),
                                alpha=float(d["alpha"]), beta=float(d["beta"]))
        except (KeyError, TypeError, ValueError):
            continue
        if all(math.isfinite(v) for v in (law.E, law.A, law.B, law.alpha, law.beta)) and law.alpha + law.beta > 0:
            out.append(law)
    return out


def bootstrap_laws(fit: dict) -> list[ChinchillaLaw]:
    """The bootstrap refits of Approach 3 as laws, when the fit dict carries them (``draws``)."""
    app = (fit or {}).get("approach3") or {}
    for holder, key in ((app, "draws"), (app, "bootstrap"), (fit or {}, "bootstrap_draws")):
        val = holder.get(key)
        if isinstance(val, dict) and "draws" in val:
            val = val["draws"]
        laws = _laws_from(val)
        if laws:
            return laws
    return []


def reproduce_draws(fit: dict, points, seed: int = 0, delta: float | None = None) -> list[ChinchillaLaw]:
    """Approach 3's bootstrap refits when the fit dict reports only their percentiles: the fit module's own
    ``approach3.bootstrap`` (the design-keeping resampling ``resample.design_counts`` with the same seed, each refit warm-started at the fitted optimum).
    Empty when the refits cannot be reproduced."""
    app = (fit or {}).get("approach3") or {}
    n_boot = int(((app.get("bootstrap") or {}).get("n") if isinstance(app.get("bootstrap"), dict) else 0) or 0)
    if n_boot <= 0 or fitted_law(fit) is None:
        return []
    try:
        law = fitted_law(fit)
        base = types.SimpleNamespace(optima=[{"theta": approach3.law_to_theta(law.E, law.A, law.B, law.alpha,
                                                                              law.beta).tolist()}])
        n, d, loss = (points[c].to_numpy(np.float64) for c in ("params", "tokens", "loss"))
        counts = resample.design_counts(points, n_boot, seed)
        th, _, conv = approach3.bootstrap(n, d, loss, base, n_boot, seed=seed, counts=counts,
                                          delta=app.get("delta") or delta or approach3.DELTA)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        log.warning("could not reproduce the bootstrap draws (%s); loss intervals left out", exc)
        return []
    th = np.asarray(th, dtype=float)[np.asarray(conv, dtype=bool)]  # refits that converged
    draws = {"E": np.exp(th[:, 2]), "A": np.exp(th[:, 0]), "B": np.exp(th[:, 1]), "alpha": th[:, 3],
             "beta": th[:, 4]}
    return _laws_from({k: v.tolist() for k, v in draws.items()})


def ci_level(fit: dict) -> float:
    """The level of the fit's intervals (``medscale fit`` reports 2.5-97.5 percentiles: 0.95)."""
    for key in ("ci_level", "level", "confidence"):
        for holder in (fit or {}, (fit or {}).get("approach3") or {}):
            v = holder.get(key)
            if isinstance(v, (int, float)) and 0 < v < 1:
                return float(v)
    return 0.95


def fit_allocation(fit: dict, c6: float, approach: str = "approach3", key: str = "allocation"):
    """The fit's own allocation row at budget ``c6`` (``key``: allocation = its C = 6ND convention,
    allocation_encdec = the project's accounting), or None."""
    for row in ((fit or {}).get(approach) or {}).get(key) or []:
        if isinstance(row, dict) and row.get("C") and math.isclose(float(row["C"]), c6, rel_tol=1e-9):
            return row
    return None


def _interval(values, level):
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) < 2:
        return None
    q = (1 - level) / 2 * 100
    return [float(np.percentile(v, q)), float(np.percentile(v, 100 - q))]


def power_allocation(app: dict):
    """``(kN, a, kD, b)`` with N_opt = kN C^a, D_opt = kD C^b from an Approach 1/2 dict, or None."""
    if not isinstance(app, dict) or "a" not in app or "b" not in app:
        return None
    a, b = float(app["a"]), float(app["b"])
    for kn, kd in (("n_coef", "d_coef"), ("kn", "kd"), ("k_n", "k_d"), ("A_n", "A_d"), ("n0", "d0"),
                   ("n_scale", "d_scale")):
        if kn in app and kd in app:
            return float(app[kn]), a, float(app[kd]), b
    for kn, kd in (("log10_n_coef", "log10_d_coef"), ("log10_kn", "log10_kd")):
        if kn in app and kd in app:
            return 10 ** float(app[kn]), a, 10 ** float(app[kd]), b
    for kn, kd in (("log_n_coef", "log_d_coef"), ("log_kn", "log_kd")):
        if kn in app and kd in app:
            return math.exp(float(app[kn])), a, math.exp(float(app[kd])), b
    return None


# ------------------------------------------------------------------------------------------- budget


def resolve_budget(hardware: str | None = None, gpus: int | None = None, days: float | None = None,
                   mfu: float | None = None, precision: str | None = None, flops: float | None = None,
                   measured_mfu: float | None = None, measured_on: str | None = None) -> dict:
    """The budget in FLOPs and the hardware it runs on. Default: one DGX-1 (8 x V100 SXM2 32 GB), 7 days.
    MFU: as given (stated), else the sweep's measured median MFU applied to the target's peak (same fraction of
    peak), else DEFAULT_MFU (assumed); the source is recorded."""
    if flops is not None:
        flops = float(flops)
        if not math.isfinite(flops) or flops <= 0:
            raise UserError(f"--flops must be a positive number, got {flops:g}")
    if days is not None and (not math.isfinite(days) or days <= 0):
        raise UserError(f"--days must be positive, got {days:g}")
    if mfu is not None and not (0 < mfu <= 1):
        raise UserError(f"--mfu must be in (0, 1], got {mfu:g}")
    if flops is None and hardware is None:
        hardware = DEFAULT_BUDGET["hardware"]
        days = DEFAULT_BUDGET["days"] if days is None else days
    if flops is None and days is None:
        days = DEFAULT_BUDGET["days"]
    out = {"flops": flops, "hardware": None, "gpus": None, "days": days, "precision": None, "peak_flops": None,
           "mfu": None, "mfu_source": None, "dtype": None, "dtype_note": None}
    if hardware is not None:
        device, default_gpus, precision, peak = hw.system_peak(hardware, precision)
        gpus = default_gpus if gpus is None else int(gpus)
        if gpus <= 0:
            raise UserError(f"--gpus must be a positive whole number, got {gpus}")
        if mfu is not None:
            src = "stated (--mfu)"
        elif measured_mfu is not None and math.isfinite(measured_mfu) and measured_mfu > 0:
            mfu = float(measured_mfu)
            src = (f"measured in the sweep on {measured_on or 'its device'} (median over runs), assumed to hold "
                   f"as the same fraction of {device}'s {precision} peak")
        else:
            mfu = DEFAULT_MFU
            src = "assumed (the sweep recorded no MFU); pass --mfu to state yours"
        out.update(hardware=device, gpus=gpus, precision=precision, peak_flops=peak, mfu=float(mfu),
                   mfu_source=src)
        out["dtype"], out["dtype_note"] = hw.dtype_for_precision(device, precision)
        if flops is None:
            flops = gpus * peak * mfu * days * 86_400
            out["flops"] = flops
        else:
            out["days"] = flops / (gpus * peak * mfu) / 86_400
    out["pf_days"] = out["flops"] / PF_DAY
    return out


# ------------------------------------------------------------------------------------------- recommendation


def _ladder(n_target: float, enc_len: int | None, dec_len: int | None):
    """``(name, non-embedding params, model FLOPs per token, shape)`` of the ladder size nearest to n_target."""
    specs = accounting.ladder_specs(enc_len=enc_len, dec_len=dec_len)
    spec = accounting.nearest_ladder(n_target, "non_embedding", specs)
    counts = accounting.param_counts(spec)
    shape = {k: getattr(spec, k) for k in ("d_model", "enc_layers", "dec_layers", "num_heads", "d_ff")}
    return spec.name, float(counts["non_embedding"]), float(accounting.flops_per_token(spec)), shape, counts


def _mode(series):
    s = series.dropna()
    return None if len(s) == 0 else int(s.mode().iloc[0])


def compute_model(runs):
    """The compute model of the recommendation: the project's accounting along the ladder family at the sweep's
    sequence lengths (``plots.LadderAccounting``, = ``medscale fit --accounting encdec``), else C = k N D with k
    from the runs."""
    done = plots.done_runs(runs)
    enc = _mode(done["enc_len"]) if "enc_len" in done.columns else None
    dec = _mode(done["dec_len"]) if "dec_len" in done.columns else None
    try:
        return plots.LadderAccounting(enc, dec)
    except UserError:
        return plots.KND(plots.compute_factor(runs))


def figure_model(runs, model=None):
    """The compute model of the figures: the runs' own FLOPs per token through the data, the ladder family above
    (``plots.SweepAccounting``); the recommendation's model when that cannot be tabulated."""
    model = model or compute_model(runs)
    if isinstance(model, plots.LadderAccounting):
        try:
            return plots.SweepAccounting(runs, model.enc_len, model.dec_len)
        except (ValueError, UserError):
            pass
    return model


def recommend(fit: dict, runs, budget: dict, batch_size: int = DEFAULT_BATCH, draws=None, model=None) -> dict:
    """N_opt, D_opt and predicted loss at the budget with bootstrap intervals; the nearest ladder size with its
    tokens, steps, batch and wall-clock; the spread across approaches and published laws; extrapolation.

    N_opt and D_opt follow the compute ``model`` (default ``compute_model(runs)``). Their intervals are the fit's
    own allocation at the budget when it computed it (``medscale fit --budget-flops C --accounting encdec``; for
    C = k N D: its 6ND allocation at C6 = 6 C / k), else the percentiles of ``draws``; the loss interval comes
    from ``draws`` (default: those in the fit dict)."""
    law = fitted_law(fit)
    if law is None:
        raise UserError("the fit has no Approach 3 law (too few runs?); add runs or check medscale fit")
    draws = bootstrap_laws(fit) if draws is None else draws
    model = model or compute_model(runs)
    level = ci_level(fit)
    k = plots.compute_factor(runs)
    c = float(budget["flops"])
    c6 = 6.0 * c / k
    n_opt, d_opt = (float(x) for x in model.optimum(law, c))
    loss = float(law.loss(n_opt, d_opt))
    if draws:
        with np.errstate(all="ignore"):
            nd_n, nd_d = (np.ravel(x) for x in model.optimum_draws(draws, [c]))
        d_losses = [float(g.loss(n, d)) for g, n, d in zip(draws, nd_n, nd_d)]
    else:
        nd_n = nd_d = np.array([])
        d_losses = []
    if isinstance(model, plots.KND):
        row, src = fit_allocation(fit, c6), "medscale fit allocation at C6 = 6C/k"
    else:
        row, src = fit_allocation(fit, c, key="allocation_encdec"), "medscale fit --accounting encdec allocation"
    n_ci = (row or {}).get("ci", {}).get("n_opt") or _interval(nd_n, level)
    d_ci = (row or {}).get("ci", {}).get("d_opt") or _interval(nd_d, level)
    rec = {
        "compute_model": model.label, "compute_factor_k": k, "budget_flops_6nd": c6, "ci_level": level,
        "bootstrap_draws": len(draws),
        "interval_source": src if row and row.get("ci") else "bootstrap draws",
        "fit_allocation": row,
        "n_opt": {"value": n_opt, "ci": n_ci},
        "d_opt": {"value": d_opt, "ci": d_ci},
        "loss": {"value": loss, "ci": _interval(d_losses, level)},
        "tokens_per_param": d_opt / n_opt,
    }
    done = plots.done_runs(runs)
    enc = _mode(done["enc_len"]) if "enc_len" in done.columns else None
    dec = _mode(done["dec_len"]) if "dec_len" in done.columns else None
    lad = _ladder(n_opt, enc, dec)
    if lad is not None:
        name, n_l, fpt, shape, counts = lad
        seq = (enc or 0) + (dec or 0)
        tokens_fill = c / fpt  # tokens whose model FLOPs use the whole budget at this size
        tokens_per_step = batch_size * seq if seq else None
        steps = math.ceil(tokens_fill / tokens_per_step) if tokens_per_step else None
        l_fill = float(law.loss(n_l, tokens_fill))
        rec["ladder"] = {
            "name": name, "params_non_embedding": n_l, "params_total": float(counts["total"]), "shape": shape,
            "enc_len": enc, "dec_len": dec, "flops_per_token": fpt, "tokens": tokens_fill,
            "tokens_per_param": tokens_fill / n_l, "batch_size": batch_size, "tokens_per_step": tokens_per_step,
            "steps": steps,
            "loss": {"value": l_fill, "ci": _interval([float(g.loss(n_l, tokens_fill)) for g in draws], level)},
            "days": budget.get("days"),
            "loss_penalty_vs_optimum": l_fill - loss,
        }
    # spread: N_opt and D_opt at this budget by every approach and published law
    spread = {"approach3": {"n_opt": n_opt, "d_opt": d_opt, "a": law.a, "b": law.b,
                            "convention": model.label}}
    for name in ("approach2", "approach1"):
        pa = power_allocation((fit or {}).get(name))
        if pa is not None:
            kn, a, kd, b = pa
            spread[name] = {"n_opt": kn * c**a, "d_opt": kd * c**b, "a": a, "b": b,
                            "convention": "power law fitted on this sweep's C"}
        elif isinstance((fit or {}).get(name), dict) and "a" in fit[name]:
            spread[name] = {"n_opt": None, "d_opt": None, "a": float(fit[name]["a"]),
                            "b": float(fit[name].get("b", float("nan"))), "convention": "exponents only"}
    for name in plots.PUBLISHED_OVERLAY:
        pub = PUBLISHED[name]
        spread[name] = {"n_opt": float(pub.n_opt(c)), "d_opt": float(pub.d_opt(c)), "a": pub.a, "b": pub.b,
                        "convention": "C = 6 N D, " + ("non-embedding N" if name == "kaplan2020" else "all params"),
                        "citation": pub.citation}
    ns = [v["n_opt"] for v in spread.values() if v.get("n_opt")]
    rec["spread"] = spread
    rec["spread_factor_n_opt"] = max(ns) / min(ns) if len(ns) > 1 else 1.0
    ours = [v["n_opt"] for key, v in spread.items() if key.startswith("approach") and v.get("n_opt")]
    rec["spread_factor_approaches"] = max(ours) / min(ours) if len(ours) > 1 else 1.0
    c_max = float(done["flops"].max())
    factor = c / c_max
    rec["extrapolation"] = {
        "fitted_flops_min": float(done["flops"].min()), "fitted_flops_max": c_max, "factor": factor,
        "decades": math.log10(factor) if factor > 0 else float("nan"),
        "warning": (f"the budget is {factor:.3g}x the largest fitted run ({c_max:.3g} FLOPs): the law is "
                    f"extrapolated over {math.log10(factor):.1f} decades of compute; treat N_opt, D_opt and the "
                    "loss as a forecast, and check it with one run near the target before spending the budget"
                    if factor > EXTRAPOLATION_WARN else None),
    }
    note = size_floor_note((rec.get("n_opt") or {}).get("value"))
    if note:
        rec["n_opt_at_search_floor"] = note
    return rec


def size_floor_note(n_opt) -> str | None:
    """The warning for an N_opt at the floor of the allocation search (a law that gives model size no weight);
    None otherwise."""
    if n_opt is None or not n_opt > 0 or n_opt > 1.05 * allocation.N_SEARCH_MIN:
        return None
    return (f"N_opt ({n_opt:.3g}) is at the floor of the allocation search ({allocation.N_SEARCH_MIN:.0e} "
            "parameters): the fitted law gives model size no weight, so this is not a size to train; the runs do "
            "not identify the N term (see the fit warnings)")


# ------------------------------------------------------------------------------------------- report


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def runs_table(runs) -> list[dict]:
    cols = ["run_id", "status", "size", "params", "tokens", "flops", "pf_days", "enc_len", "dec_len", "budget",
            "loss", "mfu", "wall_s"]
    cols += [c for c in runs.columns if c.startswith("loss/")]
    d = runs.copy()
    if "flops" in d.columns:
        d = d.sort_values("flops", na_position="last")
    out = []
    for _, r in d.iterrows():
        out.append({c: _jsonable(r[c]) if c in d.columns else None for c in cols})
    return out


DEFAULT_DATASET = "roco"  # the reference report's finite dataset: ROCO v1's published training split


def _run_config(runs, results_dir: str):
    """The training config of the first finished run: the base config with the ``data`` fields of the run's
    config.json laid over it (a record may hold only some of them)."""
    done = plots.done_runs(runs)
    for run_id in done.get("run_id", []):
        try:
            saved = rundir.read_json(os.path.join(results_dir, str(run_id), "config.json"))
        except UserError:
            continue
        if saved and isinstance(saved.get("data"), dict):
            cfg = load_config("base")
            for key, value in saved["data"].items():
                if key in cfg.data and value is not None:
                    cfg.data[key] = value
            return cfg
    return None


def data_constrained(law, draws, runs, results_dir: str, budget: dict, level: float, unique_tokens=None,
                     dataset: str | None = DEFAULT_DATASET, constants=None) -> dict | None:
    """The recommendation bounded by a finite dataset's unique tokens (``medscale.analysis.repetition``):
    ``unique_tokens`` given, or those of ``dataset`` with the sweep's own tokenizer settings and lengths (the
    first finished run's config; ``datasets.unique_tokens_of``). The fitted law is placed at C6 = 6 C / k (k the
    sweep's median C / (N D)), the convention of its own allocation; intervals from the bootstrap laws."""
    if law is None or (unique_tokens is None and not dataset):
        return None
    source = None
    if unique_tokens is None:
        cfg = _run_config(runs, results_dir)
        if cfg is None:
            return None
        source = datasets.unique_tokens_of(dataset, cfg)
        unique_tokens = source["unique_tokens"]
    const = constants or repetition.Constants()
    c6 = 6.0 * float(budget["flops"]) / plots.compute_factor(runs)
    res = repetition.plan(law, c6, float(unique_tokens), const)
    opt = [repetition.optimum(g, c6, float(unique_tokens), const) for g in draws or ()]
    for key in ("n_params_opt", "tokens_opt", "predicted_loss", "epochs"):
        res[key] = {"value": res[key], "ci": _interval([o[key] for o in opt], level)}
    res.update(dataset=source, budget_flops_6nd=c6, bootstrap_draws=len(opt))
    return res


def build_report(results_dir: str, out_dir: str | None = None, *, hardware: str | None = None,
                 gpus: int | None = None, days: float | None = None, mfu: float | None = None,
                 precision: str | None = None, flops: float | None = None, bootstrap: int = 200, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH, modality_bootstrap: int | None = None, fit_fn=None,
                 figures: bool = True, progress=None, unique_tokens: float | None = None,
                 dataset: str | None = DEFAULT_DATASET, repetition_constants=None,
                 seqlen_dir: str | None = None) -> dict:
    """Write ``report.md``, ``report.json`` and ``figures/*.{png,svg}`` under ``out_dir`` (default
    ``RESULTS_DIR/report``); return the report dict. ``fit_fn`` defaults to ``medscale fit``'s ``fit_all``.
    ``seqlen_dir``: a length study's results folder (``sweeps/seqlen.py:law``): the "Sequence length" section,
    ``seqlen_law.json`` and ``figures/seqlen_law`` (``medscale.analysis.seqlen``)."""
    out_dir = out_dir or os.path.join(results_dir, "report")
    step = progress or (lambda msg: None)
    runs, curves = load_runs(results_dir)
    done = plots.done_runs(runs)
    if len(done) < 3:
        raise UserError(f"only {len(done)} finished runs with a loss under {results_dir}; a law needs more "
                        "(run more of the sweep)")
    measured = done["mfu"].astype(float) if "mfu" in done.columns else None
    measured_mfu = float(np.nanmedian(measured)) if measured is not None and np.isfinite(measured).any() else None
    kinds = sorted({str(x) for x in done.get("device_kind", [])
                    if x is not None and not (isinstance(x, float) and math.isnan(x))})
    budget = resolve_budget(hardware, gpus, days, mfu, precision, flops, measured_mfu, ", ".join(kinds) or None)
    fit_all = fit_fn or default_fit_all
    k = plots.compute_factor(runs)
    model = compute_model(runs)
    c = float(budget["flops"])
    if isinstance(model, plots.LadderAccounting):  # medscale fit --accounting encdec at the budget itself
        fit_budget = c
        extra = {"accounting": "encdec", "n_convention": "non_embedding", "enc_len": model.enc_len,
                 "dec_len": model.dec_len}
    else:  # C = k N D: the fit's 6ND allocation at C6 = 6C/k is N_opt(C) under C = k N D
        fit_budget = 6.0 * c / k
        extra = {}
    points, fcurves, _source = fit_points(results_dir, runs, curves)
    approaches = default_approaches(points, fcurves)
    step(f"fitting the total loss (approaches {', '.join(approaches)}, {bootstrap} bootstrap draws)")
    fit = run_fit(fit_all, points, fcurves, approaches=approaches, bootstrap=bootstrap, seed=seed,
                  budgets=[fit_budget], **extra)
    approaches = tuple(a for a in approaches if f"approach{a}" in fit)  # those fitted (see run_fit)
    cli = [f"--approach={a}" for a in approaches] + ["--bootstrap", str(bootstrap), "--seed", str(seed),
                                                     "--budget-flops", repr(fit_budget)]
    if extra:
        cli += ["--accounting", "encdec", "--n-convention", "non_embedding"]
        cli += [f"--enc-len={model.enc_len}"] if model.enc_len is not None else []
        cli += [f"--dec-len={model.dec_len}"] if model.dec_len is not None else []
    law = fitted_law(fit)
    draws = bootstrap_laws(fit) or reproduce_draws(fit, points, seed=seed)
    rec = recommend(fit, runs, budget, batch_size, draws=draws, model=model)
    step("data-constrained recommendation")
    bounded = data_constrained(law, draws, runs, results_dir, budget, ci_level(fit), unique_tokens, dataset,
                               repetition_constants)
    # per-modality laws: the same fit (Approach 3) on each modality's loss
    modality_fits = {}
    mb = bootstrap if modality_bootstrap is None else modality_bootstrap
    for col in plots.modality_columns(done):
        mod = col.split("/", 1)[1]
        try:
            mpoints = modality_points(runs, col)
            if len(mpoints) < 3:
                continue
            step(f"fitting the {mod} loss")
            mfit = run_fit(fit_all, mpoints, None, approaches=("3",), bootstrap=mb, seed=seed,
                           budgets=[fit_budget], convention_table=False, **extra)
        except UserError as exc:
            log.warning("no law for modality %s: %s", mod, exc)
            continue
        mlaw = fitted_law(mfit)
        if mlaw is None:
            continue
        n_o, d_o = (float(x) for x in model.optimum(mlaw, c))
        modality_fits[mod] = {"fit": mfit, "n_opt": n_o, "d_opt": d_o, "loss_at_budget": float(mlaw.loss(n_o, d_o))}
    mcheck = modality_check(runs, law, modality_fits, rec, points, model)
    hold = {}
    for kk in HOLDOUT_KS:
        step(f"holdout: fitting all budgets but the top {kk}")
        try:
            hold[str(kk)] = holdout.holdout(points, kk, bootstrap=bootstrap or holdout.DEFAULT_BOOTSTRAP,
                                            seed=seed)
            hold[str(kk)]["command"] = (f"medscale fit {results_dir} --approach 3 --holdout-top {kk} --bootstrap "
                                        f"{bootstrap or holdout.DEFAULT_BOOTSTRAP} --seed {seed} --json")
        except UserError as exc:
            hold[str(kk)] = {"k": kk, "error": str(exc)}
    comp = comparison.place_models(law, model) if law is not None else comparison.table()
    vqa = vqa_vs_compute(runs)
    shared = shared_tasks(results_dir, runs)
    fig_paths, hold_fig = {}, []
    if figures:
        step("drawing figures")
        power = {}
        for name in ("approach2", "approach1"):
            pa = power_allocation(fit.get(name))
            if pa is not None:
                power[name.replace("approach", "Approach ")] = pa
        mlaws = {m: fitted_law(v["fit"]) for m, v in modality_fits.items()}
        fig_dir = os.path.join(out_dir, "figures")
        fig_paths = plots.write_all(runs, fig_dir, law=law, draws=draws, curves=curves, modality_laws=mlaws,
                                    power_laws=power, budget=budget["flops"], k=figure_model(runs, model))
        hold_fig = holdout_figure(hold, fig_dir)
        if vqa is not None:
            vqa["figure"] = [os.path.relpath(p, out_dir) for p in vqa_figure(vqa, fig_dir)]
    length_study = None
    if seqlen_dir is not None:
        length_study = length_law.report_section(seqlen_dir, c, out_dir, bootstrap_draws=bootstrap, seed=seed,
                                             figures=figures, progress=step)
    report = {
        "results_dir": results_dir,  # as given (a relative path stays relative in the committed report)
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "n_runs": len(runs), "n_done": len(done),
        "fit_args": {"approaches": list(approaches), "bootstrap": bootstrap, "seed": seed, "budgets": [fit_budget],
                     **extra, "cli": cli, "command": f"medscale fit {results_dir} " + " ".join(cli) + " --json"},
        "fit": _strip_draws(fit),
        "budget": budget,
        "recommendation": rec,
        "data_constrained": bounded,
        "modality_laws": {m: {**{k: v for k, v in d.items() if k != "fit"}, "fit": _strip_draws(d["fit"])}
                          for m, d in modality_fits.items()},
        "data": data_summary(runs),
        "caption_floor": caption_floor(runs, modality_fits),
        "modality_check": mcheck,
        "holdout": hold,
        "holdout_figure": [os.path.relpath(p, out_dir) for p in hold_fig],
        "comparison": comp,
        "vqa": vqa,
        "shared_tasks": shared,
        "figures": {k: [os.path.relpath(p, out_dir) for p in v] for k, v in fig_paths.items()},
        "figures_not_drawn": plots.missing_data(runs, law) if figures else {},
        "runs": runs_table(runs),
        "sweep": _sweep_use(results_dir),
        "seqlen": length_study,
    }
    report = _jsonable(report)
    rundir.write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    rundir.write_text(os.path.join(out_dir, "report.md"), render_markdown(report))
    report["out_dir"] = os.path.abspath(out_dir)
    return report


# ----------------------------------------------------------------------------------------------- VQA and shared tasks
VQA_KEYS = ("closed_acc", "open_acc", "overall_acc")


def vqa_vs_compute(runs) -> dict | None:
    """Answer accuracy (closed, open, overall; the runs' ``task_metrics`` ``answer/*``) against compute: one
    point per finished run, the best run of each compute budget, and the least-squares slope of overall accuracy
    per decade of compute. None when no run carries answer accuracy."""
    tm = plots.task_metric_table(runs)
    cols = [f"task/answer/{k}" for k in VQA_KEYS]
    if not any(c in tm.columns for c in cols):
        return None
    d = plots.done_runs(runs).loc[tm.index]
    points = []
    for idx in tm.index:
        row = {k: (float(tm.at[idx, f"task/answer/{k}"]) if f"task/answer/{k}" in tm.columns
                   and np.isfinite(float(tm.at[idx, f"task/answer/{k}"])) else None) for k in VQA_KEYS}
        if all(v is None for v in row.values()):
            continue
        budget = d.at[idx, "budget"] if "budget" in d.columns else None
        points.append({"run_id": str(d.at[idx, "run_id"]), "flops": float(d.at[idx, "flops"]),
                       "params": float(d.at[idx, "params"]), "loss": float(d.at[idx, "loss"]),
                       "budget": float(budget) if budget is not None and np.isfinite(float(budget)) else None,
                       **row})
    if not points:
        return None
    by_budget: dict = {}
    for p in points:
        key = p["budget"] if p["budget"] is not None else p["flops"]
        if p["overall_acc"] is not None and (key not in by_budget
                                             or p["overall_acc"] > by_budget[key]["overall_acc"]):
            by_budget[key] = p
    best = [{"budget": k, **{f: v[f] for f in ("run_id", "params", "flops", *VQA_KEYS)}}
            for k, v in sorted(by_budget.items())]
    ok = [p for p in points if p["overall_acc"] is not None]
    slope = None
    if len({p["flops"] for p in ok}) >= 2:
        x = np.log10([p["flops"] for p in ok])
        slope = float(np.polyfit(x, [p["overall_acc"] for p in ok], 1)[0])
    return {"points": points, "best_per_budget": best, "overall_per_decade": slope,
            "n_runs": len(points)}


def vqa_figure(vqa: dict, fig_dir: str) -> list[str]:
    """``vqa_accuracy.{png,svg}``: closed, open and overall answer accuracy of every run vs compute, with the
    best run of each budget joined."""
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    styles = {"closed_acc": ("o", "closed"), "open_acc": ("s", "open"), "overall_acc": ("D", "overall")}
    for key, (marker, label) in styles.items():
        pts = [(p["flops"], p[key]) for p in vqa["points"] if p[key] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=18, alpha=0.6, label=f"{label} (runs)")
    best = [(b["flops"], b["overall_acc"]) for b in vqa["best_per_budget"] if b["overall_acc"] is not None]
    if best:
        ax.plot(*zip(*sorted(best)), "k-", lw=1, label="overall, best run per budget")
    ax.set_xscale("log")
    ax.set_xlabel("compute C (model FLOPs)")
    ax.set_ylabel("answer accuracy (exact match)")
    ax.set_ylim(0, 1)
    plots.pf_axis(ax)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Visual question answering vs compute (held-out)")
    fig.tight_layout()
    return plots.save_figure(fig, fig_dir, "vqa_accuracy")


def _vqa_md(r: dict) -> list[str]:
    v = r.get("vqa")
    if not v:
        return []
    L = ["## Visual question answering vs compute\n",
         (f"Answer accuracy of {v['n_runs']} runs on their held-out questions (exact match after normalisation; "
          "closed = yes/no and choice questions, open = the rest; `medscale evaluate` computes them). Best run "
          "per compute budget:\n"),
         "| budget (FLOPs) | run | N | closed | open | overall |\n|---|---|---|---|---|---|"]
    for b in v["best_per_budget"]:
        L.append(f"| {fmt(b['budget'])} | {b['run_id']} | {fmt(b['params'])} | {fmt(b['closed_acc'])} | "
                 f"{fmt(b['open_acc'])} | {fmt(b['overall_acc'])} |")
    if v.get("overall_per_decade") is not None:
        L.append(f"\nOverall accuracy changes by {v['overall_per_decade']:+.3f} per decade of compute "
                 "(least squares over all runs).")
    fig = v.get("figure") or []
    png = next((p for p in fig if p.endswith(".png")), None)
    if png:
        L.append(f"\n![vqa_accuracy]({png})")
    L.append("")
    return L


def local_benchmark_results(results_dir: str, runs) -> list[dict]:
    """medscale's own results on the shared benchmarks: finished runs trained on one (``data.dataset`` vqa_rad or
    slake) whose summary's ``task_eval`` says they were scored on the test split."""
    if "dataset" not in runs.columns:
        return []
    out = []
    d = plots.done_runs(runs)
    for _, row in d[d["dataset"].isin(list(comparison.BENCHMARKS))].iterrows():
        summary = None
        for path in (os.path.join(results_dir, str(row["run_id"]), rundir.SUMMARY),
                     os.path.join(results_dir, str(row.get("sweep")), str(row["run_id"]), rundir.SUMMARY)):
            if os.path.isfile(path):
                try:
                    summary = rundir.read_json(path)
                except UserError:
                    summary = None
                break
        tm, te = (summary or {}).get("task_metrics") or {}, (summary or {}).get("task_eval") or {}
        if te.get("split") != "test" or "answer/overall_acc" not in tm:
            continue
        out.append({"benchmark": row["dataset"], "run_id": str(row["run_id"]), "flops": float(row["flops"]),
                    "params": float(row["params"]), "open": tm.get("answer/open_acc"),
                    "closed": tm.get("answer/closed_acc"), "overall": tm.get("answer/overall_acc"),
                    "questions": te.get("num_examples")})
    return out


def prepared_benchmarks(data_root: str | None = None) -> list[str]:
    """The shared benchmarks whose TFDS data is prepared under the data cache (``data.data_dir``, default
    ``~/.cache/medscale``)."""
    root = data_root or os.path.join(os.path.expanduser("~"), ".cache", "medscale")
    return [k for k in comparison.BENCHMARKS if os.path.isdir(os.path.join(root, "tfds", k))]


def shared_tasks(results_dir: str, runs, data_root: str | None = None) -> list[dict]:
    """The headline comparison table (:func:`medscale.analysis.comparison.shared_task_table`) for these runs."""
    return comparison.shared_task_table(local_benchmark_results(results_dir, runs), prepared_benchmarks(data_root))


def _shared_tasks_md(r: dict) -> list[str]:
    L = ["## Earlier models on shared tasks\n",
         ("Accuracy (%) on the benchmarks' test splits, closed / open / overall questions, as published (paper and "
          "table per row) beside medscale's own result where a run trained on the benchmark was scored on its test "
          "split (`medscale evaluate --split test`). Published models classify over the training answers; "
          "medscale generates the answer and is scored by exact match after normalisation.\n"),
         "| benchmark | model | closed | open | overall | source |\n|---|---|---|---|---|---|"]
    for row in r.get("shared_tasks") or []:
        cells = [fmt(row[m], 4) if row.get(m) is not None else "–" for m in ("closed", "open", "overall")]
        if row["status"] == "published":
            src = row["source"]
        elif row["status"] == "local":
            loc = row["local"]
            src = f"this results folder: run {loc['run_id']} ({fmt(loc['flops'])} FLOPs, N = {fmt(loc['params'])})"
        else:
            src = row["status"]
        L.append(f"| {row['benchmark']} | {row['model']} | {' | '.join(cells)} | {src} |")
    L.append("")
    return L


HOLDOUT_KS = (1, 2)  # the report's holdout checks: the top budget, then the top two, held out
# the eval identity L = sum_m w_m L_m holds to rounding on a fixed eval set: float64 sums of float32 per-batch
# sums, so even losses stored in float32 meet it to a few float32 eps; 1e-4 is ~800 float32 eps of margin
IDENTITY_TOL = 1e-4


def data_summary(runs) -> dict:
    """What the runs were trained on, from the registry's columns (the run summaries' ``data`` object and the
    config's dataset): source, unique examples per run, epochs; ``None`` where not recorded."""
    d = plots.done_runs(runs)

    def values(col):
        if col not in d.columns:
            return np.array([])
        v = np.asarray(d[col].to_numpy(), dtype=object)
        return np.array([float(x) for x in v if isinstance(x, (int, float, np.number)) and math.isfinite(float(x))])

    def names(col):
        return sorted({str(x) for x in d[col]} - {"None", "nan"}) if col in d.columns else []

    ue, ep = values("unique_examples"), values("epochs")
    sources, datasets = names("data_source"), names("dataset")
    synthetic = any("synthetic" in s.lower() for s in sources + datasets) or None
    return {"sources": sources, "datasets": datasets, "synthetic": synthetic, "n_runs": len(d),
            "runs_recorded": len(ep),
            "unique_examples": None if not len(ue) else {"min": float(ue.min()), "median": float(np.median(ue)),
                                                         "max": float(ue.max())},
            "epochs": None if not len(ep) else {"median": float(np.median(ep)), "max": float(ep.max())}}


def caption_floor(runs, modality_fits) -> dict | None:
    """The caption loss's fitted E beside the generator's own irreducible caption entropy (nats per caption
    token, ``caption_entropy_floor`` of the run summaries); None when neither is there."""
    d = plots.done_runs(runs)
    floors = d["caption_entropy_floor"].astype(float) if "caption_entropy_floor" in d.columns else None
    floors = floors[np.isfinite(floors)] if floors is not None else []
    cap = (modality_fits.get("caption") or {}).get("fit", {}).get("approach3") or {}
    if not len(floors) and not cap:
        return None
    out = {"floor": float(np.median(floors)) if len(floors) else None,
           "floor_spread": float(floors.max() - floors.min()) if len(floors) else None,
           "E": cap.get("E"), "E_ci": (cap.get("ci") or {}).get("E")}
    if out["floor"] is not None and out["E"] is not None:
        out["E_minus_floor"] = out["E"] - out["floor"]
        ci = out["E_ci"]
        out["floor_inside_E_interval"] = None if not ci else bool(ci[0] <= out["floor"] <= ci[1])
    return out


def modality_check(runs, law, modality_fits, rec, points, model) -> dict:
    """The weighted sum of the per-modality laws against the total law (``medscale.analysis.modality``), with the
    eval weights recovered at the recommendation's sequence lengths; ``{"status": "not run", "reason"}`` when it
    cannot be made."""
    d = plots.done_runs(runs)
    mods = [c.split("/", 1)[1] for c in plots.modality_columns(d)]
    if law is None or not mods:
        return {"status": "not run", "reason": "no total law or no per-modality losses"}
    missing = [m for m in mods if fitted_law((modality_fits.get(m) or {}).get("fit")) is None]
    if missing:
        return {"status": "not run", "reason": f"no law for {', '.join(missing)}"}
    enc = getattr(model, "enc_len", None)
    dec = getattr(model, "dec_len", None)
    w = modality.weights(runs, mods, enc, dec) or modality.weights(runs, mods)
    if w is None:
        return {"status": "not run", "reason": "too few finished runs to recover the eval weights"}
    if w["identity_residual"] > IDENTITY_TOL:
        return {"status": "not run", "weights_fit": w,
                "reason": f"the total loss is not a fixed-weight sum of the modality losses in these runs (the "
                          f"least-squares weights leave a relative residual of {w['identity_residual']:.2g}; a "
                          f"fixed eval set leaves rounding, below {IDENTITY_TOL:g})"}
    mlaws = {m: fitted_law(modality_fits[m]["fit"]) for m in mods}
    res = modality.check(law, mlaws, w["weights"], rec["n_opt"]["value"], rec["d_opt"]["value"], points,
                         (rec.get("loss") or {}).get("ci"))
    return {"status": "ran", "weights_fit": w, **res}


def holdout_figure(hold: dict, fig_dir: str) -> list[str]:
    """Predicted vs observed loss of the held-out runs with their intervals, one panel per K (PNG + SVG)."""
    ok = [(k, h) for k, h in hold.items() if h.get("runs")]
    if not ok:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ok), figsize=(4.2 * len(ok), 4.0), squeeze=False)
    for ax, (k, h) in zip(axes[0], ok):
        obs = np.array([r["observed"] for r in h["runs"]])
        pred = np.array([r["predicted"] for r in h["runs"]])
        lo = np.array([r["lo"] for r in h["runs"]])
        hi = np.array([r["hi"] for r in h["runs"]])
        ax.errorbar(obs, pred, yerr=[pred - lo, hi - pred], fmt="o", ms=4, capsize=3, lw=1)
        span = [min(obs.min(), lo.min()) * 0.97, max(obs.max(), hi.max()) * 1.03]
        ax.plot(span, span, "k--", lw=0.8)
        ax.set_xlabel("observed loss")
        ax.set_ylabel("predicted loss (95% interval)")
        ax.set_title(f"top {k} budget(s) held out: |log err| {h['mean_abs_log_error']:.3f}, "
                     f"coverage {h['coverage']:.0%}", fontsize=9)
    fig.tight_layout()
    os.makedirs(fig_dir, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(fig_dir, f"holdout.{ext}")
        fig.savefig(path, dpi=110)
        paths.append(path)
    plt.close(fig)
    return paths


def _strip_draws(fit: dict) -> dict:
    """The fit dict without per-draw parameter lists (kept out of report.json; intervals and draw counts such as
    Approach 2's ``draws`` stay)."""
    def strip(d):
        if not isinstance(d, dict):
            return d
        return {k: strip(v) for k, v in d.items()
                if not ((k in ("draws", "bootstrap_draws") and isinstance(v, (list, dict)))
                        or (k == "bootstrap" and isinstance(v, list)))}
    return strip(fit or {})


# ------------------------------------------------------------------------------------------- markdown


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    x = float(x)
    if not math.isfinite(x):
        return "–"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        s = f"{x:.{digits}g}"
    else:
        s = f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
    return s.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _ci(d, digits=3):
    if not d:
        return "–"
    v, ci = d.get("value"), d.get("ci")
    s = fmt(v, digits)
    if ci:
        s += f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"
    return s


def _sweep_use(results_dir: str) -> dict | None:
    """The sweep's use of the machine (``medscale.sweep.registry.sweep_usage``: utilisation, PF-days of all its
    runs, wall and training seconds of its launches); None when no launch was recorded there."""
    try:
        use = sweep_usage(results_dir) if os.path.isdir(results_dir) else None
    except (OSError, ValueError, KeyError):
        return None
    if use is None:
        return None
    return {k: use[k] for k in ("utilisation", "pf_days", "wall_s", "train_s")}


def _law_row(name, p):
    ci = p.get("ci") or {}

    def cell(key):
        v = fmt(p.get(key), 4)
        if ci.get(key):
            v += f" [{fmt(ci[key][0], 4)}, {fmt(ci[key][1], 4)}]"
        return v

    return f"| {name} | " + " | ".join(cell(k) for k in ("E", "A", "B", "alpha", "beta", "a", "b")) + " |"


def _data_paragraph(r: dict) -> str:
    """The report's first paragraph: what the data are and how far the recommendation is extrapolated."""
    data = r.get("data") or {}
    names = data.get("sources") or data.get("datasets") or []
    kind = ("synthetic" if data.get("synthetic") else "not synthetic" if names else "not recorded")
    what = f"**Data**: {', '.join(names) if names else 'source not recorded'} ({kind})"
    ue, ep = data.get("unique_examples"), data.get("epochs")
    if ue:
        what += (f"; unique examples seen per run {fmt(ue['min'])} – {fmt(ue['max'])} (median "
                 f"{fmt(ue['median'])})")
    else:
        what += "; unique examples seen: not recorded"
    if ep:
        what += f"; epochs: median {fmt(ep['median'])}, max {fmt(ep['max'])}"
    else:
        what += "; epochs: not recorded"
    if ue or ep:
        what += f" ({data.get('runs_recorded', 0)} of {data.get('n_runs', 0)} finished runs record them)"
    ex = (r.get("recommendation") or {}).get("extrapolation") or {}
    if ex.get("decades") is not None:
        what += (f". **Extrapolation**: the largest budget trained is {fmt(ex.get('fitted_flops_max'))} FLOPs; the "
                 f"recommendation's budget is {fmt((r.get('budget') or {}).get('flops'))} FLOPs, "
                 f"**{fmt(ex['decades'], 2)} decades** beyond it")
    return what + "."


N_LABELS = {"non_embedding": "non-embedding", "total": "all parameters (total)",
            "with_heads": "non-embedding + heads"}


def _data_constrained_md(r: dict) -> list[str]:
    dc = r.get("data_constrained")
    if not dc:
        return []
    src, const, free = dc.get("dataset"), dc["constants"], dc["unconstrained"]
    what = (f"{src['dataset']}: {src['examples']:,} examples x {fmt(src['tokens_per_example'])} tokens "
            f"({src['source']})" if src else "given")
    L = ["### With a finite dataset\n",
         (f"Unique tokens: **{fmt(dc['unique_tokens'])}** ({what}). Repetition per Muennighoff et al. 2023's "
         f"effective data and parameters, R*_D = {fmt(const['r_star_d'], 5)}, R*_N = {fmt(const['r_star_n'], 4)} "
         f"({const['source']}); both columns are the law's C = 6ND allocation at C6 = 6C/k = "
          f"{fmt(dc['budget_flops_6nd'])}, which can differ from the recommendation above when that uses the "
          "encoder-decoder accounting (docs/fit.md).\n"),
         "| | unlimited data | this dataset [interval] |\n|---|---|---|",
         f"| N (non-embedding parameters) | {fmt(free['n_params_opt'])} | {_ci(dc['n_params_opt'])} |",
         f"| D (tokens) | {fmt(free['tokens_opt'])} | {_ci(dc['tokens_opt'])} |",
         f"| epochs of the dataset | {fmt(free['epochs'])} | {_ci(dc['epochs'])} |",
         f"| predicted loss | {fmt(free['predicted_loss'], 4)} | {_ci(dc['predicted_loss'], 4)} |",
         f"| loss lost to repetition | – | {dc['loss_lost_to_repetition']:+.4g} |",
         (f"| C6 beyond which a doubling lowers the loss < 1% | {fmt(dc['diminishing_flops_unlimited'])} "
         f"| {fmt(dc['diminishing_flops'])} |"), ""]
    L += [f"> **{w[0].upper() + w[1:]}.**\n" for w in dc.get("warnings", [])]
    return L


def _conventions_md(r: dict) -> list[str]:
    fit = r.get("fit") or {}
    rows = fit.get("conventions") or []
    if not rows:
        return []
    info = fit.get("conventions_info") or {}
    L = ["### How the answer moves with the counting conventions\n",
         ("Approach 3 refitted with N counted three ways (non-embedding; total = with embeddings and heads; "
         "non-embedding + output heads), and N_opt placed on the compute axis two ways: C = 6ND with that N, and "
         "the project's encoder-decoder model FLOPs (accounted, along the ladder family; a and b are then the "
         f"local slopes at C). C = {fmt(info.get('C'))} FLOPs. Approach 2's parabola exponents use the budget "
         "groups, which are IsoFLOP in accounted FLOPs.\n"),
         "| N counted as | C convention | a | b | N_opt | D_opt | Approach 2 a | Approach 2 b |",
         "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if not row.get("available"):
            L.append(f"| {N_LABELS.get(row['n_convention'], row['n_convention'])} | {row['flops_convention']} | "
                     "– | – | – | – | – | – |")
            continue
        L.append(f"| {N_LABELS.get(row['n_convention'], row['n_convention'])} | {row['flops_convention']} | "
                 f"{fmt(row.get('a'))} | {fmt(row.get('b'))} "
                 f"| {fmt(row.get('n_opt'))} | {fmt(row.get('d_opt'))} | {fmt(row.get('approach2_a'))} | "
                 f"{fmt(row.get('approach2_b'))} |")
    missing = [f"{N_LABELS.get(row['n_convention'], row['n_convention'])}: {row.get('reason')}" for row in rows
               if not row.get("available") and row["flops_convention"] == "6ND"]
    if missing:
        L.append("\nNot available: " + "; ".join(missing) + ".")
    L.append("")
    return L


def _approach2_md(fit: dict) -> list[str]:
    a2 = fit.get("approach2") or {}
    L = []
    if a2.get("draws"):
        L.append(f"- Approach 2 bootstrap: {a2.get('degenerate_draws', 0)} of {a2['draws']} draws degenerate (a "
                 "budget drew fewer than 3 distinct sizes, or its parabola lost its minimum; such a draw fits the "
                 f"other budgets), {a2.get('failed_draws', 0)} failed (fewer than 2 budgets left; outside the "
                 "intervals).")
    sc = a2.get("spline_check")
    if sc:
        if sc.get("status") == "ran":
            L.append(f"- Parabola-vs-spline check over {sc['groups_compared']} budgets: a {fmt(sc['parabola_a'], 4)}"
                     f" (parabola) vs {fmt(sc['spline_a'], 4)} (spline), difference "
                     f"{sc['parabola_minus_spline_a']:+.3f}.")
        else:
            L.append(f"- Parabola-vs-spline check not run: {sc.get('reason')}.")
        per = [f"C={fmt(g['C'])}: {g['status']}" + (f" ({g['reason']})" if g.get("reason") else "")
               for g in sc.get("groups") or []]
        if per:
            L.append("  Per budget: " + "; ".join(per) + ".")
    return L + ([""] if L else [])


def _modality_md(r: dict) -> list[str]:
    L = []
    mc = r.get("modality_check") or {}
    if mc.get("status") == "ran":
        w = mc["weights_fit"]
        at, ar = mc["at_budget"], mc["at_runs"]
        L.append("### Per-modality laws against the total\n")
        L.append("The eval loss is the token-weighted mean over the eval set's decoder targets: L = sum_m w_m L_m "
                 "with w_m that modality's share of the eval targets (fixed for a data configuration; recovered "
                 f"from the runs at Le={w['lengths']['enc_len']}, Ld={w['lengths']['dec_len']}: "
                 + ", ".join(f"{m} {fmt(v, 4)}" for m, v in w["weights"].items())
                 + f"; identity residual {fmt(w['identity_residual'], 2)} over {w['n_runs']} runs).\n")
        L.append("| where | total law | weighted sum of modality laws | relative difference | threshold | |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| budget optimum | {fmt(at['total'], 4)} | {fmt(at['weighted_sum'], 4)} | "
                 f"{at['relative_difference']:+.2%} | {fmt(100 * at['threshold'], 3)}% ({at['threshold_source']}) | "
                 f"{'**over**' if at['flagged'] else 'ok'} |")
        L.append(f"| observed runs (max) | – | – | {ar['max_abs_relative_difference']:.2%} | "
                 f"{fmt(100 * ar['threshold'], 3)}% ({ar['threshold_source']}) | "
                 f"{'**over**' if ar['flagged'] else 'ok'} |")
        L.append("")
    elif mc:
        L.append(f"Per-modality laws against the total: not checked ({mc.get('reason')}).\n")
    cf = r.get("caption_floor")
    if cf:
        e_ci = cf.get("E_ci")
        e = fmt(cf.get("E"), 4) + (f" [{fmt(e_ci[0], 4)}, {fmt(e_ci[1], 4)}]" if e_ci else "")
        floor = fmt(cf["floor"], 4) + " nats per caption token" if cf.get("floor") is not None else "not recorded"
        L.append(f"Caption loss floor: the caption law's fitted E = {e}; the generator's own irreducible caption "
                 f"entropy = {floor}"
                 + (f" (E − floor = {cf['E_minus_floor']:+.3g})" if cf.get("E_minus_floor") is not None else "")
                 + ".\n")
    return L


def _holdout_md(r: dict) -> list[str]:
    hold = r.get("holdout") or {}
    if not hold:
        return []
    L = ["## Validated extrapolation\n",
         ("Approach 3 fitted on all budgets but the top K, then used to predict the held-out runs' loss; 95% "
         "prediction intervals add the bootstrap refits' spread and the run noise (in quadrature, on log loss).\n")]
    for k, h in hold.items():
        if h.get("error"):
            L.append(f"**K = {k}**: not run ({h['error']}).\n")
            continue
        nz = h["noise"]
        L.append(f"**K = {k}**: fitted on {len(h['budgets_fitted'])} budgets up to {fmt(h['budgets_fitted'][-1])} "
                 f"FLOPs ({h['n_fit']} runs), held out {', '.join(fmt(c) for c in h['budgets_held_out'])} "
                 f"({h['n_held_out']} runs). Mean |log error| **{fmt(h['mean_abs_log_error'], 3)}** (max "
                 f"{fmt(h['max_abs_log_error'], 3)}, mean {h['mean_log_error']:+.3f}); coverage of the 95% intervals "
                 f"**{h['coverage']:.0%}**. Run noise sigma {fmt(nz['sigma_log'], 3)} on log loss from "
                 f"{nz['source']} (df {nz['df']}); {h['bootstrap']['converged']} of {h['bootstrap']['n']} refits. "
                 f"Cross-check: `{h.get('command', '')}`.\n")
        L.append("| run | observed | predicted | 95% interval | log error |\n|---|---|---|---|---|")
        for row in h["runs"]:
            L.append(f"| `{row['run_id']}` | {fmt(row['observed'], 4)} | {fmt(row['predicted'], 4)} | "
                     f"[{fmt(row['lo'], 4)}, {fmt(row['hi'], 4)}]{'' if row['covered'] else ' (outside)'} | "
                     f"{row['log_error']:+.3f} |")
        L.append("")
    fig = r.get("holdout_figure") or []
    if fig:
        png = next((p for p in fig if p.endswith(".png")), fig[0])
        L.append(f"![holdout]({png})\n")
    return L


def render_markdown(r: dict) -> str:
    rec, b = r["recommendation"], r["budget"]
    level = round(100 * rec.get("ci_level", 0.9))
    L = []
    L.append("# Scaling study report\n")
    L.append(_data_paragraph(r) + "\n")
    L.append(f"Results: `{r['results_dir']}` — {r['n_done']} finished runs of {r['n_runs']}. "
             f"Created {r['created']}. Regenerate with `medscale report {r['results_dir']}{' --mfu ' + fmt(b['mfu']) if str(b.get('mfu_source', '')).startswith('stated') else ''}"
             f"{' --seqlen ' + r['seqlen']['source'] if r.get('seqlen') else ''}`.\n")
    L.append("Conventions: N = non-embedding parameters, D = tokens seen (encoder + decoder), C = model FLOPs "
             "(project accounting; 1 PF-day = 8.64e19 FLOPs). The fitted law is placed on the compute axis with "
             f"{rec['compute_model']} (the sweep's median C/(ND) is k = {fmt(rec['compute_factor_k'], 4)}; 6 for a "
             f"decoder-only LM). Intervals: {level}% bootstrap percentile intervals ({r['fit_args']['bootstrap']} "
             f"refits resampling the design: (budget, size) cells within each budget group, seed replicates within their cell; N_opt/D_opt intervals from {rec['interval_source']}). "
             f"Cross-check: `{r['fit_args']['command']}`.\n")
    # recommendation
    L.append("## Recommendation\n")
    if b.get("hardware"):
        L.append(f"Budget: {b['gpus']} x {b['hardware']} ({b['precision']} peak {fmt(b['peak_flops'])} FLOP/s "
                 f"each) for {fmt(b['days'])} days at MFU {fmt(b['mfu'])} ({b['mfu_source']}) = "
                 f"**{fmt(b['flops'])} FLOPs = {fmt(b['pf_days'])} PF-days**.\n")
        L.append(f"Compute dtype the recommendation assumes: {b['dtype_note']}.\n")
    else:
        L.append(f"Budget: **{fmt(b['flops'])} FLOPs = {fmt(b['pf_days'])} PF-days** (given).\n")
    L.append("| quantity | value [interval] |\n|---|---|")
    L.append(f"| N_opt (non-embedding parameters) | {_ci(rec['n_opt'])} |")
    L.append(f"| D_opt (tokens) | {_ci(rec['d_opt'])} |")
    L.append(f"| tokens per parameter | {fmt(rec['tokens_per_param'])} |")
    L.append(f"| predicted eval loss at the optimum | {_ci(rec['loss'], 4)} |")
    lad = rec.get("ladder")
    if lad:
        s = lad["shape"]
        L.append(f"| nearest ladder size | **{lad['name']}**: d_model {s['d_model']}, {s['enc_layers']}+"
                 f"{s['dec_layers']} layers, {s['num_heads']} heads, d_ff {s['d_ff']}; "
                 f"{fmt(lad['params_non_embedding'])} non-embedding / {fmt(lad['params_total'])} total params |")
        L.append(f"| its tokens (fills the budget) | {fmt(lad['tokens'])} ({fmt(lad['tokens_per_param'])} per "
                 f"parameter), {fmt(lad['flops_per_token'])} FLOPs/token at Le={lad['enc_len']}, "
                 f"Ld={lad['dec_len']} |")
        L.append(f"| steps x batch | {lad['steps']:,} steps x {lad['batch_size']} sequences "
                 f"({fmt(lad['tokens_per_step'])} tokens/step) |" if lad.get("steps") else "| steps | – |")
        L.append(f"| wall-clock | {fmt(lad['days'])} days on {b['gpus']} x {b['hardware']} at MFU {fmt(b['mfu'])} |"
                 if b.get("hardware") else "| wall-clock | – (budget given in FLOPs; pass --hardware for days) |")
        L.append(f"| predicted loss of the ladder run | {_ci(lad['loss'], 4)} "
                 f"({lad['loss_penalty_vs_optimum']:+.2g} vs the optimum; the ladder size's own FLOPs/token "
                 "decide its tokens) |")
        if b.get("hardware") and lad.get("enc_len") and lad.get("dec_len"):
            spec = next(x for x in accounting.ladder_specs(lad["enc_len"], lad["dec_len"]) if x.name == lad["name"])
            plan = memory.plan_summary(spec, b["hardware"], b["gpus"], b["precision"], batch=lad["batch_size"])
            L.append(f"| memory plan | {plan} |")
    L.append("")
    ex = rec["extrapolation"]
    L.append(f"Fitted compute range: {fmt(ex['fitted_flops_min'])} – {fmt(ex['fitted_flops_max'])} FLOPs; the "
             f"budget is **{fmt(ex['factor'])}x** the largest run ({fmt(ex['decades'], 2)} decades).\n")
    if ex.get("warning"):
        L.append(f"> **Extrapolation warning:** {ex['warning']}.\n")
    if rec.get("n_opt_at_search_floor"):
        L.append(f"> **Size not identified:** {rec['n_opt_at_search_floor']}.\n")
    warns = list((r.get("fit") or {}).get("warnings") or [])
    a3 = (r.get("fit") or {}).get("approach3") or {}
    if a3.get("E") is not None and a3["E"] < 1e-3:
        warns.append(f"E (the irreducible loss) fitted at {fmt(a3['E'])}: these runs do not pin it down, so "
                     "losses predicted far beyond them (the optimum's loss above) are not to be trusted; the "
                     "allocation exponents are better determined")
    for m, d in (r.get("modality_laws") or {}).items():
        warns += [f"{m}: {w}" for w in (d["fit"].get("warnings") or [])]
    if warns:
        L.append("Fit warnings:\n")
        L.extend(f"- {w}" for w in warns)
        L.append("")
    L += _data_constrained_md(r)
    L.append("### How much the answer moves\n")
    L.append("| source | N_opt | D_opt | a (N ∝ C^a) | b (D ∝ C^b) | convention |\n|---|---|---|---|---|---|")
    for name, v in rec["spread"].items():
        L.append(f"| {name} | {fmt(v.get('n_opt'))} | {fmt(v.get('d_opt'))} | {fmt(v.get('a'))} | "
                 f"{fmt(v.get('b'))} | {v.get('convention', '')} |")
    L.append(f"\nN_opt spans a factor {fmt(rec['spread_factor_n_opt'])} across all rows and "
             f"{fmt(rec['spread_factor_approaches'])} across this sweep's approaches. Published laws were fitted "
             "on decoder-only text models (C = 6ND); their rows show the scale of disagreement, not a correction.\n")
    L += _conventions_md(r)
    if r.get("seqlen"):
        L += length_law.markdown(r["seqlen"])
    # the fitted laws
    L.append("## Fitted laws\n")
    L.append("L(N, D) = E + A / N^alpha + B / D^beta (Approach 3; Huber on log-loss, delta 1e-3).\n")
    L.append("| loss | E | A | B | alpha | beta | a | b |\n|---|---|---|---|---|---|---|---|")
    fit = r.get("fit") or {}
    if fit.get("approach3"):
        L.append(_law_row("total", fit["approach3"]))
    for m, d in (r.get("modality_laws") or {}).items():
        if d["fit"].get("approach3"):
            L.append(_law_row(m, d["fit"]["approach3"]))
    L.append("")
    for name in ("approach1", "approach2"):
        p = fit.get(name)
        if isinstance(p, dict) and "a" in p:
            ci = p.get("ci") or {}
            extra = ", ".join(f"{k} {fmt(p[k], 4)}" + (f" [{fmt(ci[k][0])}, {fmt(ci[k][1])}]" if ci.get(k) else "")
                              for k in ("a", "b") if k in p)
            L.append(f"- {name.replace('approach', 'Approach ')}: {extra}")
    if r.get("modality_laws"):
        L.append("\nPer-modality compute-optimal allocation at the budget:\n")
        L.append("| modality | N_opt | D_opt | predicted loss |\n|---|---|---|---|")
        for m, d in r["modality_laws"].items():
            L.append(f"| {m} | {fmt(d['n_opt'])} | {fmt(d['d_opt'])} | {fmt(d['loss_at_budget'], 4)} |")
    L.append("")
    L += _approach2_md(fit)
    L += _modality_md(r)
    L += _holdout_md(r)
    L += _vqa_md(r)
    # figures
    L.append("## Figures\n")
    captions = {
        "loss_vs_compute": "Final eval loss vs compute, the empirical frontier and the fitted law at its optimum.",
        "isoflop": "IsoFLOP curves: loss vs N at fixed compute, parabola minima (stars), the fitted law (dashed) at "
                   "the (N, D) the runs of each budget had; its gap to the points is the law's residual there.",
        "allocation": "N_opt and D_opt vs compute: IsoFLOP minima, Approach 3 with its bootstrap band, "
                      "Approaches 1/2, and Kaplan 2020 / Chinchilla 2022 / Epoch 2024 (their C = 6ND).",
        "loss_vs_seqlen": "Loss vs sequence length at fixed size and tokens; loss vs compute by length.",
        "loss_by_modality": "Per-modality eval loss vs compute with each modality's own law.",
        "residuals": "Residuals of the fitted law (log observed − log fitted) vs compute and vs D/N.",
        "task_metrics": "Task metrics (held-out) vs compute.",
    }
    for name, paths in (r.get("figures") or {}).items():
        png = next((p for p in paths if p.endswith(".png")), paths[0])
        svg = next((p for p in paths if p.endswith(".svg")), None)
        L.append(f"**{name}** — {captions.get(name, '')} ({'[SVG](' + svg + ')' if svg else ''})\n")
        L.append(f"![{name}]({png})\n")
    for name, why in (r.get("figures_not_drawn") or {}).items():
        L.append(f"*{name}* not drawn: {why}.\n")
    # comparison
    L += _shared_tasks_md(r)
    L.append("### Secondary: earlier models by size and data, placed on this study's law\n")
    L.append("Facts as published (source per row); no shared task or metric. 'Our law' is the loss the fitted law predicts at that N and "
             "D — **an extrapolation across domains, tokenizers and architectures**: it says where a model of that "
             "size and data would sit on *this* study's curve, not how good that model is.\n")
    L.append("| model | params | training data | tokens / samples seen | training compute | our law: loss at (N, D) "
             "| our law: D_opt for that N | source |\n|---|---|---|---|---|---|---|---|")
    for row in r.get("comparison") or []:
        compute = row["compute_text"]
        if row.get("compute_6nd"):
            compute += f" (6ND ≈ {fmt(row['compute_6nd'])} FLOPs, our estimate)"
        loss = fmt(row["predicted_loss"], 4) if row.get("predicted_loss") else "n/a (N or D not published)"
        d_opt = fmt(row["d_opt_for_n"]) if row.get("d_opt_for_n") else "n/a"
        L.append(f"| {row['model']} | {row['params_text']} | {row['data']} | {row['seen_text']} | {compute} | "
                 f"{loss} | {d_opt} | {row['source']} |")
    L.append("")
    # runs
    L.append("## Runs\n")
    use = r.get("sweep")
    if use:
        util = use.get("utilisation")
        L.append(f"The sweep trained {fmt(use.get('pf_days'))} PF-days in {fmt(use.get('wall_s'))} s of wall time "
                 f"({fmt(use.get('train_s'))} run-seconds in training steps); utilisation (model FLOPs / (wall x "
                 f"measured peak of the devices in use)) {fmt(100 * util) + '%' if util is not None else '-'}.\n")
    rows = r.get("runs") or []
    mods = sorted({k for row in rows for k in row if k.startswith("loss/")})
    head = ["run_id", "status", "size", "params", "tokens", "flops", "pf_days", "enc_len", "dec_len", "loss",
            *mods, "mfu"]
    L.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        L.append("| " + " | ".join(fmt(row.get(h)) if not isinstance(row.get(h), str) else row[h]
                                   for h in head) + " |")
    L.append("")
    return "\n".join(L)
