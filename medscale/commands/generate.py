"""``medscale generate``: caption, boxes and segmentation (any target subset) from an image or a held-out
example of a trained run; writes a picture and prints the outputs (see docs/generate.md)."""

import json
import os

from medscale import modalities
from medscale.commands import COMMANDS
from medscale.errors import UserError
from medscale.generate.cli_impl import generate
from medscale.generate.render import renderer


def register(sub, argv=()):
    p = sub.add_parser("generate", help=COMMANDS["generate"])
    p.add_argument("--workdir", required=True, help="run directory of `medscale train`")
    p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="a PNG/JPEG of any size (made grey-scale, padded square, resized)")
    src.add_argument("--example", help="SPLIT:INDEX of the run's data, e.g. validation:3 (ground truth shown)")
    p.add_argument("--inputs", default="image",
                   help="input modalities taken from --example (default image); --image gives the image only")
    p.add_argument("--targets", default="caption,boxes,segmentation", help="comma-separated target modalities")
    p.add_argument("--out", default=None, help="output folder for the picture (default RUN/generate)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--refine-steps", type=int, default=1,
                   help="image-like targets: MaskGIT refinement passes (1 = one parallel pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (with --json: the object)")
    p.set_defaults(func=run)


def _split_list(text, flag):
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag}: give at least one modality")
    if len(set(items)) != len(items):
        raise UserError(f"{flag}: {text!r} names a modality twice")
    return items


def run(args):
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0")
    if args.top_k < 0:
        raise UserError("--top-k must be >= 0")
    if args.refine_steps < 1:
        raise UserError("--refine-steps must be >= 1")
    targets = _split_list(args.targets, "--targets")
    inputs = _split_list(args.inputs, "--inputs")
    if args.image is not None and inputs != ["image"]:
        raise UserError("--inputs: with --image the only input is the image; use --example for others")
    example = None
    if args.example is not None:
        split, sep, index = args.example.rpartition(":")
        if not sep or not split or not index.lstrip("-").isdigit():
            raise UserError(f"--example {args.example!r}: write SPLIT:INDEX, e.g. validation:0")
        example = (split, int(index))
    out = generate(args.workdir, checkpoint=args.checkpoint, image_path=args.image, example=example,
                   inputs=inputs, targets=targets, out_dir=args.out or os.path.join(args.workdir, "generate"),
                   temperature=args.temperature, top_k=args.top_k, refine_steps=args.refine_steps,
                   seed=args.seed)
    if args.json:
        print(json.dumps(out))
        return 0
    if args.quiet:
        return 0
    for name in out["targets"]:  # each modality's lines, by its registry entry's renderer
        for line in renderer(name).lines(name, out):
            print(line)
    for name in modalities.names() if "truth" in out else ():
        for line in renderer(name).truth_lines(name, out["truth"]):
            print(line)
    print(f"picture: {out['picture']}")
    return 0
