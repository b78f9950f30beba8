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

The argument ``law`` is a different design: sequence length as a variable of the scaling law (docs/longseq.md,
"Sequence length as a variable"). Encoder lengths 32, 64, 128 x three IsoFLOP budgets (5e10, 1.6e11, 5e11 model
FLOPs) x three sizes per budget around the quickstart's expected optimum, on the quickstart's data (64 x 64
scenes: 64 image and 64 segmentation tokens, caption, boxes), its learning-rate rule and batches; every run also
scores the length-independent evaluation (``train.fixed_eval_enc_len=128``: the same 128 held-out examples and
the same decoder targets at every encoder length), which the joint law L(N, D, l) is fitted to.

Run:  nice medscale sweep run sweeps/seqlen.py:law --workers 2        (results/seqlen-law; 27 runs)
      medscale report results/reference --seqlen results/seqlen-law
"""

import ml_collections

from medscale.analysis.quickstart import BUDGETS, SIZES, lr_for
from medscale.sweep.design import normalize, shape_of

LAW_LENGTHS = [32, 64, 128]
LAW_BUDGETS = BUDGETS[1:4]  # 5e10, 1.6e11, 5e11
LAW_BATCHES = [4, 16, 16]


def law_sweep():
    """The sequence-length law's design (a normalized ConfigDict)."""
    c = ml_collections.ConfigDict()
    c.name = "seqlen-law"
    c.base = "tiny"
    c.set = ["data.num_train=0", "train.eval_batch_size=32", "train.eval_batches=4",
             f"train.fixed_eval_enc_len={max(LAW_LENGTHS)}", "train.task_eval_examples=0"]
    c.design = "isoflop"
    c.sizes = list(SIZES)
    c.enc_lens = list(LAW_LENGTHS)
    c.budgets = list(LAW_BUDGETS)
    c.batch_per_budget = list(LAW_BATCHES)
    c.per_budget = 3
    c.spread = 20.0
    c.law = "chinchilla"
    c.center_factor = 0.5
    c.min_steps = 30
    c.warmup_frac = 0.05
    c.lr = {s: lr_for(shape_of(s)["d_model"]) for s in SIZES}
    c.seeds = [0]
    c.eval_fraction = 0.05
    c.evals_per_run = 4
    c.checkpoints_per_run = 1
    return normalize(c, source="sweeps/seqlen.py:law")

TECHNIQUES = {
    "dense": ["model.attention=dense"],
    "blockwise": ["model.attention=blockwise", "model.attention_block=128"],
    "local": ["model.attention=local", "model.attention_window=64", "model.attention_block=64"],
    "remat": ["model.attention=dense", "model.remat=full"],
}


def get_config(technique: str = "dense"):
    if technique == "law":
        return law_sweep()
    if technique not in TECHNIQUES:
        raise ValueError(f"technique must be one of {', '.join(TECHNIQUES)} or law, not {technique!r}")
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
