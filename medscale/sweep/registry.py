"""The results registry: run directories on disk -> pandas tables.

Layout (docs/interfaces.md): ``<results>/<sweep>/<run_id>/`` holds ``config.json``, ``metrics.jsonl`` and
``summary.json`` (written by training), ``checkpoints/`` (git-ignored), and two files of the sweep launcher:
``sweep.json`` (the run's plan: size label, budget, planned params/tokens/FLOPs, the exact train command) and
``run.lock`` while a launcher or ``medscale train`` holds it (``medscale.rundir``). ``train.log`` holds the training process's output.

A run's state is derived from disk only: summary.json -> its status (done | diverged | failed); else a live
``run.lock`` (held by a launcher or by ``medscale train``) -> running; else checkpoints or metrics -> interrupted (resumable); else pending.
"""

from __future__ import annotations

import json
import math
import os

from medscale import accounting, rundir
from medscale.configs import spec_from_config
from medscale.errors import UserError
from medscale.hardware import PF_DAY
from medscale.rundir import read_json
from medscale.sweep.design import expand, load_definition

STATES = ("pending", "running", "interrupted", "done", "failed", "diverged")
COLUMNS = ["run_id", "sweep", "status", "size", "params", "params_total", "params_embedding", "tokens", "flops",
           "hardware_flops", "pf_days", "enc_len", "dec_len", "batch_size", "steps", "loss", "fixed_loss",
           "fixed_ref_enc_len", "train_loss",
           "mfu", "wall_s", "device_kind", "device_count", "budget", "lr", "seed", "error", "params_heads",
           "dataset", "data_source", "unique_examples", "epochs", "caption_entropy_floor"]
CURVE_COLUMNS = ["run_id", "sweep", "status", "size", "params", "params_total", "enc_len", "budget", "step",
                 "tokens", "flops", "loss"]


def run_state(run_dir: str, locks: bool = True) -> str:
    """The state of one run directory (see the module docstring); ``locks=False`` ignores locks (for the
    launcher that holds one)."""
    try:
        summary = read_json(rundir.path(run_dir, rundir.SUMMARY))
    except UserError:
        return "failed"
    if summary is not None:
        status = summary.get("status", "done")
        return status if status in ("done", "failed", "diverged") else "failed"
    if locks and rundir.lock_live(rundir.path(run_dir, rundir.LOCK)):
        return "running"
    ckpt = rundir.path(run_dir, rundir.CHECKPOINTS)
    if (os.path.isdir(ckpt) and os.listdir(ckpt)) or _nonempty(rundir.path(run_dir, rundir.METRICS)):
        return "interrupted"
    return "pending"


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl, keeping the last row per (kind, step); a torn last line is ignored."""
    rows = {}
    try:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill mid-write
                rows[(row.get("kind"), row.get("step"))] = row
    except FileNotFoundError:
        return []
    return sorted(rows.values(), key=lambda r: (str(r.get("kind")), r.get("step") or 0))


def last_train_row(path: str) -> dict | None:
    """The last complete train row of a metrics.jsonl, reading only its tail."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            return row
    return None


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in (rundir.PLAN, rundir.SUMMARY, rundir.CONFIG))


def run_dirs(path: str) -> list[str]:
    """Run directories under ``path``: a run dir itself, a sweep dir, or a results root of sweep dirs."""
    if not os.path.isdir(path):
        raise UserError(f"results folder {path!r} not found; run a sweep first or give its folder")
    if is_run_dir(path):
        return [path]
    out = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if is_run_dir(sub):
            out.append(sub)
        elif os.path.isdir(sub) and not name.startswith("."):
            out += [os.path.join(sub, n) for n in sorted(os.listdir(sub)) if is_run_dir(os.path.join(sub, n))]
    return out


def _nan(x):
    return float("nan") if x is None else x


