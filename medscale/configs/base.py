"""Base training config: every field a run reads, with defaults. Other configs start from this one.

Run:  medscale train --config medscale/configs/base.py --set model.size=xs --workdir /tmp/run
"""

import ml_collections

from medscale import modalities
from medscale.options import SHARDING_RULES


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.size = "tiny"  # a ladder name (medscale/configs/ladder.py); explicit fields below override it
    c.model.d_model = ml_collections.FieldReference(None, field_type=int)
    c.model.enc_layers = ml_collections.FieldReference(None, field_type=int)
    c.model.dec_layers = ml_collections.FieldReference(None, field_type=int)
    c.model.num_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.d_ff = ml_collections.FieldReference(None, field_type=int)
    c.model.mlp = ml_collections.FieldReference(None, field_type=str)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16 (params stay float32; float16 with
    # dynamic loss scaling, train.loss_scale_*)
    c.model.remat = "none"  # one of medscale.options.REMAT_POLICIES: none | full | save_dots
    c.model.encoder = "unified"  # unified | per_modality: one encoder stack per input modality (docs/model.md)
    c.model.attention = "dense"  # one of medscale.options.ATTENTION_IMPLEMENTATIONS
    c.model.attention_block = 512  # key/value block for blockwise attention
    c.model.attention_window = 128  # encoder window for local attention

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "synthetic_med"  # synthetic_med | roco | rocov2 | medmnist | vqa_rad | slake
    c.data.data_dir = ""  # TFDS data_dir; empty: ~/.cache/medscale/tfds
    c.data.manual_dir = ""  # for real datasets the user downloaded
    c.data.subset = ""  # medmnist: FLAG or FLAG_SIZE (the .npz name); may be empty when manual_dir holds one;
    # slake: en (default), zh or all
    c.data.num_train = 0  # synthetic training scenes: 0 = the unbounded stream (no scene seen twice); n > 0 = the
    # first n scenes, cycled (a fixed-size set); real datasets read their whole train split
    c.data.stream_chunk = 4096  # synthetic scenes per token-cache chunk of the training stream
    c.data.num_eval = 512
    c.data.image_size = 64
    c.data.patch_size = 8
    c.data.modalities = modalities.names()  # every registered modality (medscale/modalities.py)
    for key, default in modalities.config_defaults().items():  # image_vocab 512, text_vocab 2048,
        c.data[key] = default  # caption_tokens 64, box_tokens 32, seg_vocab 256
    c.data.enc_len = 128
    c.data.dec_len = 64
    c.data.enc_split = ()  # encoder tokens per modality (data.modalities order, sum enc_len): a cap on each
    # modality's inputs; () = none for a unified encoder, shares in proportion to max tokens for per_modality
    c.data.dirichlet_alpha = 0.5
    c.data.mixture = "all2all:0.5,image2all:0.5"  # 4M mixture: all2all and <modality>2all components
    c.data.data_seed = 0  # the synthetic dataset's seed (the training seed only orders and masks)
    c.data.num_sentinels = 16  # span-masking sentinel tokens in the text vocabulary
    c.data.box_bins = 32  # quantisation bins per box coordinate (v0..v3 tokens)
    c.data.tokenizer_examples = 2000  # training examples the tokenizers learn from
    c.data.vq_iters = 15  # k-means iterations of the image and segmentation codebooks

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16
    c.train.tokens = 2_000_000  # the run's token budget (encoder + decoder tokens); sets steps and schedule
    c.train.steps = ml_collections.FieldReference(None, field_type=int)  # explicit steps override tokens
    c.train.lr = 3e-3
    c.train.warmup_steps = 50
    c.train.final_lr_ratio = 0.1
    c.train.weight_decay = 0.05
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.clip_norm = 1.0
    c.train.microbatches = 1  # gradient accumulation: micro-batches per step (batch_size must divide by
    # microbatches x the data-parallel size); the same update as one batch, up to float rounding
    # dynamic loss scaling, float16 runs only: the loss is multiplied by the scale before differentiation; a
    # step with a non-finite gradient is skipped and the scale divided by the factor; after loss_scale_period
    # consecutive finite steps it is multiplied by the factor; a scale below 1 ends the run as diverged
    c.train.loss_scale_init = 2.0**15
    c.train.loss_scale_factor = 2.0
    c.train.loss_scale_period = 2000
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.eval_batch_size = 0  # examples per evaluation batch (0: train.batch_size); a sweep fixes it so that
    # every run, whatever its batch, is scored on the same eval_batches x eval_batch_size examples
    c.train.fixed_eval_enc_len = 0  # > 0: also score the length-independent evaluation (the eval set masked at
    # this reference encoder length, inputs refitted to the run's: the same targets at every length; 0: off)
    c.train.ckpt_every = 200
    c.train.log_every = 10
    c.train.spike_factor = 5.0  # loss above spike_factor x its running minimum (after warmup) = diverged
    c.train.task_eval_examples = 64  # held-out examples decoded for task metrics at the end of a run (0: off)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # ('data', 'fsdp', 'tensor'); one axis may be -1
    c.mesh.rules = SHARDING_RULES  # logical axis -> mesh axis (or None); medscale/options.py

    c.hardware = "auto"  # hardware table key for MFU; auto: from jax.devices()
    return c
