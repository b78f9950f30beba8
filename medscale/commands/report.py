"""``medscale report RESULTS_DIR``: the study report (report.md, report.json, figures as PNG and SVG).

Examples:
  medscale report results/reference                       (budget: one DGX-1, 8 x V100 32 GB, 7 days)
  medscale report results/reference --hardware a100-80gb --gpus 16 --days 3 --mfu 0.4
  medscale report results/reference --flops 1e21 --out /tmp/report --json
  medscale report results/reference --dataset rocov2        (the finite-data recommendation for ROCOv2)
  medscale report results/reference --seqlen results/seqlen-law      (+ the encoder length at the budget)
"""

import json
import sys

from medscale.analysis import holdout, repetition
from medscale.analysis.report import DEFAULT_DATASET, build_report, fmt
from medscale.commands import COMMANDS
from medscale.errors import UserError


def register(sub, argv=()):
    p = sub.add_parser("report", help=COMMANDS["report"],
                       description=__doc__.splitlines()[0])
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep folder (results/<sweep>) of run directories")
    g = p.add_argument_group("budget (default: --hardware dgx-1 --days 7)")
    g.add_argument("--hardware", help="device or system name (e.g. dgx-1, v100-sxm2-32gb, a100-80gb, h100-sxm)")
    g.add_argument("--gpus", type=int, help="number of devices (default: the system's, 8 for dgx-1)")
    g.add_argument("--days", type=float, help="wall-clock days (default 7)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation on the target (default: the sweep's measured "
                   "median, as a fraction of the target's peak)")
    g.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16"), help="peak to use (default: the "
                   "fastest 16-bit mode the device has)")
    g.add_argument("--flops", type=float, help="the budget in FLOPs instead of hardware x days")
    d = p.add_argument_group("finite data (the data-constrained recommendation beside the unconstrained one)")
    d.add_argument("--unique-tokens", type=float, help="unique tokens of the dataset (the law's D units)")
    d.add_argument("--dataset", default=None, metavar="DIR|roco|rocov2|medmnist[:FLAG]|none",
                   help=f"dataset whose unique tokens bound the allocation, with the sweep's tokenizer settings "
                   f"and lengths (default {DEFAULT_DATASET}: its published size; none: no such section)")
    d.add_argument("--repetition-constants", metavar="FILE", help="R*_D, R*_N from medscale fit --repetition "
                   "--out FILE (default: Muennighoff et al. 2023's)")
    p.add_argument("--seqlen", metavar="DIR", help="a length study's results folder (sweeps/seqlen.py:law): adds the "
                   "sequence-length section (per-length and joint laws, the encoder length at the budget with "
                   "intervals, equal-compute comparison) and writes seqlen_law.json for medscale budget --law")
    p.add_argument("--out", help="output folder (default RESULTS_DIR/report)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (default 200; "
                   "medscale fit defaults to none: report.md prints the fit command with this count)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (sequences) of the recommended run, "
                   "for its step count (default 256)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures (numbers only)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (report.json without the runs)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args):
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.flops is not None and args.days is not None:
        raise UserError("give either --flops or --days (with --hardware), not both")
    if args.unique_tokens is not None and args.dataset is not None:
        raise UserError("give either --unique-tokens or --dataset, not both")
    if args.unique_tokens is not None and not args.unique_tokens > 0:
        raise UserError(f"--unique-tokens must be positive, got {args.unique_tokens:g}")
    dataset = None if args.unique_tokens is not None or args.dataset == "none" else (args.dataset
                                                                                      or DEFAULT_DATASET)
    constants = repetition.load_constants(args.repetition_constants)

    def progress(msg):
        if not args.quiet:
            print(f"[report] {msg}", file=sys.stderr, flush=True)

    rep = build_report(args.results_dir, args.out, hardware=args.hardware, gpus=args.gpus, days=args.days,
                       mfu=args.mfu, precision=args.precision, flops=args.flops, bootstrap=args.bootstrap,
                       seed=args.seed, batch_size=args.batch_size, figures=not args.no_figures, progress=progress,
                       unique_tokens=args.unique_tokens, dataset=dataset, repetition_constants=constants,
                       seqlen_dir=args.seqlen)
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "runs"}))
        return 0
    rec, b = rep["recommendation"], rep["budget"]

    def ci(d, digits=3):
        s = fmt(d["value"], digits)
        return s + (f" [{fmt(d['ci'][0], digits)}, {fmt(d['ci'][1], digits)}]" if d.get("ci") else "")

    lines = [f"budget          {fmt(b['flops'])} FLOPs = {fmt(b['pf_days'])} PF-days"
             + (f" ({b['gpus']} x {b['hardware']}, {fmt(b['days'])} days, MFU {fmt(b['mfu'])})"
                if b.get("hardware") else ""),
             f"N_opt           {ci(rec['n_opt'])} non-embedding parameters",
             f"D_opt           {ci(rec['d_opt'])} tokens",
             f"predicted loss  {ci(rec['loss'], 4)}"]
    lad = rec.get("ladder")
    if lad:
        lines.append(f"ladder size     {lad['name']} ({fmt(lad['params_non_embedding'])} non-embedding params), "
                     f"{fmt(lad['tokens'])} tokens"
                     + (f", {lad['steps']:,} steps x {lad['batch_size']}" if lad.get("steps") else ""))
    dc = rep.get("data_constrained")
    if dc:
        lines.append(f"finite data     {fmt(dc['unique_tokens'])} unique tokens: N {ci(dc['n_params_opt'])}, D "
                     f"{ci(dc['tokens_opt'])} ({fmt(dc['epochs']['value'])} epochs), loss "
                     f"{ci(dc['predicted_loss'], 4)}")
    lines.append(f"spread of N_opt x{fmt(rec['spread_factor_n_opt'])} across approaches and published laws")
    sl = rep.get("seqlen")
    if sl:
        srec = sl["recommendation"]
        lines.append(f"encoder length  {srec['enc_len_opt']} (form {sl['form']}; best in "
                     f"{fmt(100 * (srec.get('p_best') or {}).get(str(srec['enc_len_opt']), float('nan')))}% of draws): "
                     + ", ".join(f"Le {x['enc_len']} loss {ci(x['loss'], 4)}" for x in srec["by_length"]))
    for h in (rep.get("holdout") or {}).values():
        lines.append(f"validation      {holdout.summary_line(h)}")
    if rec["extrapolation"].get("warning"):
        lines.append(f"warning         {rec['extrapolation']['warning']}")
    lines.append(f"report          {rep['out_dir']}/report.md")
    print("\n".join(lines))
    return 0
