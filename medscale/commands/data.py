"""``medscale data prepare|show``: build the dataset, tokenizers and token caches of a config; look at examples."""

import json

from medscale.commands import COMMANDS
from medscale.configs import load_config, spec_from_config
from medscale.data.pipeline import build_data, prepare_report
from medscale.errors import UserError


def _common(p):
    p.add_argument("--config", default="tiny", help="config FILE[:ARG] (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def register(sub, argv=()):
    parser = sub.add_parser("data", help=COMMANDS["data"])
    inner = parser.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(parser))
    p = inner.add_parser("prepare", help="build (or check) everything a config's training reads",
                         description="Generates or converts the TFDS dataset (ArrayRecord), trains the "
                                     "tokenizers, tokenises every split once, and reports sizes, tokenizer "
                                     "hashes, reconstruction quality and skipped examples. Idempotent.")
    _common(p)
    p.set_defaults(func=run_prepare)
    s = inner.add_parser("show", help="print one example: caption, boxes, facts and its tokens")
    _common(s)
    s.add_argument("--split", default="validation")
    s.add_argument("--index", type=int, default=0)
    s.set_defaults(func=run_show)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_prepare(args):
    cfg = load_config(args.config, args.set)
    out = prepare_report(cfg, spec_from_config(cfg), progress=not args.quiet)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


def run_show(args):
    cfg = load_config(args.config, args.set)
    data = build_data(cfg, spec_from_config(cfg), progress=not args.quiet)
    ex = data.examples(args.split)
    if not 0 <= args.index < len(ex):
        raise UserError(f"--index {args.index} is outside split {args.split!r} (0..{len(ex) - 1})")
    e = ex[args.index]
    toks = data.tokens_of(args.split, [args.index])
    out = {"id": e["id"], "index": e["index"], "caption": e["caption"], "boxes": e["boxes"], "facts": e["facts"],
           "has_mask": e["mask"] is not None}
    for m in data.registry:
        n = int(toks[m.name + "_len"][0])
        out[f"tokens/{m.name}"] = toks[m.name][0][:n].tolist()
    if "caption" in toks:
        n = int(toks["caption_len"][0])
        out["caption_detokenized"] = data.detokenize("caption", toks["caption"][0][:n])
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:22s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0
