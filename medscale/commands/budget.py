"""``medscale budget``: the compute-budget calculator (budget -> N_opt, D_opt, predicted loss, ladder size, days).

Examples:
  medscale budget --hardware v100-sxm2-32gb --gpus 8 --days 7 --mfu 0.35 --precision fp16 --law chinchilla
  medscale budget --pf-days 100 --law epoch2024 --json
  medscale budget --params 3e8 --hardware dgx-1 --mfu 0.35        (reverse: tokens, FLOPs, days for a size)
  medscale budget --hardware dgx-1 --days 7 --law results/reference/seqlen_law.json   (+ the encoder length)
  medscale budget --hardware dgx-1 --days 7 --dataset roco         (bounded by a finite dataset's unique tokens)
  medscale budget --pf-days 100 --unique-tokens 1e9 --repetition-constants fit_rep.json
"""

import json

from medscale.accounting import ladder_specs
from medscale.analysis import datasets, repetition
from medscale.analysis.budget import (
    BUDGET_JSON_KEYS,
    CONSTRAINED_JSON_KEYS,
    DEFAULT_MFU,
    budget_plan,
    constrained_plan,
)
from medscale.analysis.seqlen import budget_seqlen
from medscale.commands import COMMANDS
from medscale.errors import UserError
from medscale.memory import plan_summary


def register(sub, argv=()):
    p = sub.add_parser("budget", help=COMMANDS["budget"],
                       description=__doc__.splitlines()[0])
    src = p.add_argument_group("budget (exactly one of: --hardware with --days, --flops, --pf-days, --params)")
    src.add_argument("--hardware", help="device or system name (e.g. v100-sxm2-32gb, a100-80gb, h100-sxm, h200, "
                     "cpu, dgx-1 = 8 x v100-sxm2-32gb)")
    src.add_argument("--gpus", type=int, help="number of devices (default 1; 8 for dgx-1)")
    src.add_argument("--days", type=float, help="wall-clock days of training on --hardware")
    src.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                     help=f"model FLOPs utilisation in (0, 1] (default {DEFAULT_MFU})")
    src.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16"),
                     help="peak to use (default: bf16, else fp16, else fp32, as the device has); the output "
                     "names the model.dtype it needs (fp16: float16; bf16 is an error on V100)")
    src.add_argument("--flops", type=float, help="budget in FLOPs")
    src.add_argument("--pf-days", type=float, help="budget in PF-days (1e15 x 86,400 FLOPs)")
    src.add_argument("--params", type=float, help="reverse mode: model size N (the law's convention)")
    p.add_argument("--law", default="chinchilla", help="chinchilla | chinchilla-rounded | epoch2024 | kaplan2020, "
                   "or a fit file from medscale fit --out (default chinchilla)")
    p.add_argument("--batch-tokens", type=float, default=2**19,
                   help="tokens per optimizer step, for the step counts (default 524288)")
    dc = p.add_argument_group("finite data (Muennighoff et al. 2023's effective data and parameters; docs/fit.md)")
    dc.add_argument("--unique-tokens", type=float, help="unique tokens the dataset holds (the law's D units); "
                    "tokens beyond them are repeats, worth Muennighoff et al.'s effective data")
    dc.add_argument("--dataset", metavar="DIR|roco|rocov2|medmnist[:FLAG]", help="count the unique tokens of a "
                    "downloaded dataset folder with --data-config's tokenizers and lengths, or of a named "
                    "dataset (counted when prepared, else its published size times the tokens per example)")
    dc.add_argument("--data-config", default="base", help="training config whose tokenizers, modalities and "
                    "enc_len + dec_len define the tokens of --dataset (default base)")
    dc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of --data-config")
    dc.add_argument("--repetition-constants", metavar="FILE", help="R*_D (and R*_N) from medscale fit RESULTS "
                    f"--repetition --out FILE (default: published R*_D {repetition.PUBLISHED_R_D}, R*_N "
                    f"{repetition.PUBLISHED_R_N})")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def _fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if abs(x) >= 1e4 or (x and abs(x) < 1e-2):
        return f"{x:.3e}{unit}"
    return f"{x:,.2f}{unit}"


