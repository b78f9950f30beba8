"""``medscale sweep run|status|emit|export``: many training runs from one sweep definition (docs/sweep.md)."""

import json
import math
import os
import sys

from medscale.commands import COMMANDS
from medscale.sweep import design, emit, launcher, registry


def register(sub, argv=()):
    parser = sub.add_parser("sweep", help=COMMANDS["sweep"])
    inner = parser.add_subparsers(dest="sweep_command", metavar="ACTION", parser_class=type(parser))

    p = inner.add_parser("run", help="train every run of a sweep locally, with a pool of warm worker processes")
    p.add_argument("sweep", metavar="SWEEP.py", help="sweep definition (see sweeps/)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, runs trained at once (default 1)")
    p.add_argument("--only", metavar="PATTERN", help="only runs whose id matches this glob or substring")
    p.add_argument("--results", default="results", metavar="DIR", help="results root (default results/)")
    p.add_argument("--retry-failed", action="store_true", help="train failed runs again")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument("--from-plan", metavar="PLAN.json", help="train the runs a plan proposes (medscale plan next "
                   "--out) under this sweep's rules, into its results folder, instead of its own design")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.set_defaults(func=_run)

    p = inner.add_parser("status", help="one line per run: state, loss, FLOPs, PF-days, wall time, MFU")
    p.add_argument("path", metavar="SWEEP.py|DIR", help="sweep definition or results folder")
    p.add_argument("--results", default="results", metavar="DIR", help="results root for a SWEEP.py")
    p.add_argument("--json", action="store_true", help="one JSON object: counts and runs")
    p.set_defaults(func=_status)

    p = inner.add_parser("emit", help="write a SLURM array script or Kubernetes Job manifests (docs/sweep.md)")
    p.add_argument("sweep", metavar="SWEEP.py")
    p.add_argument("--target", required=True, choices=["slurm", "kubernetes"])
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the emitted files")
    p.add_argument("--only", metavar="PATTERN")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="results root seen by the jobs (default: results for SLURM, /results for Kubernetes)")
    p.add_argument("--gpus", "--gpus-per-node", dest="gpus", type=int, default=1,
                   help="GPUs per node of a run (default 1; 8 for a whole DGX-1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1; more: one run over several "
                   "nodes through jax.distributed, needs --coordinator-port)")
    p.add_argument("--process-per", choices=["node", "gpu"], default="node",
                   help="SLURM: one process per node (default) or per GPU")
    p.add_argument("--coordinator-port", type=int, metavar="PORT",
                   help="TCP port of the coordinator (process 0) of a run of several processes")
    p.add_argument("--name", help="job name (several runs: NAME-<run hash>; at most 63 characters)")
    p.add_argument("--cpus", type=int, default=8, help="CPUs per process")
    p.add_argument("--mem", default=None, help="memory per node (default 64G / 64Gi)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="extra_sets",
                   help="extra override for every run (e.g. model.dtype=bfloat16); run ids are unchanged")
    p.add_argument("--python", default="python", help="python in the job's environment")
    g = p.add_argument_group("slurm")
    g.add_argument("--partition")
    g.add_argument("--time", default="2-00:00:00")
    g.add_argument("--max-parallel", type=int)
    g.add_argument("--setup", default="", help="shell lines run before training (e.g. 'source venv/bin/activate')")
    g = p.add_argument_group("kubernetes")
    g.add_argument("--image", default="medscale:latest")
    g.add_argument("--pvc", default="medscale-results", help="PersistentVolumeClaim holding the results")
    g.add_argument("--namespace")
    g.add_argument("--storage", default="100Gi", help="size in pvc.yaml")
    g.add_argument("--seccomp", choices=["none", "runtime-default"], default=None,
                   help="pod seccompProfile (default none: OpenShift before 4.11 refuses any)")
    g.add_argument("--openshift", action="store_true",
                   help="only settings every OpenShift restricted SCC admits (old and new clusters)")
    g.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule on nodes with this label (e.g. nvidia.com/gpu.product=Tesla-V100-SXM2-32GB)")
    g.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                   help="tolerate a node taint (e.g. nvidia.com/gpu:NoSchedule)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_emit)

    p = inner.add_parser("export", help="the registry table of a results folder as CSV or Parquet")
    p.add_argument("path", metavar="SWEEP.py|DIR")
    p.add_argument("out", metavar="OUT.csv|OUT.parquet")
    p.add_argument("--results", default="results", metavar="DIR")
    p.set_defaults(func=_export)

    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _run(args):
    if args.dry_run:
        sweep = design.load_definition(args.sweep)
        planned = design.from_plan(sweep, design.load_plan(args.from_plan)) if args.from_plan else design.expand(sweep)
        runs = design.filter_runs(planned, args.only)
        if args.json:
            print(json.dumps({"sweep": sweep.name, "runs": [r.to_dict() for r in runs]}))
        else:
            for r in runs:
                print(f"{r.run_id:40s} steps {r.steps:7d}  tokens {r.tokens:.3g}  FLOPs {r.model_flops:.3g}")
            print(f"{len(runs)} runs, {sum(r.model_flops for r in runs):.3g} model FLOPs")
        return 0
    report = launcher.run_sweep(args.sweep, results=args.results, workers=args.workers, only=args.only,
                                progress=not args.quiet and not args.json, retry_failed=args.retry_failed,
                                plan=args.from_plan)
    if args.json:
        print(json.dumps(report))
    else:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(report["counts"].items()))
        print(f"sweep {report['sweep']}: {report['runs']} runs ({counts}) in {report['wall_s']:.0f} s "
              f"(training processes: {report['train_cpu_s']:.0f} CPU-s); results in {report['results']}")
        if report.get("utilisation") is not None:
            print(f"  {registry.usage_line(report)}")
        for run_id, err in report["errors"].items():
            print(f"  {run_id}: {err}")
    return 1 if report["counts"].get("failed") else 0


