"""``medscale fit INPUT``: scaling laws from a table of runs (Approaches 1, 2, 3), bootstrap intervals,
compute-optimal allocation; with ``--repetition``, the repetition constants R*_D (and R*_N) of runs on repeated
data (sweeps/repetition.py). See docs/fit.md."""

import json
import os
import sys

from medscale.analysis import approach3, fitting, holdout, inputs, repetition_fit
from medscale.commands import COMMANDS
from medscale.errors import UserError
from medscale.rundir import write_bytes


def register(sub, argv=()):
    p = sub.add_parser("fit", help=COMMANDS["fit"],
                       description=__doc__)
    p.add_argument("input", help="CSV/Parquet table of runs, or a results folder of the registry")
    p.add_argument("--col", action="append", default=[], metavar="NAME=SOURCE",
                   help="map a column: params, tokens, loss, flops, budget, run_id, step (e.g. 'params=Model Size')")
    p.add_argument("--approach", action="append", default=[], metavar="1|2|3|all",
                   help="repeatable; default: 3, plus 2 when the runs form 2+ IsoFLOP groups, plus 1 with curves")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap draws (resampled runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-flops", type=float, action="append", default=[], metavar="C",
                   help="print N_opt(C), D_opt(C) (with intervals when bootstrapping); repeatable")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta of Approach 3 (default 1e-3)")
    p.add_argument("--max-iter", type=int, default=300, help="Approach 3 iterations per start (default 300)")
    p.add_argument("--starts", choices=["paper", "coarse"], default="paper",
                   help="Approach 3 start grid: the paper's 4,500 (default) or a coarse 243 (alpha, beta in "
                        "{0.5, 1, 1.5}, e in {-1, 0, 1}, a, b in {0, 10, 20})")
    p.add_argument("--bin-dex", type=float, default=0.1,
                   help="Approach 2 without a budget column: a new IsoFLOP group where log10 C jumps by more")
    p.add_argument("--accounting", choices=["6nd", "encdec"], default="6nd",
                   help="compute convention of the allocation printed for --budget-flops (encdec: see docs/fit.md)")
    p.add_argument("--n-convention", choices=["non_embedding", "total"], default="non_embedding",
                   help="which parameter count the params column is (written to the fit file; encdec allocation)")
    p.add_argument("--enc-len", type=int, default=None, help="encdec allocation: encoder length (default: base config)")
    p.add_argument("--dec-len", type=int, default=None, help="encdec allocation: decoder length (default: base config)")
    p.add_argument("--holdout-top", type=int, default=None, metavar="K",
                   help="also fit Approach 3 on all budgets but the top K and predict the held-out runs' loss "
                        "with 95%% prediction intervals (errors and coverage; see docs/fit.md)")
    p.add_argument("--no-conventions", action="store_true",
                   help="skip the table of N_opt, a, b under other parameter and FLOPs conventions")
    p.add_argument("--repetition", action="store_true",
                   help="fit Muennighoff et al.'s R*_D (and R*_N with 3 sizes or more) from runs on fresh and "
                        "repeated data (sweeps/repetition.py); --out writes budget --repetition-constants FILE")
    p.add_argument("--repetition-model", choices=["per-size", "law"], default=None,
                   help="--repetition: a size term per size (default below 3 sizes) or the full law (3+ sizes)")
    p.add_argument("--out", metavar="FILE", help="write the fit file (the law, intervals, data) for budget --law")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def _approaches(args, points, curves):
    asked = set()
    for a in args.approach:
        for part in a.split(","):
            part = part.strip()
            if part == "all":
                asked |= {"1", "2", "3"}
            elif part in ("1", "2", "3"):
                asked.add(part)
            else:
                raise UserError(f"--approach {part!r}: use 1, 2, 3 or all")
    if asked:
        return tuple(sorted(asked, reverse=True))
    return fitting.default_approaches(points, curves, args.bin_dex)


def _starts(kind):
    if kind == "paper":
        return None
    return approach3.start_grid(alphas=[0.5, 1.0, 1.5], betas=[0.5, 1.0, 1.5], es=[-1.0, 0.0, 1.0],
                                as_=[0.0, 10.0, 20.0], bs=[0.0, 10.0, 20.0])


