"""Unified encoder vs one encoder stack per input modality, at equal compute (docs/model.md, "Encoder kinds").

Both families train the same six shapes (d_model 16 and 24 with d_ff 2 x d_model, 32 with d_ff 64 and 128, 48, 64;
2 encoder + 2 decoder layers) at the same three IsoFLOP budgets (model FLOPs per run: each run's steps are set so
that its accounted ``model_flops`` equal the budget), on the same batches: both cap each modality's encoder inputs
at the same fixed shares (``data.enc_split``: image 21, caption 15, boxes 8, segmentation 20 of the 64 encoder tokens, the per-modality
encoder's default split), so the only difference between the families is the encoder. A per-modality model of a
shape has four encoder stacks (about 2.3x the non-embedding parameters) and slightly fewer FLOPs per step (each
stack's attention spans its own tokens only), so it trains a few more steps at a budget.

The argument is the family (``unified`` or ``per_modality``); its runs go to ``<results>/<family>/``.

Run:  for f in unified per_modality; do
        nice medscale sweep run sweeps/encoder_ablation.py:$f --results results/encoder_ablation --workers 1 &
      done; wait
      medscale report results/encoder_ablation --ablation
"""

import ml_collections

FAMILIES = ("unified", "per_modality")
# d16l2f32, d24l2f48 (d_ff 2 x d_model) and d32l2f64 (d_ff 64): below d32l2, where these short runs' optimum is
SIZES = ["d16l2f32", "d24l2f48", "d32l2f64", "d32l2", "d48l2", "d64l2"]
BUDGETS = [1.6e10, 4e10, 1e11]
SPLIT = "(21,15,8,20)"  # image, caption, boxes, segmentation: data.enc_split of both families


def get_config(family: str = "unified"):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    c = ml_collections.ConfigDict()
    c.name = family
    c.base = "tiny"
    c.set = [f"model.encoder={family}", f"data.enc_split={SPLIT}", "data.num_train=0",
             "train.eval_batch_size=16", "train.eval_batches=2", "train.task_eval_examples=0"]
    c.design = "isoflop"
    c.sizes = list(SIZES)
    c.enc_lens = [64]
    c.batch_size = 8
    c.budgets = list(BUDGETS)
    c.per_budget = len(SIZES)  # every shape at every budget, for both families
    c.spread = 4.0
    c.min_steps = 15
    c.warmup_frac = 0.05
    # the quickstart's width rule, lr_for(d_model) of medscale/analysis/quickstart.py
    c.lr = {"d16l2f32": 7.14e-3 * 4 ** 0.83, "d24l2f48": 7.14e-3 * (64 / 24) ** 0.83, "d32l2f64": 7.14e-3 * 2 ** 0.83, "d32l2": 7.14e-3 * 2 ** 0.83, "d48l2": 7.14e-3 * (64 / 48) ** 0.83,
            "d64l2": 7.14e-3}
    c.seeds = [0]
    c.evals_per_run = 2
    c.checkpoints_per_run = 1
    return c
