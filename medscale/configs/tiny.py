"""The smallest config: a ~1e5-parameter model on 64x64 synthetic scenes. Used by tests and smoke runs.

Run:  medscale train --config medscale/configs/tiny.py --workdir /tmp/tiny
"""

from medscale.configs import base


def get_config():
    c = base.get_config()
    c.model.size = "tiny"
    c.data.num_eval = 128
    c.data.text_vocab = 512
    c.data.image_vocab = 128
    c.data.seg_vocab = 64
    c.data.caption_tokens = 48
    c.data.box_tokens = 24
    c.data.enc_len = 64
    c.data.dec_len = 48
    c.train.batch_size = 16
    c.train.tokens = 16 * (64 + 48) * 300  # 300 steps
    c.train.warmup_steps = 30
    c.train.eval_every = 100
    c.train.ckpt_every = 100
    c.train.task_eval_examples = 16
    return c
