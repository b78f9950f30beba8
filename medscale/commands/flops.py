"""``medscale flops``: parameters and FLOPs per training step of a model config, by component.

Examples:
  medscale flops --size base
  medscale flops --d-model 256 --enc-layers 4 --dec-layers 4 --heads 4 --d-ff 1024 --mlp swiglu --json
  medscale flops --config medscale/configs/tiny.py --set data.enc_len=256 --remat full
  medscale flops --size xs --attention local --window 32 --xla

Modalities: every registered one (``medscale.modalities``; built in: image, caption, boxes, segmentation).
``--vocab N`` sets the text vocabulary (every sequence modality -- caption and boxes -- each with its own N rows
in the combined table); ``--vocab I,C,B,S,Q,A`` sets each modality's vocabulary, one integer per registered
modality in registry order. Without ``--vocab`` (and without ``--config``) the registry's defaults apply (the
base config's sizes): image 512, caption 2048, boxes 2048, segmentation 256.
"""

import json

from medscale import accounting, modalities
from medscale.commands import COMMANDS
from medscale.configs import load_config, spec_from_config
from medscale.configs.ladder import ladder_shape
from medscale.errors import UserError
from medscale.options import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from medscale.spec import ModelSpec
from medscale.train.step import xla_step_flops

SHAPE_FLAGS = (("d_model", "d_model"), ("enc_layers", "enc_layers"), ("dec_layers", "dec_layers"),
               ("heads", "num_heads"), ("d_ff", "d_ff"), ("mlp", "mlp"))


def register(sub, argv=()):
    p = sub.add_parser("flops", help=COMMANDS["flops"],
                       description=__doc__.splitlines()[0])
    p.add_argument("--size", help="a ladder size (medscale/configs/ladder.py); explicit flags override its shape")
    p.add_argument("--config", help="a config file FILE[:ARG] (shape, vocabularies, lengths, batch, remat, attention)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (with --config)")
    p.add_argument("--d-model", type=int)
    p.add_argument("--enc-layers", type=int)
    p.add_argument("--dec-layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--d-ff", type=int, help="MLP width (default 4 x d_model)")
    p.add_argument("--mlp", choices=("gelu", "swiglu"))
    p.add_argument("--vocab", help=modalities.vocab_flag_help())
    p.add_argument("--enc-len", type=int, help="encoder tokens per example (default 128)")
    p.add_argument("--dec-len", type=int, help="decoder tokens per example (default 64)")
    p.add_argument("--batch", type=int, help="examples per step (default 16)")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="recomputation policy (default none)")
    p.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS,
                   help="attention implementation (default dense)")
    p.add_argument("--window", type=int, help="keys per encoder query for --attention local (default 128)")
    p.add_argument("--xla", action="store_true", help="also compile the real training step and report XLA's count")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def build_spec(args):
    """(spec, batch, remat, attention, window) from the flags."""
    remat, attention, window, batch = "none", "dense", 128, 16
    if args.config:
        cfg = load_config(args.config, args.set)
        if args.size:
            cfg.model.size = args.size
        spec = spec_from_config(cfg)
        batch = cfg.train.batch_size
        remat, attention = cfg.model.remat, cfg.model.attention
        window = cfg.model.attention_window
        shape = {k: getattr(spec, k) for _, k in SHAPE_FLAGS}
        base = {"modalities": spec.modalities, "enc_len": spec.enc_len, "dec_len": spec.dec_len, "name": spec.name,
                "encoder": spec.encoder, "enc_split": spec.enc_split}
    else:
        if args.set:
            raise UserError("--set needs --config")
        shape = ladder_shape(args.size) if args.size else {}
        base = {"modalities": None, "enc_len": 128, "dec_len": 64, "name": args.size or "custom"}
    for flag, key in SHAPE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            shape[key] = value
    missing = [f"--{f.replace('_', '-')}" for f, k in SHAPE_FLAGS[:4] if k not in shape]
    if missing:
        raise UserError(f"give --size NAME, --config FILE, or the shape: missing {', '.join(missing)}")
    if "d_ff" not in shape:
        shape["d_ff"] = 4 * shape["d_model"]
    if args.vocab is not None or base["modalities"] is None:
        base["modalities"] = modalities.from_vocab_flag(args.vocab)
    for flag in ("enc_len", "dec_len"):
        if getattr(args, flag) is not None:
            base[flag] = getattr(args, flag)
    if args.enc_len is not None:
        base.pop("enc_split", None)  # a new encoder length: the default per-modality split of it
    batch = args.batch if args.batch is not None else batch
    remat = args.remat or remat
    attention = args.attention or attention
    window = args.window if args.window is not None else window
    if args.window is not None and attention != "local":
        raise UserError("--window applies only to --attention local")
    return ModelSpec(**base, **shape), batch, remat, attention, window


