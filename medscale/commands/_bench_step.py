"""``medscale bench step``: time the real training step of the real model; step time, tokens/s, MFU."""

import json

from medscale.bench.step import bench_spec, bench_step
from medscale.commands.bench import BENCHMARKS
from medscale.options import DTYPE_NAMES, REMAT_POLICIES


def add_shape_args(p, vocab=None):
    """The model-shape flags of the step benchmarks (``bench step``, ``bench torch``), with their defaults."""
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--enc-layers", type=int, default=4)
    p.add_argument("--dec-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--vocab", default=vocab,
                   help="as for medscale flops: text vocabulary N (caption and boxes) or I,C,B,S,Q,A per modality")
    p.add_argument("--enc-len", type=int, default=256)
    p.add_argument("--dec-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)


def register(sub, argv=()):
    p = sub.add_parser("step", help=BENCHMARKS["step"],
                       description="Times the compiled train step (compile excluded; median over timed steps "
                                   "after warm-up) of the model with the given shape on random batches that "
                                   "follow the batch contract.")
    add_shape_args(p)
    p.add_argument("--mlp", default="gelu", choices=("gelu", "swiglu"))
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    p.add_argument("--attention", default="dense")
    p.add_argument("--window", type=int, default=None, help="keys per encoder query for --attention local")
    p.add_argument("--block", type=int, default=None, help="key/value block for blockwise attention")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--hardware", default="auto", help="hardware table key for the peak (auto: detect)")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    p.set_defaults(func=run)


def run(args):
    spec = bench_spec(args.d_model, args.enc_layers, args.dec_layers, args.heads, args.d_ff, args.vocab,
                      args.enc_len, args.dec_len, args.mlp)
    out = bench_step(spec, args.batch, dtype=args.dtype, remat=args.remat, attention=args.attention,
                     steps=args.steps, hardware=args.hardware, window=args.window, block=args.block)
    if args.json:
        print(json.dumps(out))
    else:
        for k in ("step_s", "tokens_per_s", "model_tflops_per_s", "peak_tflops_per_s", "mfu", "peak_now_tflops_per_s",
                  "mfu_vs_peak_now", "compile_s",
                  "hardware", "cpu", "cpu_kernels", "devices"):
            v = out.get(k)
            print(f"{k:20s} {v:.4g}" if isinstance(v, float) else f"{k:20s} {v}")
    return 0
