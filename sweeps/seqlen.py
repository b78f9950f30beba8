"""Quality at equal compute vs encoder length, per long-sequence technique (docs/longseq.md).

One model (d_model 64, 2+2 layers) at encoder lengths 64, 128, 256 and 512 on synthetic scenes rendered at
128 x 128 (a 16 x 16 grid of patches: 256 image tokens, 256 segmentation tokens, caption and boxes; so a longer
encoder sees more of each scene and longer context carries more signal). Every run spends the same accounted
model FLOPs (IsoFLOP design with a single size: its steps are set so that ``model_flops`` equals the budget,
``medscale.accounting.step_flops`` with the run's attention and window).

The technique is the argument (default ``dense``): ``dense``, ``blockwise`` (the same function as dense, in
O(L) memory: its losses must match dense's), ``local`` (sliding window of ``model.attention_window`` = 64
tokens in the encoder: a different, cheaper function), ``remat`` (dense with full rematerialisation: the same
function, more hardware FLOPs per step).

Run:  for t in dense local blockwise; do medscale sweep run sweeps/seqlen.py:$t --workers 2; done
      medscale sweep status sweeps/seqlen.py:local
"""

import ml_collections

TECHNIQUES = {
    "dense": ["model.attention=dense"],
    "blockwise": ["model.attention=blockwise", "model.attention_block=128"],
    "local": ["model.attention=local", "model.attention_window=64", "model.attention_block=64"],
    "remat": ["model.attention=dense", "model.remat=full"],
}


def get_config(technique: str = "dense"):
    if technique not in TECHNIQUES:
        raise ValueError(f"technique must be one of {', '.join(TECHNIQUES)}, not {technique!r}")
    c = ml_collections.ConfigDict()
    c.name = f"seqlen-{technique}"
    c.base = "tiny"
    c.set = ["data.image_size=128", "data.patch_size=8", "train.batch_size=16",
             *TECHNIQUES[technique]]
    c.design = "isoflop"
    c.sizes = ["d64l2"]
    c.enc_lens = [64, 128, 256, 512]
    c.dec_len = 48
    c.budgets = [3e12]  # model FLOPs per run, the same at every length
    c.per_budget = 1
    c.min_steps = 20
    c.lr = 3e-3
    c.seeds = [0]
    c.warmup_frac = 0.1
    c.evals_per_run = 4
    c.checkpoints_per_run = 2
    return c
