"""An IsoFLOP study sized for one DGX-1 (8 x V100 32 GB): ladder sizes around Chinchilla's optimum for budgets
from 1e17 to 1e19 model FLOPs: 1.4e20 FLOPs in all, about 5 days of one DGX-1 at 35% MFU of the V100's fp16 peak,
training in float16 with dynamic loss scaling (V100 has no bfloat16 tensor cores)
(``medscale sweep run sweeps/dgx1_isoflop.py --dry-run`` lists the runs).

Emit it for the cluster:
  medscale sweep emit sweeps/dgx1_isoflop.py --target kubernetes --out k8s/ --gpus 8 --image REGISTRY/medscale:TAG
  medscale sweep emit sweeps/dgx1_isoflop.py --target slurm --out slurm/ --gpus 8 --partition gpu
or run it on one machine:  medscale sweep run sweeps/dgx1_isoflop.py
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "dgx1_isoflop"
    c.base = "base"
    c.set = ["train.batch_size=1024", "model.dtype=float16"]  # V100: fp16 tensor cores
    c.design = "isoflop"
    c.sizes = ["xxs", "xs", "small", "medium", "base", "large", "xl"]
    c.enc_lens = [128, 256]
    c.budgets = [1e17, 3e17, 1e18, 3e18, 1e19]
    c.per_budget = 5
    c.spread = 16.0
    c.law = "chinchilla"
    c.lr = {"default": 1e-3, "xxs": 2e-3, "xs": 2e-3, "xl": 6e-4, "large": 8e-4}
    c.warmup_frac = 0.05
    c.evals_per_run = 10
    c.checkpoints_per_run = 10
    return c
