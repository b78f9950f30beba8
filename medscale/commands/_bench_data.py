"""``medscale bench data``: throughput of the input pipeline alone (no model): examples/s and batches/s."""

import json
import sys

from medscale.bench.data import bench_pipeline
from medscale.commands.bench import BENCHMARKS
from medscale.configs import load_config, spec_from_config
from medscale.errors import UserError


def register(sub, argv=()):
    p = sub.add_parser("data", help=BENCHMARKS["data"],
                       description="Builds (or loads from cache) the config's dataset, then times: raw reads "
                                   "through tfds.data_source (PNG decode; synthetic training scenes: rendered), 4M "
                                   "masking alone, on synthetic data the training stream's cost of a new scene "
                                   "(render + tokenise), and the grain iterator end to end (synchronous and with "
                                   "its background thread).")
    p.add_argument("--config", default="tiny", help="config FILE[:ARG] (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: train.batch_size)")
    p.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args):
    if args.batches <= 0:
        raise UserError("--batches must be positive")
    cfg = load_config(args.config, args.set)
    spec = spec_from_config(cfg)
    out = bench_pipeline(cfg, spec, batch_size=args.batch or int(cfg.train.batch_size), batches=args.batches,
                         progress=not args.quiet)
    if args.json:
        print(json.dumps(out))
        return 0
    for k, v in out.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    sys.stdout.flush()
    return 0