def _fmt(x, spec):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _plain(x):
    """numpy scalars -> Python numbers for JSON (full precision: pandas' to_json rounds to 10 decimals)."""
    if hasattr(x, "item"):
        x = x.item()
        return None if isinstance(x, float) and not math.isfinite(x) else x
    return str(x)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _sweep_dir(args) -> str | None:
    """The sweep folder ``args.path`` names (a definition: under ``--results``), None for several sweeps."""
    path = args.path
    if path.endswith(".py") or ".py:" in path:
        return os.path.join(args.results, design.load_definition(path).name)
    if os.path.isdir(path) and any(registry.is_run_dir(os.path.join(path, d)) for d in os.listdir(path)):
        return path
    return None


def _status(args):
    df = registry.load_sweep(args.path, results=args.results)
    counts = df["status"].value_counts().to_dict()
    sweep_dir = _sweep_dir(args)
    use = registry.sweep_usage(sweep_dir, df) if sweep_dir else None
    if args.json:
        records = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                   for r in df.astype(object).to_dict("records")]
        print(json.dumps({"path": args.path, "counts": counts, "usage": use, "runs": records}, default=_plain))
        return 0
    print(f"{'run_id':40s} {'state':11s} {'loss':>7s} {'FLOPs':>9s} {'PF-days':>9s} {'wall':>8s} {'MFU':>6s}")
    for r in df.to_dict("records"):
        wall = _fmt(r["wall_s"], ".0f")
        mfu = _fmt(r["mfu"] * 100 if _finite(r["mfu"]) else None, ".1f")
        print(f"{r['run_id']:40s} {r['status']:11s} {_fmt(r['loss'], '.4f'):>7s} {_fmt(r['flops'], '.3g'):>9s} "
              f"{_fmt(r['pf_days'], '.2g'):>9s} {wall + ('s' if wall != '-' else ''):>8s} "
              f"{mfu + ('%' if mfu != '-' else ''):>6s}")
    print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" ({len(df)} runs)")
    if use is not None:
        print(f"sweep: {registry.usage_line(use)} over {use['launches']} launch(es)")
    for r in df.to_dict("records"):
        if r["status"] == "failed" and r.get("error"):
            print(f"  {r['run_id']}: {r['error']}", file=sys.stderr)
    return 0


def _emit(args):
    sweep = design.load_definition(args.sweep)
    runs = design.filter_runs(design.expand(sweep), args.only)
    opts = {"gpus": args.gpus, "cpus": args.cpus, "python": args.python, "extra_sets": tuple(args.extra_sets),
            "nodes": args.nodes, "process_per": args.process_per, "coordinator_port": args.coordinator_port,
            "name": args.name}
    if args.target == "slurm":
        opts.update(results=args.results or "results", mem=args.mem or "64G", time=args.time,
                    partition=args.partition, max_parallel=args.max_parallel, setup=args.setup)
    else:
        opts.update(results=args.results or "/results", mem=args.mem or "64Gi", image=args.image, pvc=args.pvc,
                    namespace=args.namespace, storage=args.storage, seccomp=args.seccomp, openshift=args.openshift,
                    node_selector=tuple(args.node_selector), tolerations=tuple(args.toleration))
    files = emit.emit(runs, args.target, args.out, **opts)
    if args.json:
        print(json.dumps({"sweep": sweep.name, "target": args.target, "runs": len(runs), "files": files}))
    else:
        print(f"{len(runs)} runs of sweep {sweep.name} -> " + ", ".join(os.path.relpath(f) for f in files))
    return 0


def _export(args):
    out = registry.export(args.path, args.out, results=args.results)
    print(out)
    return 0
