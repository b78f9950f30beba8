"""Tables of runs for the fits: a CSV/Parquet file or a results folder of the registry, checked.

Canonical columns: ``params`` (N), ``tokens`` (D), ``loss``; optional ``flops`` (C), ``budget`` (the IsoFLOP
label), ``run_id``, ``step``, ``params_total`` and ``params_heads`` (other parameter conventions, for the fit's
convention table; NaN allowed). Other names are mapped with ``columns={"params": "Model Size", ...}``.
When ``tokens`` is absent and ``flops`` present, D = C / (6 N) (the convention of the published data: e.g. the
Chinchilla points digitised by Epoch AI come as N and C); when ``flops`` is absent, C = 6 N D.
"""

from __future__ import annotations

import os

import numpy as np

from medscale.errors import UserError
from medscale.sweep.registry import load_curves, load_sweep

CANONICAL = ("params", "tokens", "loss", "flops", "budget", "run_id", "step", "params_total", "params_heads")
POSITIVE = ("params", "tokens", "loss", "flops")


def parse_col_args(items) -> dict:
    """``["params=Model Size", ...]`` -> ``{"params": "Model Size"}``."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"--col {item!r}: write CANONICAL=SOURCE, e.g. --col 'params=Model Size'")
        key, src = item.split("=", 1)
        key = key.strip()
        if key not in CANONICAL:
            raise UserError(f"--col {item!r}: {key!r} is not one of {', '.join(CANONICAL)}")
        out[key] = src.strip()
    return out


def read_table(path: str, columns: dict | None = None):
    """Runs from a CSV/Parquet file or a registry results folder -> (points, curves, source).

    ``points``: one row per run (a run's last row by ``step`` when the table holds curves), only finished runs;
    ``curves``: every row (for Approach 1), or None when each run has one row; ``source``: a dict describing
    where the data came from (path, kind, conventions)."""
    import pandas as pd

    if not os.path.exists(path):
        raise UserError(f"input {path} not found")
    source = {"path": os.path.abspath(path)}
    if os.path.isdir(path):
        df, curves = _read_registry(path)
        source["kind"] = "registry"
    else:
        low = path.lower()
        try:
            if low.endswith((".parquet", ".pq")):
                df = pd.read_parquet(path)
            elif low.endswith((".csv", ".tsv", ".txt")):
                df = pd.read_csv(path, sep="\t" if low.endswith(".tsv") else ",")
            else:
                raise UserError(f"input {path}: give a .csv, .tsv or .parquet file, or a results folder")
        except UserError:
            raise
        except (ValueError, OSError, ImportError, pd.errors.ParserError) as exc:  # a user's unreadable file
            raise UserError(f"input {path} does not parse ({type(exc).__name__}: {exc})") from None
        source["kind"] = "table"
        curves = None
    df = canonicalise(df, columns or {}, where=path)
    source["conventions"] = df.attrs.get("conventions", {})
    if curves is not None:
        curves = canonicalise(curves, {}, where=f"{path} (curves)")
        if curves.groupby(_run_key(curves)).size().max() < 2:
            curves = None
    elif "step" in df.columns and df.groupby(_run_key(df)).size().max() > 1:
        curves = df
        df = last_rows(df)
    source["n_runs"] = len(df)
    return df.reset_index(drop=True), curves, source


def _run_key(df):
    return "run_id" if "run_id" in df.columns else "params"


def last_rows(curves):
    """One row per run: the row of the largest step (or tokens when there is no step)."""
    order = "step" if "step" in curves.columns else "tokens"
    return curves.sort_values(order).groupby(_run_key(curves), sort=False).tail(1).sort_index()


def _read_registry(path):
    import pandas as pd

    runs = load_sweep(path)
    if "status" in runs.columns:
        runs = runs[runs["status"] == "done"]
    if len(runs) == 0:
        raise UserError(f"results folder {path} has no finished (status done) runs to fit")
    keep = [c for c in CANONICAL if c in runs.columns]
    try:
        curves = load_curves(path)
    except (UserError, FileNotFoundError, KeyError, ValueError):  # no eval rows: final losses still fit
        curves = None
    if curves is not None and len(curves):
        curves = curves[curves["run_id"].isin(set(runs["run_id"]))]
        curves = curves[[c for c in CANONICAL if c in curves.columns]]
        # eval rows before any training (step 0: no tokens, no FLOPs yet) are not points of a curve
        ok = np.ones(len(curves), bool)
        for c in ("params", "tokens", "flops", "loss"):
            if c in curves.columns:
                v = pd.to_numeric(curves[c], errors="coerce").to_numpy(np.float64)
                ok &= np.isfinite(v) & (v > 0)
        curves = curves[ok] if ok.any() else None
    else:
        curves = None
    return runs[keep], curves


def canonicalise(df, columns: dict, where: str = "input"):
    """Rename, derive tokens/flops, and check: raises UserError naming what to change."""
    import pandas as pd

    rename = {}
    for key, src in columns.items():
        if src not in df.columns:
            raise UserError(f"{where}: column {src!r} (given for {key}) not found; columns are {list(df.columns)}")
        rename[src] = key
    df = df.rename(columns=rename)
    missing = [c for c in ("params", "loss") if c not in df.columns]
    if "tokens" not in df.columns and "flops" not in df.columns:
        missing.append("tokens (or flops)")
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(missing)}; columns are {list(df.columns)} "
                        f"(map other names with --col params='Model Size')")
    df = df[[c for c in CANONICAL if c in df.columns]].copy()
    for c in POSITIVE + ("budget", "step", "params_total", "params_heads"):
        if c in df.columns:
            try:
                df[c] = pd.to_numeric(df[c], errors="raise").astype(np.float64)
            except (ValueError, TypeError):
                raise UserError(f"{where}: column {c} has non-numeric values") from None
    conventions = {}
    if "tokens" not in df.columns:
        df["tokens"] = df["flops"] / (6.0 * df["params"])
        conventions["tokens"] = "flops / (6 params)"
    if "flops" not in df.columns:
        df["flops"] = 6.0 * df["params"] * df["tokens"]
        conventions["flops"] = "6 params tokens"
    for c in POSITIVE:
        v = df[c].to_numpy()
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"{where}: column {c} has {int(bad.sum())} NaN or non-positive value(s) "
                            f"(first at row {row}: {v[row]!r}); remove or fix those rows")
    if "budget" in df.columns:
        b = df["budget"].to_numpy()
        if (b[np.isfinite(b)] <= 0).any():
            raise UserError(f"{where}: column budget has non-positive values")
    if "run_id" in df.columns:
        df["run_id"] = df["run_id"].astype(str)
    df.attrs["conventions"] = conventions
    return df
