"""``medscale bench sweep``: a fixed small sweep through the local launcher; utilisation and where the time goes."""

import json

from medscale.bench.sweep import bench_sweep
from medscale.commands.bench import BENCHMARKS
from medscale.errors import UserError


def register(sub, argv=()):
    p = sub.add_parser("sweep", help=BENCHMARKS["sweep"],
                       description="Trains a fixed design of 6 tiny runs (medscale.bench.sweep) with the local "
                                   "launcher in a temporary folder (fresh compilation cache) and prints the "
                                   "wall time, utilisation = model FLOPs / (wall x measured peak), and the split "
                                   "of run-seconds between start-up, compilation, training steps, evaluation, "
                                   "checkpoints, task evaluation and the rest.")
    p.add_argument("--workers", type=int, default=2, help="training workers at once (default 2)")
    p.add_argument("--keep", metavar="DIR", default=None, help="train into DIR and keep it (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args):
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    out = bench_sweep(workers=args.workers, folder=args.keep, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(out))
        return 0 if not out["errors"] else 1
    util = out["utilisation"]
    print(f"{out['runs']} runs, {out['workers']} workers: {out['wall_s']:.1f} s wall, "
          f"{out['model_flops']:.3g} model FLOPs, utilisation "
          + (f"{100 * util:.1f}% of {out['peak_flops']:.3g} FLOP/s" if util is not None else "-"))
    for key, seconds in out["split_s"].items():
        print(f"  {key[:-2]:12s} {seconds:8.1f} run-s  {100 * out['split_share'][key]:5.1f}%")
    for run_id, err in out["errors"].items():
        print(f"  {run_id}: {err}")
    return 0 if not out["errors"] else 1
