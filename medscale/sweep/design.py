"""Sweep designs: a sweep definition file -> the list of runs it stands for.

A sweep definition is an ml_collections Python file whose ``get_config()`` returns a ``ConfigDict`` (see
``docs/sweep.md`` and ``sweeps/*.py``). Fields:

- ``name``: the sweep's name; its runs live in ``<results>/<name>/<run_id>/``.
- ``base``: ``FILE[:ARG]`` of the training config every run starts from (a path, or a name in
  ``medscale/configs``); ``set``: dotted overrides applied to every run.
- ``design``: ``"grid"`` (every size x encoder length x token budget) or ``"isoflop"`` (per FLOP budget, sizes
  spread log-uniformly around the expected compute-optimal size; each run's steps set so that its accounted
  model FLOPs equal the budget).
- ``sizes``: ladder names (``"xs"``) or explicit shapes ``"d<d_model>l<layers>[h<heads>][f<d_ff>]"`` (e.g.
  ``"d48l2"``: d_model 48, 2 encoder + 2 decoder layers, d_ff 4 x d_model). For ``isoflop`` these are the
  candidates the design picks from.
- ``enc_lens`` (required), ``dec_len``, ``batch_size`` (optional: None keeps the base config's);
  ``batch_per_budget`` (isoflop, a list as long as ``budgets``): each budget's batch size, so the batch grows
  with the run while every size of one budget shares it; or ``batch_steps`` (isoflop): each run's batch is the
  largest power of two in [``batch_min``, ``batch_max``] that leaves it at least ``batch_steps`` steps (the batch
  grows with the run's tokens, and a large model on few tokens still takes enough steps).
- grid: ``tokens`` (token budgets, encoder + decoder tokens). isoflop: ``budgets`` (model FLOPs per run; or a
  dict from encoder length, as a string, to its own budgets, so that no IsoFLOP group mixes lengths),
  ``per_budget`` (sizes per budget), ``spread`` (ratio of the largest to the smallest target size), ``law``
  (published law for the expected optimum, ``medscale.laws``), ``center_factor`` (multiplies it),
  ``min_steps`` (sizes that would train fewer steps are dropped).
- ``num_trains`` (grid): one run per entry of ``data.num_train`` (0: the unbounded synthetic stream, ``n > 0``: its
  first ``n`` scenes cycled), crossed with the token budgets, so one design trains the same sizes on fresh and on
  repeated data (``sweeps/repetition.py``); the run id's prefix gets ``-u<n>`` (``-u0``: fresh).
- ``lr``: a float, or a dict from size name to lr with an optional ``"default"``; ``lrs``: a list of peak rates
  instead, one run per rate (a tuning sweep; the rate is part of the run id's prefix); ``lr_factors``: one run
  per factor times each size's own rate (checking a rule; the factor is part of the prefix).
- ``per_size``: optional dict from size name to extra overrides for that size's runs (e.g. a smaller batch or
  ``model.remat=full`` for the largest sizes); they are part of the run id.
- ``seeds``: one run per seed; ``center_seeds`` (isoflop): extra seeds for the size nearest each budget's expected
  optimum (the design's centre), so seed noise is measured where the fit needs it.
- ``evals_per_run`` / ``checkpoints_per_run`` / ``warmup_frac``: schedule of evaluations, checkpoints and warmup
  relative to each run's own steps (None keeps the base config's).
- ``eval_fraction``: the periodic evaluations' FLOPs as a fraction of the run's training FLOPs (an evaluation
  is a forward pass over ``train.eval_batches x eval_batch_size`` examples, a third of a training step's FLOPs
  per example): as many evaluations as fit (at least the final one, at most ``evals_per_run`` when given).
- ``eval_batch_size``: examples per evaluation batch for every run (so runs of any batch size are scored on the
  same examples; None keeps the base config's).
- ``task_eval_fraction``: the end-of-run task evaluation sized to the run: it decodes the base config's
  ``train.task_eval_examples`` held-out examples, each counted as one training example's FLOPs, when that is at
  most this fraction of the run's ``steps x batch`` training examples, and is off otherwise (a fixed number of
  examples, so generation compiles once per shape).

Run ids are ``<readable prefix>-<8 hex>``: the prefix names size, encoder length, budget and seed; the hash is
of the base and every override, so an id is stable across launches and changes when the run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re

from medscale import accounting
from medscale.configs import call_get_config, load_config, spec_from_config
from medscale.configs.ladder import ladder_shape
from medscale.errors import UserError
from medscale.laws import PUBLISHED_CONVENTION, load_law

log = logging.getLogger(__name__)

_SHAPE_RE = re.compile(r"^d(\d+)l(\d+)(?:h(\d+))?(?:f(\d+))?$")

DEFAULTS = {
    "set": (), "design": "grid", "sizes": (), "enc_lens": (), "dec_len": None, "batch_size": None,
    "tokens": (), "budgets": (), "per_budget": 4, "spread": 8.0, "law": "chinchilla", "center_factor": 1.0,
    "min_steps": 10, "lr": None, "seeds": (0,), "evals_per_run": None, "checkpoints_per_run": None,
    "warmup_frac": None, "params": "non_embedding", "per_size": None, "center_seeds": (), "eval_fraction": None,
    "eval_batch_size": None, "task_eval_fraction": None, "batch_per_budget": (), "lrs": (),
    "lr_factors": (), "batch_steps": None, "batch_min": 4, "batch_max": 64, "num_trains": (),
}


@dataclasses.dataclass
class Run:
    """One planned run of a sweep."""

    run_id: str
    sweep: str
    design: str
    size: str
    base: str
    overrides: list[str]
    enc_len: int
    dec_len: int
    batch_size: int
    steps: int
    tokens: int  # encoder + decoder tokens the run will see
    model_flops: float  # accounted model FLOPs of the whole run
    hardware_flops: float
    params: dict  # {total, embedding, non_embedding, heads}
    lr: float
    seed: int
    budget: float | None  # IsoFLOP budget (model FLOPs); None for grid runs
    token_budget: int | None  # grid token budget

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def plan(self) -> dict:
        """What ``sweep.json`` holds: the run's fields and its train command, with ``RUN_DIR`` standing for the
        folder holding the file (so the record does not depend on where the results root is)."""
        out = self.to_dict()
        out["command"] = ["medscale", *self.train_argv("RUN_DIR"), "--quiet"]
        return out

    def workdir(self, results: str) -> str:
        return os.path.join(results, self.sweep, self.run_id)

    def train_argv(self, workdir: str) -> list[str]:
        """Arguments after ``medscale`` that train this run into ``workdir``."""
        argv = ["train", "--config", self.base]
        for item in self.overrides:
            argv += ["--set", item]
        return argv + ["--workdir", workdir]


def shape_of(size: str) -> dict | None:
    """Model shape fields of an explicit size name ``d<d>l<L>[h<H>][f<F>]``; None for a ladder name."""
    m = _SHAPE_RE.match(size)
    if not m:
        ladder_shape(size)  # raises UserError naming the known sizes
        return None
    d_model, layers = int(m.group(1)), int(m.group(2))
    heads = int(m.group(3)) if m.group(3) else max(1, d_model // 32)
    if m.group(3) and (heads <= 0 or d_model % heads):
        raise UserError(f"size {size!r}: {heads} heads do not divide d_model {d_model}")
    while d_model % heads:
        heads -= 1
    d_ff = int(m.group(4)) if m.group(4) else 4 * d_model
    if d_model <= 0 or layers <= 0 or d_ff <= 0:
        raise UserError(f"size {size!r}: d_model, layers and d_ff must be positive")
    return {"d_model": d_model, "enc_layers": layers, "dec_layers": layers, "num_heads": heads, "d_ff": d_ff,
            "mlp": "gelu"}


def size_overrides(size: str) -> list[str]:
    shape = shape_of(size)
    if shape is None:
        return [f"model.size={size}"]
    return ["model.size="] + [f"model.{k}={v}" for k, v in shape.items()]


def load_definition(path: str):
    """Load a sweep definition file (``FILE[:ARG]``) into a ConfigDict with every field present."""
    import ml_collections

    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise UserError(f"sweep definition {file!r} not found; give the path of a sweep .py file (see sweeps/)")

    cfg = call_get_config(file, arg, what="sweep definition")
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UserError(f"sweep definition {file}: get_config() must return an ml_collections.ConfigDict")
    return normalize(cfg, source=file)


def normalize(cfg, source: str = "sweep"):
    """Fill defaults and check the fields of a sweep definition (a ConfigDict); returns a new ConfigDict."""
    import ml_collections

    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = sorted(set(data) - set(DEFAULTS) - {"name", "base", "budgets_by_enc"})
    if unknown:
        raise UserError(f"{source}: unknown sweep field(s) {', '.join(unknown)}; known: "
                        + ", ".join(["name", "base", *DEFAULTS]))
    for key in ("name", "base"):
        if not data.get(key) or not isinstance(data[key], str):
            raise UserError(f"{source}: the sweep needs a string field {key!r}")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", data["name"]):
        raise UserError(f"{source}: sweep name {data['name']!r} must be letters, digits, '_', '-', '.'")
    out = dict(DEFAULTS)
    out.update(data)
    by_enc = None
    if data.get("budgets_by_enc"):  # an already normalized definition
        out["budgets"] = data["budgets_by_enc"]
    if isinstance(out["budgets"], dict):
        by_enc = {str(k): tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in out["budgets"].items()}
        missing = sorted({str(e) for e in out["enc_lens"]} ^ set(by_enc))
        if missing:
            raise UserError(f"{source}: budgets per encoder length must name exactly the enc_lens "
                            f"(mismatch: {', '.join(missing)})")
        out["budgets"] = tuple(b for v in by_enc.values() for b in v)
    for key in ("set", "sizes", "enc_lens", "tokens", "budgets", "seeds", "center_seeds", "batch_per_budget", "lrs",
                "lr_factors", "num_trains"):
        value = out[key]
        out[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if out["design"] not in ("grid", "isoflop"):
        raise UserError(f"{source}: design must be 'grid' or 'isoflop', not {out['design']!r}")
    if not out["sizes"]:
        raise UserError(f"{source}: list at least one size in 'sizes'")
    if not out["enc_lens"]:
        raise UserError(f"{source}: list at least one encoder length in 'enc_lens'")
    if out["design"] == "grid" and not out["tokens"]:
        raise UserError(f"{source}: a grid design needs 'tokens' (token budgets)")
    if out["design"] == "isoflop":
        if not out["budgets"]:
            raise UserError(f"{source}: an isoflop design needs 'budgets' (model FLOPs per run)")
        if out["per_budget"] < 1 or out["spread"] < 1:
            raise UserError(f"{source}: per_budget must be >= 1 and spread >= 1")
    for key in ("tokens", "budgets"):
        if any((not isinstance(v, (int, float))) or v <= 0 for v in out[key]):
            raise UserError(f"{source}: {key} must be positive numbers")
    if out["per_size"] is not None:
        if not isinstance(out["per_size"], dict):
            raise UserError(f"{source}: per_size must be a dict from size name to a list of overrides")
        stray = sorted(set(out["per_size"]) - {str(x) for x in out["sizes"]})
        if stray:
            raise UserError(f"{source}: per_size names sizes not in 'sizes': {', '.join(stray)}")
    for key in ("eval_fraction", "task_eval_fraction"):
        if out[key] is not None and not (isinstance(out[key], (int, float)) and 0 < out[key] <= 1):
            raise UserError(f"{source}: {key} must be a number in (0, 1], not {out[key]!r}")
    if out["num_trains"]:
        if out["design"] != "grid":
            raise UserError(f"{source}: num_trains needs a grid design (token budgets crossed with data sizes)")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in out["num_trains"]):
            raise UserError(f"{source}: num_trains must be whole numbers >= 0 (0: the unbounded stream)")
    if out["center_seeds"] and out["design"] != "isoflop":
        raise UserError(f"{source}: center_seeds needs an isoflop design (it names each budget's centre size)")
    overlap = sorted(set(out["center_seeds"]) & set(out["seeds"]))
    if overlap:
        raise UserError(f"{source}: center_seeds {overlap} are already in seeds; list extra seeds only")
    if any(not isinstance(v, (int, float)) or v <= 0 for v in (*out["lrs"], *out["lr_factors"])):
        raise UserError(f"{source}: lrs and lr_factors must be positive numbers")
    if out["lrs"] and out["lr_factors"]:
        raise UserError(f"{source}: give either lrs or lr_factors, not both")
    if out["lrs"] and out["lr"] is not None:
        raise UserError(f"{source}: give either lr or lrs, not both")
    if out["batch_steps"] is not None:
        if out["design"] != "isoflop" or out["batch_per_budget"]:
            raise UserError(f"{source}: batch_steps needs an isoflop design and no batch_per_budget")
        if not all(isinstance(out[k], int) and out[k] > 0 for k in ("batch_steps", "batch_min", "batch_max")) or \
                out["batch_min"] > out["batch_max"]:
            raise UserError(f"{source}: batch_steps, batch_min and batch_max must be positive integers, "
                            "batch_min <= batch_max")
    if out["batch_per_budget"]:
        if out["design"] != "isoflop" or by_enc or len(out["batch_per_budget"]) != len(out["budgets"]):
            raise UserError(f"{source}: batch_per_budget needs an isoflop design with a list of budgets, one batch "
                            f"size per budget ({len(out['budgets'])} budgets, "
                            f"{len(out['batch_per_budget'])} batch sizes)")
        if any(not isinstance(b, int) or b <= 0 for b in out["batch_per_budget"]):
            raise UserError(f"{source}: batch_per_budget must be positive integers")
    out["budgets_by_enc"] = by_enc
    if out["params"] not in ("non_embedding", "total"):
        raise UserError(f"{source}: params must be 'non_embedding' or 'total'")
    for size in out["sizes"]:
        shape_of(str(size))
    return ml_collections.ConfigDict(out)


def _lr_for(sweep, size: str, base_lr: float) -> float:
    lr = sweep.lr
    if lr is None:
        return float(base_lr)
    if isinstance(lr, (int, float)):
        return float(lr)
    table = lr.to_dict() if hasattr(lr, "to_dict") else dict(lr)
    if size in table:
        return float(table[size])
    if "default" in table:
        return float(table["default"])
    return float(base_lr)


def run_id_for(prefix: str, base: str, overrides: list[str]) -> str:
    payload = json.dumps({"base": base, "overrides": list(overrides)}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def _fmt_num(x: float) -> str:
    """1e12 -> '1e12', 3e11 -> '3e11', 2.5e12 -> '2.5e12', 40000 -> '4e4'."""
    mant, exp = f"{float(x):.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


class _Accountant:
    """Configs, specs, parameter counts and per-step FLOPs per (size, enc_len), computed once each."""

    def __init__(self, sweep):
        self.sweep = sweep
        self._cache = {}

    def common_overrides(self, size: str, enc_len: int, batch: int | None = None) -> list[str]:
        s = self.sweep
        out = list(s.set) + size_overrides(size) + [f"data.enc_len={int(enc_len)}"]
        if s.per_size is not None and size in s.per_size:
            extra = s.per_size[size]
            out += [extra] if isinstance(extra, str) else list(extra)
        if s.dec_len is not None:
            out.append(f"data.dec_len={int(s.dec_len)}")
        if s.batch_size is not None:
            out.append(f"train.batch_size={int(s.batch_size)}")
        if batch is not None:
            out.append(f"train.batch_size={int(batch)}")
        if s.eval_batch_size is not None:
            out.append(f"train.eval_batch_size={int(s.eval_batch_size)}")
        return out

    def __call__(self, size: str, enc_len: int, batch: int | None = None):
        key = (size, enc_len, batch)
        if key not in self._cache:
            cfg = load_config(self.sweep.base, self.common_overrides(size, enc_len, batch))
            spec = spec_from_config(cfg)
            batch = int(cfg.train.batch_size)
            flops = accounting.step_flops(spec, batch, remat=cfg.model.get("remat", "none"),
                                          attention=cfg.model.get("attention", "dense"),
                                          window=cfg.model.get("attention_window", None))
            params = {k: int(v) for k, v in accounting.param_counts(spec).items()}
            self._cache[key] = (cfg, spec, batch, flops, params)
        return self._cache[key]


def _schedule_overrides(sweep, cfg, steps: int) -> list[str]:
    out = [f"train.steps={steps}"]
    if sweep.warmup_frac is not None:
        out.append(f"train.warmup_steps={max(1, round(sweep.warmup_frac * steps))}")
    elif int(cfg.train.warmup_steps) >= steps:
        out.append(f"train.warmup_steps={max(1, steps // 10)}")
    evals = int(sweep.evals_per_run) if sweep.evals_per_run else None
    if sweep.eval_fraction:
        bs = int(cfg.train.batch_size)
        ebs = int(cfg.train.get("eval_batch_size", 0) or 0) or bs
        # one evaluation: a forward pass (a third of a training step's FLOPs per example) over its examples
        fit = int(sweep.eval_fraction * 3 * steps * bs / max(1, int(cfg.train.eval_batches) * ebs))
        evals = max(1, min(fit, evals) if evals else fit)
    if evals:
        out.append(f"train.eval_every={max(1, steps // evals)}")
    if sweep.checkpoints_per_run:
        out.append(f"train.ckpt_every={max(1, steps // int(sweep.checkpoints_per_run))}")
    if sweep.task_eval_fraction:
        n = int(cfg.train.get("task_eval_examples", 0) or 0)
        if n > sweep.task_eval_fraction * steps * int(cfg.train.batch_size):
            out.append("train.task_eval_examples=0")
    return out


def isoflop_sizes(sweep, budget: float, acc: _Accountant, enc_len: int,
                  batch=None) -> tuple[list[str], str | None]:
    """The sizes an IsoFLOP design trains at ``budget`` and its centre: candidates nearest (in log params) to
    ``per_budget`` targets spread log-uniformly over ``spread`` around the law's expected optimum, among
    candidates that would train at least ``min_steps`` steps; the centre is the chosen size nearest the
    expected optimum (None when none is chosen)."""
    law = load_law(sweep.law)
    convention = PUBLISHED_CONVENTION.get(sweep.law, sweep.params)  # the parameter count the law's N means
    center = float(law.n_opt(budget)) * float(sweep.center_factor)
    k = int(sweep.per_budget)
    if k == 1:
        targets = [center]
    else:
        lo, hi = center / math.sqrt(sweep.spread), center * math.sqrt(sweep.spread)
        targets = [math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (k - 1)) for i in range(k)]
    pool = []
    for size in sweep.sizes:
        _, _, _, flops, params = acc(str(size), enc_len, batch(str(size)) if callable(batch) else batch)
        steps = round(budget / flops["model_flops"])
        if steps >= int(sweep.min_steps):
            pool.append((str(size), params[convention]))
    chosen = []
    for t in targets:
        free = [p for p in pool if p[0] not in chosen]
        if not free:
            break
        chosen.append(min(free, key=lambda p: abs(math.log(p[1]) - math.log(t)))[0])
    if len(chosen) < k:
        log.info("budget %s at enc_len %s: only %d of %d sizes fit (min_steps %s)", _fmt_num(budget),
                    enc_len, len(chosen), k, sweep.min_steps)
    order = {str(s): i for i, s in enumerate(sweep.sizes)}
    params = dict(pool)
    centre = min(chosen, key=lambda s: abs(math.log(params[s]) - math.log(center))) if chosen else None
    return sorted(chosen, key=lambda s: order[s]), centre


def _rule_batch(sweep, acc: _Accountant, enc_len: int, budget: float):
    """``size -> batch`` of the ``batch_steps`` rule at ``budget``: the largest power of two in [batch_min,
    batch_max] that leaves the run at least ``batch_steps`` steps (batch_min when none does)."""

    def batch_of(size: str) -> int:
        _, _, b0, flops, _ = acc(size, enc_len)
        examples = budget / (flops["model_flops"] / b0)  # model FLOPs are linear in the batch
        b = 1 << (int(sweep.batch_max).bit_length() - 1)
        while b > int(sweep.batch_min) and examples / b < int(sweep.batch_steps):
            b //= 2
        return max(b, int(sweep.batch_min))

    return batch_of


def expand(sweep) -> list[Run]:
    """All runs of a (normalized) sweep definition, cheapest first."""
    acc = _Accountant(sweep)
    runs: list[Run] = []
    plan = []  # (size, enc_len, budget, token_budget, seeds, batch, num_train)
    seeds = tuple(int(s) for s in sweep.seeds)
    for enc_len in sweep.enc_lens:
        enc_len = int(enc_len)
        if sweep.design == "grid":
            for size in sweep.sizes:
                for tok in sweep.tokens:
                    for n_train in tuple(sweep.get("num_trains", ())) or (None,):
                        plan.append((str(size), enc_len, None, int(tok), seeds, None, n_train))
        else:
            by_enc = sweep.get("budgets_by_enc")
            budgets = by_enc[str(enc_len)] if by_enc else sweep.budgets
            batches = tuple(sweep.batch_per_budget) or (None,) * len(budgets)
            for budget, batch in zip(budgets, batches):
                if sweep.batch_steps is not None:
                    batch = _rule_batch(sweep, acc, enc_len, float(budget))
                sizes, centre = isoflop_sizes(sweep, float(budget), acc, enc_len, batch)
                for size in sizes:
                    extra = tuple(int(s) for s in sweep.center_seeds) if size == centre else ()
                    plan.append((size, enc_len, float(budget), None, seeds + extra,
                                 batch(size) if callable(batch) else batch, None))
    for size, enc_len, budget, token_budget, run_seeds, run_batch, n_train in plan:
        cfg, spec, batch, flops, params = acc(size, enc_len, run_batch)
        tokens_per_step = batch * (spec.enc_len + spec.dec_len)
        if budget is not None:
            steps = max(1, round(budget / flops["model_flops"]))
            tag = f"c{_fmt_num(budget)}"
        else:
            steps = max(1, round(token_budget / tokens_per_step))
            tag = f"t{_fmt_num(token_budget)}"
        data_over, data_tag = [], ""
        if n_train is not None:
            data_over, data_tag = [f"data.num_train={int(n_train)}"], f"-u{int(n_train)}"
        own = _lr_for(sweep, size, cfg.train.lr)
        rates = ([(float(x), f"-lr{_fmt_num(x)}") for x in sweep.lrs]
                 or [(float(f"{own * x:.4g}"), f"-x{float(x):g}") for x in sweep.lr_factors] or [(own, "")])
        for (lr, lr_tag), seed in [(r, s) for r in rates for s in run_seeds]:
            overrides = acc.common_overrides(size, enc_len, run_batch) + data_over + \
                _schedule_overrides(sweep, cfg, steps) + [
                f"train.tokens={steps * tokens_per_step}", f"train.lr={lr!r}", f"seed={int(seed)}"]
            prefix = f"{size}-e{enc_len}-{tag}{data_tag}{lr_tag}-s{int(seed)}"
            runs.append(Run(
                run_id=run_id_for(prefix, sweep.base, overrides), sweep=sweep.name, design=sweep.design,
                size=size, base=sweep.base, overrides=overrides, enc_len=spec.enc_len, dec_len=spec.dec_len,
                batch_size=batch, steps=steps, tokens=steps * tokens_per_step,
                model_flops=float(flops["model_flops"]) * steps,
                hardware_flops=float(flops["hardware_flops"]) * steps, params=params, lr=lr, seed=int(seed),
                budget=budget, token_budget=token_budget))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UserError(f"sweep {sweep.name}: runs {', '.join(dup)} are listed twice; remove duplicate entries")
    runs.sort(key=lambda r: (r.model_flops, r.run_id))
    return runs


def filter_runs(runs: list[Run], only: str | None) -> list[Run]:
    """Runs whose id matches the glob ``only`` (or contains it as a substring); all when ``only`` is None."""
    if not only:
        return runs
    import fnmatch

    out = [r for r in runs if fnmatch.fnmatch(r.run_id, only) or only in r.run_id]
    if not out:
        raise UserError(f"--only {only!r} matches no run of sweep {runs[0].sweep if runs else '?'}; "
                        "see the ids with: medscale sweep status SWEEP.py")
    return out


def from_plan(sweep, proposal) -> list[Run]:
    """The runs of a ``medscale plan next`` proposal (``[{"size", "enc_len", "budget", "seed"}, ...]``) under a
    sweep definition's rules (base, overrides, learning rates, batches, evaluation schedule): each as an IsoFLOP
    run of that size at that budget, so a proposed run that repeats a planned one gets its run id. A budget the
    definition does not list takes the batch of its nearest listed budget (``batch_per_budget``)."""
    import ml_collections

    if not isinstance(proposal, list) or not proposal:
        raise UserError("the plan proposes no runs (its 'proposal' list is empty or missing)")
    base = sweep.to_dict()
    runs: list[Run] = []
    for i, p in enumerate(proposal):
        try:
            size, enc, budget, seed = str(p["size"]), int(p["enc_len"]), float(p["budget"]), int(p.get("seed", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"plan run {i + 1}: needs size, enc_len, budget (and seed): {exc}") from None
        if not (math.isfinite(budget) and budget > 0):
            raise UserError(f"plan run {i + 1}: budget must be a positive number of FLOPs, not {budget!r}")
        d = dict(base)
        d.update(design="isoflop", sizes=[size], enc_lens=[enc], budgets=[budget], budgets_by_enc=None,
                 per_budget=1, seeds=[seed], center_seeds=[], min_steps=1, tokens=[])
        if base.get("batch_per_budget"):
            pairs = list(zip(base["budgets"], base["batch_per_budget"]))
            d["batch_per_budget"] = [min(pairs, key=lambda bb: abs(math.log(bb[0] / budget)))[1]]
        if base.get("per_size"):
            d["per_size"] = {k: v for k, v in base["per_size"].items() if k == size} or None
        one = normalize(ml_collections.ConfigDict(d), source=f"plan run {i + 1}")
        runs += expand(one)
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise UserError("the plan lists the same run twice (same size, length, budget and seed); give each "
                        "repeat its own seed")
    runs.sort(key=lambda r: (r.model_flops, r.run_id))
    return runs


def load_plan(path: str) -> list[dict]:
    """The ``proposal`` of a plan file written by ``medscale plan next --out``."""
    if not os.path.isfile(path):
        raise UserError(f"plan file {path!r} not found; write one with medscale plan next RESULTS --runs K --out "
                        f"{path}")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"plan file {path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or "proposal" not in doc:
        raise UserError(f"plan file {path}: no 'proposal' list (write it with medscale plan next --out)")
    return doc["proposal"]
