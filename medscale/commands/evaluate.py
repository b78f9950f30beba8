"""``medscale evaluate``: task metrics (caption BLEU-4, ROUGE-L and finding accuracy, closed / open / overall
answer accuracy, box IoU and AP@0.5, segmentation mIoU) of a run on a held-out split of its dataset (the
synthetic data, or a prepared benchmark: VQA-RAD, SLAKE, ROCO, ...), stored in its summary.json under
``task_metrics``."""

from medscale.commands import COMMANDS
from medscale.errors import UserError
from medscale.generate.evaluate import evaluate_run_with_meta


def register(sub, argv=()):
    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"])
    p.add_argument("--workdir", required=True, help="run directory of `medscale train`")
    p.add_argument("--num", type=int, default=64, help="held-out examples to decode (default 64)")
    p.add_argument("--split", default="validation",
                   help="held-out split to score (default validation; the benchmarks' published figures are on test)")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--batch-size", type=int, default=16, help="examples decoded together (default 16)")
    p.add_argument("--refine-steps", type=int, default=1,
                   help="segmentation: MaskGIT refinement passes (default 1: one parallel pass)")
    p.add_argument("--no-write", action="store_true", help="print only; leave summary.json as it is")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args):
    import json

    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    res, meta = evaluate_run_with_meta(args.workdir, args.num, checkpoint=args.checkpoint,
                                       write=not args.no_write, batch_size=args.batch_size,
                                       refine_steps=args.refine_steps, split=args.split,
                                       progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps({"task_metrics": res, "task_eval": meta}))
        return 0
    print(f"{meta['num_examples']} {meta['split']} examples, checkpoint step {meta['checkpoint_step']}")
    for k, v in res.items():
        print(f"{k:34s} {v:.4f}" if isinstance(v, float) else f"{k:34s} {v}")
    if not args.no_write:
        print(f"stored in {args.workdir}/summary.json under task_metrics")
    return 0
