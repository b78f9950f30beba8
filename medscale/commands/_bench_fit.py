"""``medscale bench fit``: Approach 3 vectorised over all starts vs a plain scipy L-BFGS-B loop, same data."""

import json
import sys

from medscale.analysis import inputs
from medscale.bench import fit as benchfit
from medscale.commands.bench import BENCHMARKS
from medscale.errors import UserError


def register(sub, argv=()):
    p = sub.add_parser("fit", help=BENCHMARKS["fit"],
                       description="Times the vectorised Approach 3 fit on the paper's 4,500 starts and a plain "
                                   "scipy.optimize.minimize(L-BFGS-B) loop on an evenly spread subset of the "
                                   "same starts (extrapolated to 4,500 and labelled so), with both objectives, "
                                   "and a bootstrap of the vectorised fit.")
    p.add_argument("--data", default=None,
                   help="table of runs (default ../shared/data/chinchilla_epoch_extracted.csv next to the repo)")
    p.add_argument("--col", action="append", default=[], metavar="NAME=SOURCE", help="column mapping, as in fit")
    p.add_argument("--starts", type=int, default=450,
                   help="starts for the scipy loop (default 450 of 4,500; 4500 runs them all, ~minutes)")
    p.add_argument("--scipy-options", choices=["default", "tight"], default="default",
                   help="L-BFGS-B tolerances of the scipy loop: scipy's defaults, or ftol 1e-15 gtol 1e-12")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws to time (0: skip)")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args):
    if args.starts < 1 or args.bootstrap < 0:
        raise UserError("--starts must be >= 1 and --bootstrap >= 0")
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=min(args.starts, 4500), desc="scipy loop (after the vectorised fits)", unit="start",
                   file=sys.stderr, delay=1.0)
    try:
        out = benchfit.bench(args.data, inputs.parse_col_args(args.col), scipy_starts=args.starts,
                             bootstrap=args.bootstrap, scipy_options=args.scipy_options, progress=(lambda i: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(out))
        return 0
    v, s, vs = out["vectorised"], out["scipy"], out["vectorised_same_starts"]
    print(f"data: {out['data']} ({out['n_points']} points)")
    print(f"vectorised, {v['starts']} starts:   {v['wall_s']:8.2f} s wall {v['cpu_s']:8.2f} s CPU   objective "
          f"{v['objective']:.12g}  converged {v['converged']}")
    print(f"vectorised, same {vs['starts']} starts: {vs['wall_s']:6.2f} s wall {vs['cpu_s']:8.2f} s CPU   "
          f"objective {vs['objective']:.12g}")
    print(f"scipy loop ({s['options']} L-BFGS-B options), {s['starts']} starts:   {s['wall_s']:8.2f} s wall {s['cpu_s']:8.2f} s CPU   objective "
          f"{s['objective']:.12g}")
    tag = "extrapolated linearly from the subset" if s["full_grid_extrapolated"] else "measured"
    print(f"scipy loop, 4500 starts ({tag}): {s['full_grid_wall_s']:.1f} s wall, {s['full_grid_cpu_s']:.1f} s CPU")
    print(f"speedup on 4500 starts: {out['speedup_wall']:.0f}x wall, {out['speedup_cpu']:.0f}x CPU")
    print(f"objective, same starts: relative difference {out['objective_rel_diff_same_starts']:.2e}; "
          f"full grid vs scipy subset: {out['objective_rel_diff_full_vs_scipy']:+.2e}")
    if "bootstrap" in out:
        b = out["bootstrap"]
        print(f"bootstrap {b['draws']} draws: {b['wall_s']:.2f} s wall, {b['cpu_s']:.2f} s CPU")
    return 0