def run(args):
    if args.bootstrap < 0:
        raise UserError("--bootstrap must be >= 0")
    if args.max_iter < 1:
        raise UserError("--max-iter must be >= 1")
    if not args.delta > 0:
        raise UserError("--delta must be positive")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise UserError(f"--out {args.out}: folder {folder} does not exist")
    if args.repetition:
        return _run_repetition(args)
    if args.repetition_model:
        raise UserError("--repetition-model needs --repetition")
    points, curves, source = inputs.read_table(args.input, inputs.parse_col_args(args.col))
    approaches = _approaches(args, points, curves)
    if args.holdout_top is not None and "3" not in approaches:
        raise UserError("--holdout-top fits Approach 3; add --approach 3")
    result = fitting.fit_all(points, approaches, bootstrap=args.bootstrap, seed=args.seed,
                             budgets=args.budget_flops, curves=curves, source=source, delta=args.delta,
                             bin_dex=args.bin_dex, max_iter=args.max_iter, starts=_starts(args.starts),
                             accounting=args.accounting, n_convention=args.n_convention, enc_len=args.enc_len,
                             dec_len=args.dec_len, holdout_top=args.holdout_top,
                             convention_table=not args.no_conventions,
                             progress=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    if args.out:
        fitting.write_fit_file(args.out, result, points)
    if args.json:
        for w in result["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(json.dumps(result))
    else:
        print(format_result(result))
    return 0


def _run_repetition(args):
    if args.col or args.approach or args.budget_flops or args.holdout_top is not None:
        raise UserError("--repetition fits the repetition constants only; drop --col/--approach/--budget-flops/"
                        "--holdout-top")
    res = repetition_fit.fit_repetition(*repetition_fit.read_runs(args.input), model=args.repetition_model)
    res["input"] = os.path.abspath(args.input)
    if args.out:  # atomic: temp file + rename
        write_bytes(args.out, (json.dumps(repetition_fit.constants_file(res), indent=1) + "\n").encode())
    print(json.dumps(res) if args.json else repetition_fit.format_result(res))
    return 0


def _ci(res, name, fmt):
    ci = res.get("ci", {}).get(name)
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""


def format_result(result) -> str:
    lines = [f"runs: {result['n_points']}"]
    a3 = result.get("approach3")
    if a3:
        lines.append("Approach 3  L(N, D) = E + A/N^alpha + B/D^beta  (Huber delta "
                     f"{a3['delta']:g} on log loss, summed; {a3['n_starts']} starts)")
        lines.append(f"  {'':8s}{'value':>14s}  95% interval")
        for k, fmt in (("E", "{:.4g}"), ("A", "{:.4g}"), ("B", "{:.4g}"), ("alpha", "{:.4f}"),
                       ("beta", "{:.4f}"), ("a", "{:.4f}"), ("b", "{:.4f}"), ("G", "{:.4g}")):
            lines.append(f"  {k:8s}{fmt.format(a3[k]):>14s}  {_ci(a3, k, fmt)}")
        conv = "yes" if a3["converged"] else "NO (parameters unreliable)"
        lines.append(f"  objective {a3['objective']:.10g}  converged: {conv}  (starts: {a3['starts_converged']} "
                     f"converged, {a3['starts_diverged']} diverged, {a3['starts_unfinished']} unfinished; "
                     f"{a3['seconds']:.2f} s)")
        if a3.get("bootstrap"):
            bs = a3["bootstrap"]
            lines.append(f"  bootstrap: {bs['n']} draws, {bs['converged_fraction']:.1%} converged")
        _alloc(lines, a3, "under " + a3["allocation_convention"])
        if a3.get("allocation_encdec"):
            _alloc(lines, {"allocation": a3["allocation_encdec"]}, "under C = D flops_per_token(N) (encdec)")
    a2 = result.get("approach2")
    if a2:
        lines.append(f"Approach 2  IsoFLOP minima ({a2['n_groups']} groups, {a2['groups_from']})")
        for m in ("parabola", "spline"):
            r = a2[m]
            if r.get("a") is None:
                lines.append(f"  {m:8s}  {r.get('reason')}")
                continue
            lines.append(f"  {m:8s}  a {r['a']:.4f} {_ci(r, 'a', '{:.4f}')}   b {r['b']:.4f} "
                         f"{_ci(r, 'b', '{:.4f}')}   ({r['groups_used']} groups)")
        _alloc(lines, a2, "(parabola)")
    a1 = result.get("approach1")
    if a1:
        lines.append(f"Approach 1  training-curve envelope ({a1['n_runs']} runs, {a1['winners']} on the envelope)")
        lines.append(f"  a {a1['a']:.4f} {_ci(a1, 'a', '{:.4f}')}   b {a1['b']:.4f} {_ci(a1, 'b', '{:.4f}')}")
        _alloc(lines, a1, "(envelope)")
    rows = result.get("conventions") or []
    if rows:
        C = (result.get("conventions_info") or {}).get("C")
        lines.append("Conventions  Approach 3 refitted with N counted each way"
                     + (f"; N_opt at C={C:.3g}" if C else " (give --budget-flops for N_opt)"))
        lines.append(f"  {'N':14s}{'C':>10s}{'a':>8s}{'b':>8s}{'N_opt':>11s}{'A2 a':>8s}")
        for r in rows:
            if not r.get("available"):
                lines.append(f"  {r['n_convention']:14s}{r['flops_convention']:>10s}  {r.get('reason')}")
                continue
            f4 = lambda v: "–" if v is None else f"{v:.3f}"
            lines.append(f"  {r['n_convention']:14s}{r['flops_convention']:>10s}{f4(r.get('a')):>8s}"
                         f"{f4(r.get('b')):>8s}{'–' if not r.get('n_opt') else format(r['n_opt'], '.3g'):>11s}"
                         f"{f4(r.get('approach2_a')):>8s}")
    if result.get("holdout"):
        lines += holdout.format_holdout(result["holdout"])
    for w in result.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _alloc(lines, res, note):
    for row in res.get("allocation", []):
        n_ci = _ci(row, "n_opt", "{:.3g}")
        d_ci = _ci(row, "d_opt", "{:.3g}")
        lines.append(f"  C={row['C']:.3g} {note}: N_opt {row['n_opt']:.4g} {n_ci}  D_opt {row['d_opt']:.4g} {d_ci}")
