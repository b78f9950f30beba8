"""``medscale memory``: per-device memory of a training step, and the fastest plan that fits the devices.

Examples:
  medscale memory --size 3xl --hardware v100-sxm2-32gb --gpus 8 --batch 256 --enc-len 64 --dec-len 48 --dtype float16
  medscale memory --size 3xl --hardware dgx-1 --batch 256 --enc-len 64 --dec-len 48 --dtype float16 --remat full --json
  medscale memory --size tiny --batch 16 --enc-len 64 --dec-len 32 --remat full --xla

The plans are every mesh data x fsdp x tensor of --gpus devices (tensor <= 8, dividing the heads; the batch
divisible by data x fsdp x micro-batches), every micro-batch count 1, 2, 4, ... and every remat policy (or the
one --remat names); the chosen plan is the fastest, by the cost model of docs/memory.md, whose estimate is at
most --headroom of the device memory. ``--xla`` compiles the real train step for the given shape on this
machine (one device unless --mesh names more, e.g. with simulated CPU devices) and prints XLA's memory analysis
beside the estimate for the same step.
"""

import json

from medscale import memory, modalities
from medscale.commands import COMMANDS
from medscale.configs.ladder import ladder_shape
from medscale.errors import UserError
from medscale.hardware import memory_bytes, precision_for_dtype, resolve
from medscale.options import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from medscale.spec import ModelSpec

PART_LABELS = (("params", "params"), ("adam", "adam"), ("batch", "batch"), ("grads", "grads"),
               ("weight_copies", "copies"),
               ("activations", "acts"), ("attention_workspace", "attn ws"), ("head", "head"),
               ("workspace", "slack"))
TABLE_ROWS = 12  # the fastest plans in the text table (and the chosen one)
JSON_KEYS = ("size", "hardware", "gpus", "batch", "enc_len", "dec_len", "dtype", "attention", "headroom",
             "device_bytes", "chosen", "plans")


def register(sub, argv=()):
    p = sub.add_parser("memory", help=COMMANDS["memory"], description=__doc__.splitlines()[0])
    p.add_argument("--size", required=True, help="a ladder size (medscale/configs/ladder.py)")
    p.add_argument("--hardware", default="v100-sxm2-32gb",
                   help="device or system name (default v100-sxm2-32gb; dgx-1 = 8 x v100-sxm2-32gb)")
    p.add_argument("--gpus", type=int, help="number of devices (default 1; 8 for dgx-1)")
    p.add_argument("--batch", type=int, default=256, help="examples per optimizer step (default 256)")
    p.add_argument("--enc-len", type=int, default=128, help="encoder tokens per example (default 128)")
    p.add_argument("--dec-len", type=int, default=64, help="decoder tokens per example (default 64)")
    p.add_argument("--vocab", help=modalities.vocab_flag_help())
    p.add_argument("--dtype", default="float16", choices=tuple(memory.COMPUTE_BYTES),
                   help="compute dtype (default float16; parameters and optimizer state stay float32)")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="only this remat policy (default: consider all)")
    p.add_argument("--attention", default="dense", choices=ATTENTION_IMPLEMENTATIONS,
                   help="attention implementation (default dense)")
    p.add_argument("--block", type=int, default=memory.DEFAULT_BLOCK, help="blockwise attention block (default 512)")
    p.add_argument("--window", type=int, default=128, help="keys per encoder query for --attention local")
    p.add_argument("--microbatches", type=int, help="only this micro-batch count (default: 1, 2, 4, ...)")
    p.add_argument("--mesh", help="only this mesh DATA,FSDP,TENSOR (default: every mesh of --gpus devices)")
    p.add_argument("--headroom", type=float, default=memory.HEADROOM,
                   help=f"a plan fits at most this fraction of the device memory (default {memory.HEADROOM})")
    p.add_argument("--xla", action="store_true", help="compile the real step for this shape here and print "
                   "XLA's memory analysis beside the estimate (small shapes; one device unless --mesh)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def _mesh_arg(text):
    try:
        parts = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(x <= 0 for x in parts):
        raise UserError(f"--mesh takes DATA,FSDP,TENSOR (three positive integers), not {text!r}")
    return dict(zip(("data", "fsdp", "tensor"), parts))


def _setting(args) -> memory.Setting:
    shape = ladder_shape(args.size)
    for flag in ("batch", "enc_len", "dec_len", "block", "window"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 < args.headroom <= 1:
        raise UserError(f"--headroom must be in (0, 1], got {args.headroom}")
    spec = ModelSpec(**shape, modalities=modalities.from_vocab_flag(args.vocab), enc_len=args.enc_len,
                     dec_len=args.dec_len, name=args.size)
    return memory.Setting(spec, args.batch, args.dtype, args.remat or "none", args.attention, args.block,
                          args.window)


def _gb(x):
    return x / 1e9


def _plan_json(p):
    return {"mesh": p["mesh"], "microbatches": p["microbatches"], "remat": p["remat"], "micro_batch": p["micro_batch"],
            "bytes_per_device": p["bytes"], "parts": p["parts"], "phase": p["phase"], "fits": p["fits"],
            "relative_speed": p["speed"]}


def run_xla(args, setting):
    from medscale.bench.memory import xla_memory  # JAX only for --xla

    m = _mesh_arg(args.mesh) if args.mesh else {"data": 1, "fsdp": 1, "tensor": 1}
    k = args.microbatches or 1
    est = memory.estimate(setting, m, k)
    xla = xla_memory(setting.spec, setting.batch, dtype=setting.dtype, remat=setting.remat,
                     attention=setting.attention, block=setting.block, window=setting.window,
                     mesh_shape=(m["data"], m["fsdp"], m["tensor"]), microbatches=k)
    out = {"size": args.size, "batch": setting.batch, "enc_len": setting.spec.enc_len,
           "dec_len": setting.spec.dec_len, "dtype": setting.dtype, "remat": setting.remat,
           "attention": setting.attention, "mesh": m, "microbatches": k,
           "estimate": {"bytes_per_device": est["total"], "parts": est["parts"], "phase": est["phase"]},
           "xla": xla, "ratio": est["total"] / xla["peak"]}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.size}: batch {setting.batch} x (enc {setting.spec.enc_len} + dec {setting.spec.dec_len}), "
          f"{setting.dtype}, remat {setting.remat}, attention {setting.attention}, mesh {memory.mesh_name(m)}, "
          f"{k} micro-batch(es)")
    print(f"XLA ({xla['schedule']} scheduler): arguments {xla['arguments'] / 1e6:,.1f} MB + outputs "
          f"{xla['outputs'] / 1e6:,.1f} MB - aliased {xla['aliased'] / 1e6:,.1f} MB + temporaries "
          f"{xla['temporaries'] / 1e6:,.1f} MB = peak {xla['peak'] / 1e6:,.1f} MB per device")
    parts = ", ".join(f"{label} {est['parts'][key] / 1e6:,.1f}" for key, label in PART_LABELS)
    print(f"estimate: {est['total'] / 1e6:,.1f} MB per device ({parts} MB; peak at {est['phase']})")
    print(f"estimate / XLA = {out['ratio']:.3f}")
    return 0


