"""``medscale bench torch``: medscale's training step against a PyTorch encoder-decoder of the same shapes."""

import json
import sys

from medscale.bench.versus_torch import compare
from medscale.commands._bench_step import add_shape_args
from medscale.commands.bench import BENCHMARKS


def register(sub, argv=()):
    p = sub.add_parser("torch", help=BENCHMARKS["torch"],
                       description="Alternates fresh processes of `medscale bench step` and a torch.nn.Transformer "
                                   "encoder-decoder of the same shapes (medscale/bench/torch_encdec.py, run by "
                                   "--python), ABBA order, and reports the median step time of each and "
                                   "speedup = torch / medscale.")
    p.add_argument("--python", required=True, help="a Python interpreter that has torch installed")
    p.add_argument("--rounds", type=int, default=3, help="pairs of runs (default 3)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (after warm-up)")
    add_shape_args(p, vocab="2048,2048,2048,2048,256,256")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    p.set_defaults(func=run)


def run(args):
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = compare(args.python, d_model=args.d_model, enc_layers=args.enc_layers, dec_layers=args.dec_layers,
                  heads=args.heads, d_ff=args.d_ff, vocab=args.vocab, enc_len=args.enc_len, dec_len=args.dec_len,
                  batch=args.batch, steps=args.steps, rounds=args.rounds, progress=progress)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'round':>5s} {'first':>9s} {'torch s/step':>13s} {'medscale s/step':>16s}")
    for r in out["rounds"]:
        print(f"{r['round']:5d} {r['first']:>9s} {r['torch_step_s']:13.3f} {r['medscale_step_s']:16.3f}")
    print(f"median: torch {out['torch_step_s']:.3f} s, medscale {out['medscale_step_s']:.3f} s; "
          f"speedup (torch / medscale) {out['speedup']:.2f}; medscale faster in "
          f"{out['medscale_faster_rounds']}/{len(out['rounds'])} rounds (torch {out['torch']})")
    return 0
