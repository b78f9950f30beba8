"""``medscale bench seqlen``: peak memory, step time and MFU of the train step against encoder length, per
attention implementation and remat policy (``medscale.bench.seqlen``)."""

import json
import os

from medscale import rundir
from medscale.bench.seqlen import (
    bench_seqlen,
    format_table,
    parse_bytes,
    parse_choices,
    parse_lengths,
    plot,
)
from medscale.commands.bench import BENCHMARKS
from medscale.errors import UserError
from medscale.options import ATTENTION_IMPLEMENTATIONS, DTYPE_NAMES, REMAT_POLICIES


def register(sub, argv=()):
    p = sub.add_parser("seqlen", help=BENCHMARKS["seqlen"])
    p.add_argument("--lengths", default="256,512,...,4096",
                   help="encoder lengths, comma-separated; 'a,b,...,c' continues the ratio b/a up to c")
    p.add_argument("--attention", default="dense,blockwise",
                   help="comma-separated: dense, xla, cudnn, blockwise, local")
    p.add_argument("--remat", default="none", help="comma-separated: none, full, save_dots")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--enc-layers", type=int, default=2)
    p.add_argument("--dec-layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=None, help="default 4 x d_model")
    p.add_argument("--vocab", type=int, default=4096, help="combined vocabulary of the four modalities")
    p.add_argument("--dec-len", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--block", type=int, default=512, help="key/value block of blockwise and local attention")
    p.add_argument("--block-q", type=int, default=None, help="query block (default: --block)")
    p.add_argument("--window", type=int, default=128, help="window of local attention (|i-j| <= window/2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one warm-up step)")
    p.add_argument("--memory-limit", default=None,
                   help="bytes a cell may use, e.g. 8GiB or 5e9 (default: device memory; CPU: the machine's RAM)")
    p.add_argument("--hardware", default="auto", help="hardware table key for MFU (default: detected)")
    p.add_argument("--out", default=None, help="folder for seqlen.json, seqlen.txt and seqlen.png")
    p.add_argument("--json", action="store_true", help="print one JSON line: the list of rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)



def run(args) -> int:
    lengths = parse_lengths(args.lengths)
    attentions = parse_choices(args.attention, ATTENTION_IMPLEMENTATIONS, "--attention")
    remats = parse_choices(args.remat, REMAT_POLICIES, "--remat")
    limit = parse_bytes(args.memory_limit) if args.memory_limit is not None else None
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a folder")
    rows, info = bench_seqlen(lengths, attentions, remats, batch_size=args.batch, d_model=args.d_model,
                              enc_layers=args.enc_layers, dec_layers=args.dec_layers, heads=args.heads,
                              d_ff=args.d_ff, vocab=args.vocab, dec_len=args.dec_len, dtype=args.dtype,
                              block=args.block, block_q=args.block_q, window=args.window, steps=args.steps,
                              memory_limit=limit, hardware=args.hardware, progress=not args.quiet)
    table = format_table(rows, info)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        rundir.write_bytes(os.path.join(args.out, "seqlen.json"),
                           json.dumps({"info": info, "rows": rows}, indent=1).encode())
        rundir.write_bytes(os.path.join(args.out, "seqlen.txt"), (table + "\n").encode())
        plot(rows, info, os.path.join(args.out, "seqlen.png"))
    if args.json:
        print(json.dumps(rows))
    else:
        print(table)
        if args.out:
            print(f"wrote {os.path.join(args.out, 'seqlen.json')}, seqlen.txt, seqlen.png")
    return 0
