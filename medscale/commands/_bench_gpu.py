"""``medscale bench gpu``: the acceptance run for a machine with GPUs (sharded == unsharded, attention
implementations in bfloat16/float16, float16 loss-scaled training, MFU of the largest size that fits)."""

import json
import sys

from medscale.bench.gpu import BUDGET_S, FP16_STEPS
from medscale.bench.gpu import run as run_checks
from medscale.commands.bench import BENCHMARKS


def register(sub, argv=()):
    p = sub.add_parser("gpu", help=BENCHMARKS["gpu"],
                       description="Runs the checks a new GPU machine must pass before a scaling study is trusted "
                                   "on it (docs/model.md, 'GPU acceptance'); exits 1 when a check fails, 2 with "
                                   "'error: no GPU' on a machine without one.")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout with every figure")
    p.add_argument("--platform", default="gpu", choices=("gpu", "cpu"),
                   help="cpu: rehearse the checks on the CPU devices (cudnn is skipped)")
    p.add_argument("--steps", type=int, default=FP16_STEPS, help="float16 loss-scaled training steps")
    p.add_argument("--sizes", default="",
                   help="comma-separated ladder sizes the MFU check may pick from (default: all)")
    p.add_argument("--batch", type=int, default=16, help="batch of the MFU check's step")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help="checks that would start after this many seconds are skipped")
    p.set_defaults(func=run)


def _print_text(out):
    print(f"devices  {out['devices']} x {out['device_kind']} ({out['platform']}; 16-bit dtype {out['half_dtype']})")
    s = out.get("sharding", {})
    if "meshes" in s:
        print(f"sharding {'ok' if s['ok'] else 'FAILED'}: meshes {', '.join(s['meshes'])}; max relative loss "
              f"difference {s['max_rel_loss_diff']:.2e} (bound {s['rtol']:.0e})")
    a = out.get("attention", {})
    for key, r in a.get("results", {}).items():
        if "skipped" in r:
            print(f"attention {key:20s} skipped: {r['skipped']}")
        elif "error" in r:
            print(f"attention {key:20s} FAILED: {r['error']}")
        else:
            print(f"attention {key:20s} {'ok' if r['ok'] else 'FAILED'}: output {r['out_err']:.2e}, gradients "
                  f"{r['grad_err']:.2e} (bound {r['bound']:.2e})")
    f = out.get("float16", {})
    if "status" in f:
        print(f"float16  {'ok' if f['ok'] else 'FAILED'}: {f['steps']} steps, status {f['status']}, loss "
              f"{f['first_train_loss']} -> {f['final_train_loss']}, skipped {f['skipped_steps']}, "
              f"scale {f['loss_scale']}")
    m = out.get("mfu", {})
    if "size" in m:
        print(f"mfu      {m['size']} ({m['params']:.3g} params, {m['dtype']}, batch {m['batch']}): step "
              f"{m['step_s']:.4g} s, MFU {m['mfu']}")
    for name in ("sharding", "attention", "float16", "mfu"):
        r = out.get(name, {})
        if r.get("skipped") or r.get("error"):
            print(f"{name:8s} {'skipped: ' + r['skipped'] if r.get('skipped') else 'FAILED: ' + r['error']}")
    print(f"{'all checks passed' if out['ok'] else 'some checks FAILED'} in {out['wall_s']:.0f} s")


def run(args):
    sizes = [s for s in args.sizes.split(",") if s]
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = run_checks(args.platform, steps=args.steps, sizes=sizes, budget_s=args.budget_s, batch=args.batch,
                     progress=progress)
    if args.json:
        print(json.dumps(out))
    else:
        _print_text(out)
    return 0 if out["ok"] else 1
