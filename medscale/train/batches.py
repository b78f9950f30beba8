"""Random batches that follow the batch contract (``medscale/data/batch.py``) for a ModelSpec.

Used by ``medscale bench step`` (throughput does not depend on token values) and by model tests (masks,
sharding equivalence). Training itself reads the data pipeline. Each example holds, in the encoder, a
prefix of the first image-like modality's grid then one sequence modality (the rest padding), and in the
decoder an image-like target segment (bidirectional) then a causal sequence segment then padding.
"""

from __future__ import annotations

import numpy as np

from medscale.spec import ModelSpec


def _segments(spec: ModelSpec, length: int, rng, sizes):
    """Fill ``length`` slots with contiguous segments (modality index, count); returns the id arrays."""
    mod = np.zeros(length, np.int32)
    pos = np.zeros(length, np.int32)
    valid = np.zeros(length, bool)
    i = 0
    for m_idx, n in sizes:
        n = int(min(n, length - i, spec.modalities[m_idx].max_tokens))
        if n <= 0:
            continue
        mod[i:i + n] = m_idx
        if spec.modalities[m_idx].kind == "image":
            pos[i:i + n] = np.sort(rng.choice(spec.modalities[m_idx].max_tokens, n, replace=False))
        else:
            pos[i:i + n] = np.arange(n)
        valid[i:i + n] = True
        i += n
    return mod, pos, valid


def random_batch(spec: ModelSpec, batch_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = [i for i, m in enumerate(spec.modalities) if m.kind == "image"]
    seqs = [i for i, m in enumerate(spec.modalities) if m.kind == "sequence"]
    le, ld = spec.enc_len, spec.dec_len
    keys = ("enc_tokens", "enc_modality", "enc_pos", "enc_valid", "dec_input", "dec_target", "dec_modality",
            "dec_pos", "dec_valid", "dec_causal")
    out = {k: [] for k in keys}
    vocab = np.asarray(spec.vocab_sizes)
    for _ in range(batch_size):
        enc_sizes = []
        if images:
            enc_sizes.append((images[0], rng.integers(le // 4, le // 2 + 1)))
        if seqs:
            enc_sizes.append((seqs[0], rng.integers(1, max(2, le // 3))))
        mod, pos, valid = _segments(spec, le, rng, enc_sizes)
        tokens = np.where(valid, rng.integers(0, vocab[mod]), 0).astype(np.int32)
        out["enc_tokens"].append(tokens)
        out["enc_modality"].append(np.where(valid, mod, 0))
        out["enc_pos"].append(np.where(valid, pos, 0))
        out["enc_valid"].append(valid)
        dec_sizes = []
        if images:
            dec_sizes.append((images[-1], rng.integers(1, ld // 2 + 1)))
        if seqs:
            dec_sizes.append((seqs[-1], rng.integers(2, ld // 2 + 1)))
        mod, pos, valid = _segments(spec, ld, rng, dec_sizes)
        causal = valid & np.array([spec.modalities[m].kind == "sequence" for m in mod])
        target = np.where(valid, rng.integers(0, vocab[mod]), 0).astype(np.int32)
        prev = np.concatenate([[0], target[:-1]])
        first = causal & (pos == 0)
        dec_input = np.where(causal, np.where(first, 0, prev), 0).astype(np.int32)
        out["dec_input"].append(dec_input)
        out["dec_target"].append(target)
        out["dec_modality"].append(np.where(valid, mod, 0))
        out["dec_pos"].append(np.where(valid, pos, 0))
        out["dec_valid"].append(valid)
        out["dec_causal"].append(causal)
    return {k: np.stack(v).astype(np.bool_ if k.endswith(("valid", "causal")) else np.int32)
            for k, v in out.items()}