def run_record(run_dir: str) -> dict:
    """One row of the registry for a run directory (planned values until the run has a summary)."""
    plan = read_json(rundir.path(run_dir, rundir.PLAN)) or {}
    try:
        summary = read_json(rundir.path(run_dir, rundir.SUMMARY))
    except UserError as exc:
        summary = {"status": "failed", "error": str(exc)}
    state = run_state(run_dir)
    summary = summary or {}
    config = summary.get("config") or read_json(rundir.path(run_dir, rundir.CONFIG)) or {}
    params = summary.get("params") or plan.get("params") or {}
    if not params and config:
        params = _params_from_config(config)
    train_cfg = config.get("train", {}) if isinstance(config, dict) else {}
    row = {
        "run_id": summary.get("run_id") or plan.get("run_id") or os.path.basename(os.path.normpath(run_dir)),
        "sweep": plan.get("sweep") or summary.get("sweep")
        or os.path.basename(os.path.dirname(os.path.normpath(run_dir))),
        "status": state,
        "size": plan.get("size") or summary.get("size") or (config.get("model", {}) or {}).get("size"),
        "params": _nan(params.get("non_embedding")),
        "params_total": _nan(params.get("total")),
        "params_embedding": _nan(params.get("embedding")),
        "tokens": _nan(summary.get("tokens", plan.get("tokens"))),
        "flops": _nan(summary.get("model_flops", plan.get("model_flops"))),
        "hardware_flops": _nan(summary.get("hardware_flops", plan.get("hardware_flops"))),
        "pf_days": _nan(summary.get("pf_days")),
        "enc_len": _nan(summary.get("enc_len", plan.get("enc_len"))),
        "dec_len": _nan(summary.get("dec_len", plan.get("dec_len"))),
        "batch_size": _nan(summary.get("batch_size", plan.get("batch_size"))),
        "steps": _nan(summary.get("steps", plan.get("steps"))),
        "loss": _nan(summary.get("final_eval_loss")),
        "fixed_loss": _nan(summary.get("final_fixed_eval_loss")),  # length-independent eval (docs/longseq.md)
        "fixed_ref_enc_len": _nan((summary.get("fixed_eval") or {}).get("ref_enc_len")),
        "train_loss": _nan(summary.get("final_train_loss")),
        "mfu": _nan(summary.get("mfu")),
        "wall_s": _nan(summary.get("wall_s")),
        "device_kind": summary.get("device_kind"),
        "device_count": _nan(summary.get("device_count")),
        "budget": _nan(plan.get("budget")),
        "lr": _nan(plan.get("lr", train_cfg.get("lr"))),
        "seed": _nan(plan.get("seed", config.get("seed") if isinstance(config, dict) else None)),
        "error": summary.get("error"),
        "params_heads": _nan(params.get("heads")),
    }
    data = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    data_cfg = config.get("data") if isinstance(config, dict) else None
    row["dataset"] = data_cfg.get("dataset") if isinstance(data_cfg, dict) else None
    row["data_source"] = data.get("source")
    for key in ("unique_examples", "epochs", "caption_entropy_floor"):
        row[key] = _num(data.get(key))
    if isinstance(row["pf_days"], float) and math.isnan(row["pf_days"]) and not math.isnan(row["flops"]):
        row["pf_days"] = row["flops"] / PF_DAY
    for name, value in (summary.get("final_eval_loss_by_modality") or {}).items():
        row[f"loss/{name}"] = _nan(value)
    for name, value in (summary.get("final_fixed_eval_loss_by_modality") or {}).items():
        row[f"fixed_loss/{name}"] = _nan(value)
    for name, value in (summary.get("final_train_loss_by_modality") or {}).items():
        row[f"train_loss/{name}"] = _nan(value)
    return row


def _num(x) -> float:
    """A summary's number, NaN when missing or not a number (a run trained before the key existed)."""
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _params_from_config(config: dict) -> dict:
    """Parameter counts of a run that has only its config.json (e.g. trained by hand, not by a sweep)."""
    try:
        import ml_collections

        return dict(accounting.param_counts(spec_from_config(ml_collections.ConfigDict(config))))
    except Exception:  # noqa: BLE001 - an unreadable config leaves the counts unknown (NaN), never a crash
        return {}


def _resolve(path: str, results: str | None = None) -> list[tuple[str, object]]:
    """(run dir, planned Run or None) pairs: a sweep definition (.py) gives every planned run under
    ``results`` (default ``results``), a folder its run dirs."""
    if path.endswith(".py") or (":" in os.path.basename(path) and ".py:" in path):
        sweep = load_definition(path)
        root = results or "results"
        return [(os.path.join(root, sweep.name, r.run_id), r) for r in expand(sweep)]
    return [(d, None) for d in run_dirs(path)]


def load_sweep(path: str, results: str | None = None):
    """One row per run (columns ``COLUMNS`` + ``loss/<modality>``) of a results folder or a sweep definition.

    ``path``: a run dir, a sweep dir (``results/<sweep>``), a results root of several sweeps, or a sweep
    definition ``.py`` (then runs not yet started appear as pending; ``results`` is its results root)."""
    import pandas as pd

    rows = []
    for d, plan in _resolve(path, results):
        rows.append(run_record(d) if os.path.isdir(d) else plan_row(plan))
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=float)
    extra = sorted(c for c in df.columns if c not in COLUMNS)
    return df[COLUMNS + extra].reset_index(drop=True)


def plan_row(run) -> dict:
    """A registry row for a planned run that has no directory yet."""
    return {"run_id": run.run_id, "sweep": run.sweep, "status": "pending", "size": run.size,
            "params": run.params.get("non_embedding"), "params_total": run.params.get("total"),
            "params_embedding": run.params.get("embedding"), "params_heads": run.params.get("heads"),
            "tokens": run.tokens, "flops": run.model_flops,
            "hardware_flops": run.hardware_flops, "pf_days": run.model_flops / PF_DAY, "enc_len": run.enc_len,
            "dec_len": run.dec_len, "batch_size": run.batch_size, "steps": run.steps,
            "budget": float("nan") if run.budget is None else run.budget, "lr": run.lr, "seed": run.seed}