def run(args):
    spec, batch, remat, attention, window = build_spec(args)
    counts = accounting.param_counts(spec)
    opts = {"remat": remat, "attention": attention, "window": window}
    step = accounting.step_flops(spec, batch, **opts)
    out = {
        "encoder": spec.encoder,
        "encoder_split": list(spec.encoder_split) if spec.encoder != "unified" else None,
        "params": counts,
        "model_flops_per_step": step["model_flops"],
        "hardware_flops_per_step": step["hardware_flops"],
        "components": step["components"],
        "flops_per_token": accounting.flops_per_token(spec, batch, **opts),
        "ratio_to_6nd": accounting.ratio_to_6nd(spec, batch, **opts),
    }
    if args.xla:
        xla = float(xla_step_flops(spec, batch, **opts))
        out["xla_flops_per_step"] = xla
        out["xla_ratio"] = xla / step["hardware_flops"]
    if args.json:
        print(json.dumps(out))
        return 0
    tokens = accounting.tokens_per_step(spec, batch)
    print(f"{spec.name}: d_model {spec.d_model}, {spec.enc_layers} encoder + {spec.dec_layers} decoder layers, "
          f"{spec.num_heads} heads (head_dim {spec.head_dim}), d_ff {spec.d_ff} ({spec.mlp}), "
          f"vocab {'+'.join(map(str, spec.vocab_sizes))} = {spec.vocab_total}")
    print(f"step: batch {batch} x (enc {spec.enc_len} + dec {spec.dec_len}) = {tokens:,} tokens; "
          f"remat {remat}, attention {attention}" + (f" (window {window})" if attention == "local" else ""))
    if spec.encoder != "unified":
        shares = [f"{m.name} {n}" for m, n in zip(spec.modalities, spec.encoder_split) if n]
        print(f"encoder: {spec.encoder}, {len(shares)} stacks ({', '.join(shares)} tokens)")
    print()
    for key in ("total", "embedding", "non_embedding", "heads"):
        print(f"params {key:<14} {counts[key]:>16,}")
    print()
    print(f"{'component':<18} {'model FLOPs':>12} {'share':>7} {'hardware FLOPs':>15}")
    for name in accounting.COMPONENTS:
        m, h = step["components"][name], step["hardware_components"][name]
        print(f"{name:<18} {m:>12.4e} {m / step['model_flops']:>6.1%} {h:>15.4e}")
    print(f"{'total per step':<18} {step['model_flops']:>12.4e} {'':>7} {step['hardware_flops']:>15.4e}")
    print()
    print(f"model FLOPs per token (enc + dec): {out['flops_per_token']:.4e}")
    print(f"ratio to 6 N D (N non-embedding, D enc + dec tokens): {out['ratio_to_6nd']:.3f}")
    if args.xla:
        print(f"XLA FLOPs per step: {out['xla_flops_per_step']:.4e} (XLA / hardware = {out['xla_ratio']:.3f})")
    return 0
