"""``medscale train --config FILE[:ARG] [--set k=v ...] --workdir DIR [--quiet] [--json]``: one training run."""

import json
import sys


def register(sub):
    p = sub.add_parser("train", help="train one model (resumes when the workdir has a checkpoint)",
                       description="Train one model from a config file; resumes from DIR's latest checkpoint.")
    p.add_argument("--config", required=True, help="config file FILE.py[:ARG] (or a name in medscale/configs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted key), repeatable")
    p.add_argument("--workdir", required=True, help="run directory (config.json, metrics.jsonl, summary.json)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.set_defaults(func=run)


def run(args):
    from medscale.configs import load_config
    from medscale.train.loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.workdir, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        def fmt(x):
            return "-" if x is None else f"{x:.4f}"

        print(f"status {summary.get('status')}  steps {summary.get('steps')}  tokens {summary.get('tokens')}  "
              f"train loss {fmt(summary.get('final_train_loss'))}  eval loss {fmt(summary.get('final_eval_loss'))}"
              f"  mfu {fmt(summary.get('mfu'))}")
        if summary.get("error"):
            print(f"  {summary['error']}", file=sys.stderr)
    return 0 if summary.get("status") == "done" else 1