def load_curves(path: str, results: str | None = None):
    """Evaluation curves: one row per (run, eval step), the last row per step kept; ``params`` non-embedding."""
    import pandas as pd

    rows = []
    for d, _ in _resolve(path, results):
        if not os.path.isdir(d):
            continue
        rec = run_record(d)
        for m in read_metrics(rundir.path(d, rundir.METRICS)):
            if m.get("kind") != "eval" or m.get("loss") is None:
                continue
            rows.append({"run_id": rec["run_id"], "sweep": rec["sweep"], "status": rec["status"],
                         "size": rec["size"], "params": rec["params"], "params_total": rec["params_total"],
                         "enc_len": rec["enc_len"], "budget": rec["budget"], "step": m.get("step"),
                         "tokens": m.get("tokens"), "flops": m.get("flops"), "loss": m.get("loss")})
    df = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    return df.sort_values(["run_id", "step"]).reset_index(drop=True)


def export(path: str, out: str, results: str | None = None) -> str:
    """Write ``load_sweep(path)`` to ``out`` (.csv or .parquet), atomically; returns ``out``."""
    df = load_sweep(path, results)
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".csv", ".parquet"):
        raise UserError(f"export to {out!r}: the file must end in .csv or .parquet")
    with rundir.atomic_path(out) as tmp:
        if ext == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    return out


# ---------------------------------------------------------------------------------------------- use of the machine
LAUNCHES = "launches.jsonl"  # in a sweep folder: one row per finished launch of the local launcher
SPLIT_PARTS = ("startup_s", "compile_s", "train_s", "eval_s", "checkpoint_s", "task_eval_s", "other_s")


def append_launch(sweep_dir: str, row: dict) -> None:
    """Add one launch's row (:func:`medscale.sweep.launcher.Launcher.launch`'s usage keys) to the sweep's
    ``launches.jsonl`` (appended, one JSON line; a torn last line is ignored by readers)."""
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, LAUNCHES), "a") as fh:
        fh.write(json.dumps(row, default=rundir.json_default) + "\n")


def read_launches(sweep_dir: str) -> list[dict]:
    rows = []
    try:
        with open(os.path.join(sweep_dir, LAUNCHES)) as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return rows


def usage(launches: list[dict], pf_days: float | None = None) -> dict:
    """The use of the machine over ``launches`` (rows of :data:`LAUNCHES`): ``utilisation`` = model FLOPs
    trained / (wall seconds x peak FLOP/s of the devices in use), ``wall_s``, ``train_s`` (seconds the runs
    spent in training steps, summed over runs), ``split`` (run-seconds by part, summed), ``model_flops``;
    ``pf_days``: the given total (the whole sweep's), else the FLOPs trained in these launches."""
    wall = sum(float(r.get("wall_s") or 0.0) for r in launches)
    flops = sum(float(r.get("model_flops") or 0.0) for r in launches)
    capacity = sum(float(r.get("wall_s") or 0.0) * float(r["peak_flops"]) for r in launches if r.get("peak_flops"))
    split = {k: sum(float((r.get("split") or {}).get(k) or 0.0) for r in launches) for k in SPLIT_PARTS}
    return {"utilisation": flops / capacity if capacity > 0 else None,
            "pf_days": pf_days if pf_days is not None else flops / PF_DAY, "wall_s": wall,
            "train_s": split["train_s"], "model_flops": flops, "split": split, "launches": len(launches)}


def sweep_usage(sweep_dir: str, df=None) -> dict | None:
    """:func:`usage` of a sweep folder: its launches, and the PF-days of all its runs' recorded training
    (``df``: its :func:`load_sweep` table, when already loaded); None when no launch was recorded."""
    launches = read_launches(sweep_dir)
    if not launches:
        return None
    if df is None:
        df = load_sweep(sweep_dir)
    pf = df["pf_days"].where(df["status"].isin(["done", "diverged", "failed"])).sum() if len(df) else 0.0
    return usage(launches, pf_days=float(pf))


def usage_line(use: dict) -> str:
    """One line of :func:`usage`'s figures (or a launch's): utilisation, model FLOPs (when given), wall and
    training seconds, PF-days; ``-`` for a figure that is missing."""
    def fmt(x, spec):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    util = use.get("utilisation")
    train_s = use.get("train_s", (use.get("split") or {}).get("train_s"))
    flops = f"{fmt(use['model_flops'], '.3g')} model FLOPs in " if "model_flops" in use else ""
    return (f"utilisation {'-' if util is None else format(100 * util, '.1f') + '%'}"
            f" ({flops}{fmt(use.get('wall_s'), '.0f')} s wall; "
            f"{fmt(train_s, '.0f')} run-s in training steps), {fmt(use.get('pf_days'), '.3g')} PF-days")
