"""A mainstream PyTorch encoder-decoder with the shapes of ``medscale bench step``, for a same-machine comparison.

Run by ``medscale bench torch --python PATH`` (PATH: an interpreter with torch; torch is not a medscale
dependency, and this file imports nothing from medscale), or directly:

    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
    /tmp/venv-torch/bin/python medscale/bench/torch_encdec.py --vocab-total 8192 --json

Model: token embedding over the combined vocabulary + learned modality embedding, ``torch.nn.Transformer``
(pre-LN, GELU, no dropout; its linear layers carry biases), one bias-free output projection over the combined
vocabulary and cross-entropy; AdamW with gradient clipping. Encoder padding is masked, decoder self-attention
is causal. One training step = forward, backward, clip, AdamW update, timed like ``medscale bench step``
(median of timed steps after ``--warmup`` untimed ones, 3 by default as in ``bench step``).
"""

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn


class EncDec(nn.Module):
    def __init__(self, d_model, heads, d_ff, enc_layers, dec_layers, vocab, modalities=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.enc_mod = nn.Embedding(modalities, d_model)
        self.dec_mod = nn.Embedding(modalities, d_model)
        self.core = nn.Transformer(d_model=d_model, nhead=heads, num_encoder_layers=enc_layers,
                                   num_decoder_layers=dec_layers, dim_feedforward=d_ff, dropout=0.0,
                                   activation="gelu", batch_first=True, norm_first=True)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, enc_tok, enc_mod, enc_pad, dec_in, dec_mod, causal):
        src = self.tok(enc_tok) + self.enc_mod(enc_mod)
        tgt = self.tok(dec_in) + self.dec_mod(dec_mod)
        y = self.core(src, tgt, tgt_mask=causal, src_key_padding_mask=enc_pad, memory_key_padding_mask=enc_pad)
        return self.head(y)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--enc-layers", type=int, default=4)
    p.add_argument("--dec-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--vocab-total", type=int, default=8192, help="combined vocabulary (all modalities' rows)")
    p.add_argument("--enc-len", type=int, default=256)
    p.add_argument("--dec-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (bench torch passes medscale's)")
    # the cores this process may run on (so that ``taskset -c 0`` gives a one-core comparison, like XLA's pool)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model = EncDec(a.d_model, a.heads, a.d_ff, a.enc_layers, a.dec_layers, a.vocab_total)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    b, le, ld, v = a.batch, a.enc_len, a.dec_len, a.vocab_total
    enc_tok = torch.randint(0, v, (b, le))
    enc_mod = torch.randint(0, 4, (b, le))
    lengths = torch.randint(le // 2, le + 1, (b,))
    enc_pad = torch.arange(le)[None, :] >= lengths[:, None]  # True = padding
    dec_in = torch.randint(0, v, (b, ld))
    dec_mod = torch.randint(0, 4, (b, ld))
    target = torch.randint(0, v, (b, ld))
    causal = nn.Transformer.generate_square_subsequent_mask(ld)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(enc_tok, enc_mod, enc_pad, dec_in, dec_mod, causal)
        loss = nn.functional.cross_entropy(logits.reshape(-1, v), target.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    out = {"step_s": step_s, "step_s_all": times, "tokens_per_s": b * (le + ld) / step_s,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "params": sum(x.numel() for x in model.parameters())}
    print(json.dumps(out) if a.json else "\n".join(f"{k:14s} {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
