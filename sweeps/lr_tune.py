"""The learning-rate tuning sweep behind the quickstart's per-width rule (``medscale.analysis.quickstart.lr_for``).

Three widths (d_model 32, 64, 128; 2 encoder + 2 decoder layers) x five peak rates (1.5e-3 .. 2.4e-2, a factor 2
apart), each run on the same 400,000 tokens (about 3,600 synthetic examples, none repeated), batch 16, warmup 5%,
cosine decay. ``docs/sweep.md`` ("Learning rates") shows the loss against the rate per width and the rule fitted
to the best rates; the records are in ``results/lr_tune``.

Run:  medscale sweep run sweeps/lr_tune.py --workers 2 --results results
"""

import ml_collections

RATES = [1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2]
SIZES = ["d32l2", "d64l2", "d128l2"]


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "lr_tune"
    c.base = "tiny"
    c.set = ["data.num_train=0", "train.task_eval_examples=0", "train.eval_batch_size=32",
             "train.eval_batches=4"]
    c.design = "grid"
    c.sizes = SIZES
    c.enc_lens = [64]
    c.tokens = [4e5]
    c.batch_size = 16
    c.lrs = RATES
    c.seeds = [0]
    c.evals_per_run = 1
    c.checkpoints_per_run = 1
    c.warmup_frac = 0.05
    return c
