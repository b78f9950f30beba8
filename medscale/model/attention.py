"""The model's one attention function, with an ``implementation`` switch.

Layout follows ``jax.nn.dot_product_attention``: q ``[B, Lq, H, Dh]``, k and v ``[B, Lk, H, Dh]``; the
result is ``[B, Lq, H, Dh]``. Which query may see which key is described by vectors, never by a dense mask
argument, so that memory-efficient implementations can build each block's mask on the fly:

    allowed(b, i, j) = q_segment[b, i] >= 0 and kv_segment[b, j] >= 0
                       and (not same_segment or q_segment[b, i] == kv_segment[b, j])
                       and (not q_causal[b, i] or j <= i)

- encoder self-attention: segments = 0 where valid else -1; ``same_segment=False``; no causal rows;
- decoder self-attention (4M mask): segments = modality id where valid else -1; ``same_segment=True``;
  ``q_causal`` = the decoder's causal flag (sequence targets), so image-like targets attend bidirectionally
  within their modality and sequence targets causally within theirs;
- cross-attention: q segments from decoder validity, kv segments from encoder validity; ``same_segment=False``.

A query with no allowed key (padding) returns zeros. Softmax statistics are kept in float32 whatever the
input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("dense",)


def allowed_mask(q_segment, kv_segment, q_causal=None, same_segment=False):
    """Dense boolean mask ``[B, 1, Lq, Lk]`` of the rule above (used by the dense path and by tests)."""
    ok = (q_segment[:, :, None] >= 0) & (kv_segment[:, None, :] >= 0)
    if same_segment:
        ok = ok & (q_segment[:, :, None] == kv_segment[:, None, :])
    if q_causal is not None:
        lq, lk = q_segment.shape[1], kv_segment.shape[1]
        tri = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None]
        ok = ok & (~q_causal[:, :, None] | tri[None])
    return ok[:, None]


def _dense(q, k, v, mask):
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.maximum(denom, 1e-30)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def attend(q, k, v, *, q_segment, kv_segment, q_causal=None, same_segment=False,
           implementation="dense", **options):
    """Attention under the segment/causal rule of this module's docstring."""
    if implementation == "dense":
        return _dense(q, k, v, allowed_mask(q_segment, kv_segment, q_causal, same_segment))
    raise ValueError(f"unknown attention implementation {implementation!r}; known: {IMPLEMENTATIONS}")


__all__ = ["attend", "allowed_mask", "IMPLEMENTATIONS", "jax"]
