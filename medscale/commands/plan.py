"""``medscale plan next RESULTS_DIR --runs K``: the next runs worth buying (docs/fit.md, "The next runs").

Examples:
  medscale plan next results/reference --runs 3 --mfu 0.35 --out plan.json
  medscale sweep run sweeps/reference.py --from-plan plan.json      (trains the proposal into the same sweep)
"""

import json
import sys

from medscale import rundir
from medscale.analysis import plan
from medscale.commands import COMMANDS
from medscale.errors import UserError


def register(sub, argv=()):
    parser = sub.add_parser("plan", help=COMMANDS["plan"], description=__doc__.splitlines()[0])
    inner = parser.add_subparsers(dest="plan_command", metavar="ACTION", parser_class=type(parser))
    p = inner.add_parser("next", help="the K runs that most shrink the 95%% interval of N_opt at the budget")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep folder (results/<sweep>) of run directories")
    p.add_argument("--runs", type=int, required=True, metavar="K", help="how many runs to propose")
    p.add_argument("--max-flops", type=float, metavar="F", help="largest model FLOPs of a proposed run (default: "
                   "up to two half-decade budgets above the sweep's largest)")
    g = p.add_argument_group("target budget (as medscale report; default: --hardware dgx-1 --days 7)")
    g.add_argument("--hardware", help="device or system name (e.g. dgx-1, v100-sxm2-32gb, a100-80gb)")
    g.add_argument("--gpus", type=int, help="number of devices (default: the system's)")
    g.add_argument("--days", type=float, help="wall-clock days (default 7)")
    g.add_argument("--mfu", type=float, help="MFU on the target (default: the sweep's measured median)")
    g.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16"))
    g.add_argument("--flops", type=float, help="the target budget in FLOPs instead of hardware x days")
    g = p.add_argument_group("simulation")
    g.add_argument("--draws", type=int, default=64, help="bootstrap refits of the current runs (default 64)")
    g.add_argument("--truths", type=int, default=4, help="draws taken as the truth to simulate from (default 4)")
    g.add_argument("--inner", type=int, default=32, help="bootstrap refits per truth and candidate (default 32)")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="PLAN.json", help="write the plan (for medscale sweep run --from-plan)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_next)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _fmt_ci(iv):
    if not iv["n_opt"]:
        return "no interval"
    lo, hi = iv["n_opt"]
    return f"[{lo:.3g}, {hi:.3g}] ({iv['width_dex']:.2f} decades)"


def _next(args):
    if args.flops is not None and args.days is not None:
        raise UserError("give either --flops or --days (with --hardware), not both")

    def progress(msg):
        if not args.quiet and not args.json:
            print(f"\r[plan] {msg}\033[K", end="", file=sys.stderr, flush=True)

    res = plan.plan_next(args.results_dir, args.runs, max_flops=args.max_flops, hardware=args.hardware,
                         gpus=args.gpus, days=args.days, mfu=args.mfu, precision=args.precision, flops=args.flops,
                         draws=args.draws, truths=args.truths, inner=args.inner, seed=args.seed, progress=progress)
    if not args.quiet and not args.json:
        print(file=sys.stderr)
    if args.out:
        rundir.write_text(args.out, json.dumps(res, indent=1) + "\n")
    if args.json:
        print(json.dumps(res))
        return 0
    t = res["target"]
    print(f"target: {t['flops']:.3g} FLOPs ({t['pf_days']:.3g} PF-days); {t['compute_model']}; "
          f"N_opt of the fit {t['n_opt_fit']:.3g}")
    print(f"95% interval of N_opt now:        {_fmt_ci(res['current'])}")
    print(f"expected after the {len(res['proposal'])} run(s): {_fmt_ci(res['expected_after'])}")
    print(f"{'size':10s} {'enc':>4s} {'budget':>9s} {'params':>9s} {'tokens':>9s} {'seed':>4s}  expected interval after")
    for s in res["steps"]:
        r = s["run"]
        print(f"{r['size']:10s} {r['enc_len']:4d} {r['budget']:9.3g} {r['params']:9.3g} {r['tokens']:9.3g} "
              f"{r['seed']:4d}  {_fmt_ci(s)}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    print(f"({res['candidates']['count']} candidates, simulated from {res['settings']['truths']} bootstrap draws x "
          f"{res['settings']['inner']} refits; {res['seconds']:.0f} s)"
          + (f"; plan written to {args.out}: medscale sweep run SWEEP.py --from-plan {args.out}" if args.out else ""))
    return 0