def run(args):
    plan = budget_plan(args.law, flops=args.flops, pf_days=args.pf_days, hardware=args.hardware, gpus=args.gpus,
                       days=args.days, mfu=args.mfu, precision=args.precision, params=args.params,
                       batch_tokens=args.batch_tokens)
    bounded = _constrain(args, plan)
    length = None if plan["details"]["mode"] == "params" else budget_seqlen(args.law, plan["flops"])
    if args.json:
        keys = BUDGET_JSON_KEYS + (CONSTRAINED_JSON_KEYS if "repetition" in bounded else ())
        out = {k: bounded[k] for k in keys}
        if length is not None:  # a length law (medscale report --seqlen): the encoder length at the budget
            out["seqlen"], out["enc_len_opt"] = length, length["enc_len_opt"]
        print(json.dumps(out))
        return 0
    d = plan["details"]
    conv = "all" if d["n_convention"] == "total" else "non-embedding"
    rows = []
    if d["hardware"]:
        rows.append(("hardware", (f"{d['gpus']} x {d['hardware']} @ {d['precision']} "
                                 f"({_fmt(d['peak_flops_per_gpu'])} FLOP/s peak each), MFU {d['mfu']:g}")))
        rows.append(("assumes", plan["dtype_note"]))
    rows += [
        ("law", f"{plan['law']} ({d['law_citation'] or 'fit file'}); N = {conv} parameters, C = 6 N D"),
        ("compute", f"{_fmt(plan['flops'])} FLOPs = {_fmt(plan['pf_days'])} PF-days"),
    ]
    if plan["gpu_hours"] is not None:
        rows.append(("GPU-hours / days", f"{_fmt(plan['gpu_hours'])} / {_fmt(plan['days'])}"))
    label = "N (given)" if d["mode"] == "params" else "N_opt"
    rows += [
        (label, f"{_fmt(plan['n_params_opt'])} parameters"),
        ("D_opt", (f"{_fmt(plan['tokens_opt'])} tokens ({plan['tokens_per_param']:.1f} per parameter), "
                  f"{d['steps_opt']:,} steps of {int(d['batch_tokens']):,} tokens")),
        ("predicted loss", f"{plan['predicted_loss']:.4f}"),
    ]
    lad, s = plan["ladder"], d["ladder_shape"]
    rows += [
        ("nearest ladder size", (f"{lad['name']}: d_model {s['d_model']}, {s['enc_layers']}+{s['dec_layers']} "
                                f"layers, {s['num_heads']} heads, d_ff {s['d_ff']} ({s['mlp']})")),
        ("  parameters", (f"{d['ladder_counts']['total']:,} total, {d['ladder_counts']['non_embedding']:,} "
                         f"non-embedding (law uses {conv})")),
        ("  optimal tokens", (f"{_fmt(lad['tokens'])} ({d['ladder_steps']:,} steps), predicted loss "
                             f"{d['ladder_predicted_loss']:.4f}")),
        ("  compute", (f"{_fmt(d['ladder_flops_6nd'])} (6ND) / {_fmt(d['ladder_model_flops'])} "
                      f"(encoder-decoder accounting, Le={s['enc_len']}, Ld={s['dec_len']})")),
    ]
    if d["ladder_days"] is not None:
        rows.append(("  days", f"{_fmt(d['ladder_days'])} at the encoder-decoder accounting"))
    if d["hardware"]:
        spec = next(x for x in ladder_specs(s["enc_len"], s["dec_len"]) if x.name == lad["name"])
        rows.append(("  memory plan", plan_summary(spec, d["hardware"], d["gpus"], d["precision"],
                                                  d["batch_tokens"])))
    if "repetition" in bounded:  # the rows above: unlimited data; these: bounded by the unique tokens
        rows += _constrained_rows(bounded)
    rows += _seqlen_rows(length)
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for w in bounded.get("repetition", {}).get("warnings", []):
        print(f"warning: {w}")
    return 0


def _constrain(args, plan):
    """The plan bounded by --unique-tokens / --dataset (unchanged without them)."""
    if args.unique_tokens is not None and args.dataset is not None:
        raise UserError("give either --unique-tokens or --dataset, not both")
    if args.unique_tokens is None and args.dataset is None:
        if args.repetition_constants or args.set:
            raise UserError("--repetition-constants and --set need --unique-tokens or --dataset")
        return plan
    const = repetition.load_constants(args.repetition_constants)
    source = None
    if args.dataset is not None:
        source = datasets.unique_tokens(args.dataset, args.data_config, args.set)
        u = source["unique_tokens"]
    else:
        u = args.unique_tokens
    return constrained_plan(plan, u, const, source)


def _constrained_rows(plan):
    r = plan["repetition"]
    free = r["unconstrained"]
    src = r.get("dataset")
    rows = [("unique tokens", f"{_fmt(plan['unique_tokens'])}"
             + (f" ({src['dataset']}: {src['examples']:,} examples x {src['tokens_per_example']:.1f} tokens; "
                f"{src['source']})" if src else "")),
            ("repetition law", (f"R*_D {r['constants']['r_star_d']:g}, R*_N {r['constants']['r_star_n']:g} "
                                f"({r['constants']['source']})")),
            ("data-constrained", (f"N {_fmt(plan['n_params_opt'])}, D {_fmt(plan['tokens_opt'])} = "
                                  f"{plan['epochs']:.3g} epochs, predicted loss {plan['predicted_loss']:.4f} "
                                  f"(nearest ladder size {r['ladder']['name']})")),
            ("unlimited data", (f"N_opt, D_opt above ({free['epochs']:.3g} epochs of this data), loss "
                                f"{free['predicted_loss']:.4f}; repetition costs {r['loss_lost_to_repetition']:.4f}")),
            ("more compute helps", (f"up to {_fmt(r['diminishing_flops'])} FLOPs (beyond: under 1% lower loss per "
                                    f"doubling; unlimited data: {_fmt(r['diminishing_flops_unlimited'])})"))]
    return rows


def _seqlen_rows(rec) -> list[tuple[str, str]]:
    """Table rows of a length law's recommendation (``medscale.analysis.seqlen.budget_seqlen``)."""
    if rec is None:
        return []

    def ci(d, digits=3):
        s = _fmt(d["value"]) if digits == 3 else f"{d['value']:.4f}"
        if d.get("ci"):
            lo, hi = d["ci"]
            s += f" [{_fmt(lo)}, {_fmt(hi)}]" if digits == 3 else f" [{lo:.4f}, {hi:.4f}]"
        return s

    level = round(100 * rec["ci_level"])
    rows = [("encoder length", (f"{rec['enc_len_opt']} (length law, form {rec['form']}, {rec['loss_column']}; "
                                f"{rec['accounting']}; {level}% intervals from {rec['draws']} bootstrap draws)"))]
    for x in rec["by_length"]:
        mark = " <- recommended" if x["enc_len"] == rec["enc_len_opt"] else ""
        best = f", best in {100 * x['p_best']:.0f}% of draws" if "p_best" in x else ""
        rows.append((f"  Le {x['enc_len']}", (f"N_opt {ci(x['n_opt'])}, D_opt {ci(x['d_opt'])} tokens, loss "
                                              f"{ci(x['loss'], 4)}{best}{mark}")))
    return rows
