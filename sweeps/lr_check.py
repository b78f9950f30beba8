"""Does the quickstart's learning-rate rule hold at its largest budget? The smallest and the largest size the
quickstart trains near its top budget (2e12 model FLOPs, batch 64, fresh data), each at half, once and twice the
rule's rate (``medscale.analysis.quickstart.lr_for``). ``docs/sweep.md`` ("Learning rates") gives the losses;
the records are in ``results/lr_check``.

Run:  medscale sweep run sweeps/lr_check.py --workers 2 --results results
"""

import ml_collections

from medscale.analysis.quickstart import lr_for
from medscale.sweep.design import shape_of

SIZES = ["d32l2", "d96l2"]


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "lr_check"
    c.base = "tiny"
    c.set = ["data.num_train=0", "train.task_eval_examples=0", "train.eval_batch_size=32", "train.eval_batches=4"]
    c.design = "isoflop"
    c.sizes = SIZES
    c.enc_lens = [64]
    c.budgets = [2e12]
    c.batch_per_budget = [64]
    c.per_budget = len(SIZES)
    c.spread = 1e6  # both sizes, whatever the expected optimum
    c.min_steps = 1
    c.lr = {s: lr_for(shape_of(s)["d_model"]) for s in SIZES}
    c.lr_factors = [0.5, 1.0, 2.0]
    c.seeds = [0]
    c.evals_per_run = 1
    c.checkpoints_per_run = 1
    c.warmup_frac = 0.05
    return c
