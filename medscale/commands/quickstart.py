"""``medscale quickstart``: the whole scaling-study loop on CPU in minutes (docs/sweep.md).

Trains an IsoFLOP sweep of small encoder-decoders on the built-in synthetic medical data, fits the scaling laws,
writes results/quickstart/report.md with its figures, and prints the fitted exponents and the compute-optimal
size and tokens for one DGX-1 (8 x V100 32 GB, 7 days) beside the published laws'. Rerunning resumes: finished
runs are kept.
"""

import json
import sys
import time

from medscale.analysis import holdout, quickstart
from medscale.analysis.budget import DEFAULT_MFU
from medscale.commands import COMMANDS
from medscale.errors import UserError
from medscale.sweep import registry


def register(sub, argv=()):
    p = sub.add_parser("quickstart", help=COMMANDS["quickstart"],
                       description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", metavar="DIR", help="results root (default results/)")
    p.add_argument("--workers", type=int, default=2, help="runs trained at the same time (default 2)")
    p.add_argument("--sweep", metavar="SWEEP.py", help="another sweep definition instead of the built-in one")
    p.add_argument("--mfu", type=float, default=None,
                   help=f"model FLOPs utilisation assumed on the V100s for the recommendation (default {DEFAULT_MFU})")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def _fmt(x, digits=3):
    if x is None:
        return "-"
    try:
        return f"{float(x):.{digits}g}"
    except (TypeError, ValueError):
        return str(x)


def run(args):
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    mfu = DEFAULT_MFU if args.mfu is None else args.mfu
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu:g}")
    t0 = time.time()

    def stage(msg):
        if not args.quiet and not args.json:
            print(f"[quickstart {time.time() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)

    out = quickstart.run_quickstart(results=args.results, workers=args.workers,
                                    progress=not args.quiet and not args.json, sweep=args.sweep, mfu=mfu,
                                    bootstrap=args.bootstrap, seed=args.seed, stage=stage)
    rep = out["report"]
    rec, budget = rep["recommendation"], rep["budget"]
    wall = time.time() - t0
    if args.json:
        print(json.dumps({"sweep": out["sweep"], "results": out["results"], "wall_s": wall,
                          "runs": out["launch"]["counts"], "exponents": quickstart.exponents(rep["fit"]),
                          "budget": budget, "recommendation": rec, "sweep_usage": rep.get("sweep"),
                          "launch_usage": {k: out["launch"].get(k) for k in
                                           ("utilisation", "model_flops", "peak_flops", "pf_days", "split")},
                          "holdout": rep.get("holdout"), "report": f"{out['results']}/report.md"}, default=str))
        return 0
    counts = ", ".join(f"{v} {k}" for k, v in sorted(out["launch"]["counts"].items()))
    lines = [f"quickstart: {counts} in {wall:.0f} s; report {out['results']}/report.md"]
    if rep.get("sweep"):
        lines.append(f"training: {registry.usage_line(rep['sweep'])} (utilisation: of the measured peak)")
    lines += ["",
             ("fitted exponents (N_opt ~ C^a, D_opt ~ C^b; L = E + A/N^alpha + B/D^beta), "
             f"{int(100 * rec.get('ci_level', 0.9))}% bootstrap intervals:")]
    for app, name, value, ci in quickstart.exponents(rep["fit"]):
        interval = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
        lines.append(f"  {app:10s} {name:6s} {_fmt(value)}{interval}")
    lines += ["", (f"budget: {budget.get('gpus')} x {budget.get('hardware')} for {_fmt(budget.get('days'))} days at "
              f"MFU {_fmt(budget.get('mfu'))} ({budget.get('mfu_source')}) = {_fmt(budget['flops'])} FLOPs "
              f"= {_fmt(budget['pf_days'])} PF-days"), "",
              f"  {'source':14s} {'N_opt':>10s} {'D_opt (tokens)':>15s}  convention"]
    for name, v in rec.get("spread", {}).items():
        lines.append(f"  {name:14s} {_fmt(v.get('n_opt')):>10s} {_fmt(v.get('d_opt')):>15s}  {v.get('convention', '')}")
    n, d = rec["n_opt"], rec["d_opt"]
    if n.get("ci"):
        lines.append(f"  this fit: N_opt {_fmt(n['value'])} [{_fmt(n['ci'][0])}, {_fmt(n['ci'][1])}] non-embedding "
                     f"params, D_opt {_fmt(d['value'])} [{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}] tokens")
    lad = rec.get("ladder")
    if lad:
        lines.append(f"  nearest ladder size: {lad['name']} ({_fmt(lad['params_non_embedding'])} non-embedding "
                     f"params) on {_fmt(lad['tokens'])} tokens")
    checks = [h for h in (rep.get("holdout") or {}).values() if isinstance(h, dict)]
    if checks:
        lines += ["", "validated extrapolation (fit without the top budgets, predict their runs):"]
        lines += [f"  {holdout.summary_line(h)}" for h in checks]
    warning = (rec.get("extrapolation") or {}).get("warning")
    if warning:
        lines += ["", f"note: {warning}"]
    if rec.get("n_opt_at_search_floor"):
        lines += ["", f"note: {rec['n_opt_at_search_floor']}"]
    print("\n".join(lines))
    return 0
