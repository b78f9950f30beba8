"""A grid sweep: every size x encoder length x token budget, on CPU-sized models (minutes per run).

Run:  medscale sweep run sweeps/grid_example.py --workers 2
      medscale sweep status sweeps/grid_example.py
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "grid_example"
    c.base = "tiny"
    c.design = "grid"
    c.sizes = ["d32l1", "d64l2", "mini"]  # explicit shapes and a ladder name
    c.enc_lens = [32, 64]
    c.tokens = [2e5, 1e6]  # encoder + decoder tokens per run
    c.lr = {"default": 3e-3, "mini": 2e-3}
    c.seeds = [0]
    c.warmup_frac = 0.1
    c.evals_per_run = 5
    c.checkpoints_per_run = 4
    return c