def run(args):
    setting = _setting(args)
    if args.xla:
        return run_xla(args, setting)
    device, default_gpus = resolve(args.hardware)
    precision_for_dtype(device, setting.dtype)  # a dtype the device has no peak for is an error here
    gpus = args.gpus if args.gpus is not None else default_gpus
    if gpus <= 0:
        raise UserError(f"--gpus must be positive, got {gpus}")
    remats = (args.remat,) if args.remat else None
    ks = (args.microbatches,) if args.microbatches else None
    candidates = memory.plans(setting, device, gpus, remats=remats, microbatches=ks, headroom=args.headroom)
    if args.mesh:
        want = _mesh_arg(args.mesh)
        candidates = [p for p in candidates if p["mesh"] == want]
        if not candidates:
            raise UserError(f"mesh {args.mesh} is not a plan for {gpus} devices and batch {setting.batch}")
    chosen = memory.choose(candidates, device, args.headroom)
    cap = memory_bytes(device)
    if args.json:
        print(json.dumps({"size": args.size, "hardware": device, "gpus": gpus, "batch": setting.batch,
                          "enc_len": setting.spec.enc_len, "dec_len": setting.spec.dec_len, "dtype": setting.dtype,
                          "attention": setting.attention, "headroom": args.headroom, "device_bytes": cap,
                          "chosen": _plan_json(chosen), "plans": [_plan_json(p) for p in candidates]}))
        return 0
    print(f"{args.size} on {gpus} x {device} ({_gb(cap):.0f} GB each, plans fit under {args.headroom:.0%}): "
          f"batch {setting.batch} x (enc {setting.spec.enc_len} + dec {setting.spec.dec_len}), {setting.dtype}, "
          f"attention {setting.attention}")
    head = f"  {'mesh DxFxT':<11}{'mb':>4} {'remat':<10}" + "".join(f"{lab:>8}" for _, lab in PART_LABELS)
    print(head + f"{'GB':>8}  {'fits':<5}{'speed':>6}")
    shown = candidates[:TABLE_ROWS] + ([chosen] if chosen not in candidates[:TABLE_ROWS] else [])
    for p in shown:
        mark = "*" if p is chosen else " "
        parts = "".join(f"{_gb(p['parts'][key]):>8.2f}" for key, _ in PART_LABELS)
        print(f"{mark} {memory.mesh_name(p['mesh']):<11}{p['microbatches']:>4} {p['remat']:<10}{parts}"
              f"{_gb(p['bytes']):>8.2f}  {'yes' if p['fits'] else 'no':<5}{p['speed']:>6.2f}")
    if len(candidates) > len(shown):
        print(f"  ... {len(candidates) - len(shown)} more plans, slower (--json lists every plan)")
    print(f"chosen (*): mesh {memory.mesh_name(chosen['mesh'])} (data x fsdp x tensor), {chosen['microbatches']} "
          f"micro-batch(es) of {chosen['micro_batch']} per device, remat {chosen['remat']}: "
          f"{_gb(chosen['bytes']):.2f} GB per device of {_gb(cap):.0f} GB")
    return 0
