"""``medscale train --config FILE[:ARG] [--set k=v ...] --workdir DIR [--quiet] [--json]``: one training run
(one process of it, with ``--coordinator HOST:PORT --num-processes N --process-id I``: docs/sweep.md)."""

import json
import sys

from medscale.commands import COMMANDS
from medscale.configs import load_config
from medscale.generate.evaluate import task_eval
from medscale.model.sharding import maybe_initialize_distributed
from medscale.rundir import summary_line
from medscale.train.loop import train


def register(sub, argv=()):
    p = sub.add_parser("train", help=COMMANDS["train"],
                       description="Train one model from a config file; resumes from DIR's latest checkpoint.")
    p.add_argument("--config", required=True, help="config file FILE.py[:ARG] (or a name in medscale/configs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted key), repeatable")
    p.add_argument("--workdir", required=True, help="run directory (config.json, metrics.jsonl, summary.json)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    g = p.add_argument_group("multi-process (one run over several processes; default: from the environment "
                             "SLURM or a Kubernetes Indexed Job sets, see docs/sweep.md)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    p.set_defaults(func=run)


def run(args):
    # before anything touches a device: the process joins its run's other processes here
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.workdir, progress=not args.quiet,
                    finish=lambda workdir, data: task_eval(cfg, workdir, data))
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(summary_line(summary))
        if summary.get("error"):
            print(f"  {summary['error']}", file=sys.stderr)
    return 0 if summary.get("status") == "done" else 1
