"""Repetition: the same sizes trained on 1, 4, 16 and 64 epochs of a fixed set of synthetic scenes, beside
fresh-data runs of the same token budgets, so that ``medscale fit --repetition`` can measure how fast repeated
tokens lose their worth (Muennighoff et al. 2023's R*_D; docs/fit.md, "Repetition").

The set is the stream's first ``UNIQUE`` scenes (``data.num_train``); a run of ``e`` epochs reads ``e x UNIQUE``
examples of ``enc_len + dec_len`` tokens each. Each token budget is run twice per size: on the fixed set
(``-u<UNIQUE>``: ``e`` epochs) and on the unbounded stream (``-u0``: every example fresh). Both are scored on the
same 128 held-out scenes, so the gap between them at equal tokens is the loss that repetition costs.

The argument scales the set (default 512 scenes: the CPU-sized design, 1.3e13 model FLOPs; 703 CPU-s of
training, 36 min wall on 2 cores shared with other jobs; results/repetition, docs/fit.md):
Run:  medscale sweep run sweeps/repetition.py --workers 2 --results results
      medscale fit results/repetition --repetition
"""

import ml_collections

from medscale.analysis.quickstart import lr_for
from medscale.sweep.design import shape_of

SIZES = ["d32l2", "d64l2"]
EPOCHS = [1, 4, 16, 64]
ENC_LEN, DEC_LEN = 64, 48  # tiny's lengths: 112 tokens per example read


def get_config(unique: str = "512"):
    unique = int(unique)
    c = ml_collections.ConfigDict()
    c.name = "repetition"
    c.base = "tiny"
    # the tokenizers learn from the set itself on every run (fresh ones too), so all runs share one vocabulary
    c.set = [f"data.tokenizer_examples={unique}", "train.task_eval_examples=0", "train.eval_batch_size=32",
             "train.eval_batches=4"]
    c.design = "grid"
    c.sizes = SIZES
    c.enc_lens = [ENC_LEN]
    c.dec_len = DEC_LEN
    c.batch_size = 32
    c.tokens = [e * unique * (ENC_LEN + DEC_LEN) for e in EPOCHS]
    c.num_trains = [unique, 0]
    c.lr = {s: lr_for(shape_of(s)["d_model"]) for s in SIZES}
    c.seeds = [0]
    c.warmup_frac = 0.05
    c.evals_per_run = 4
    c.checkpoints_per_run = 1
    return c
