"""Decoding a trained encoder-decoder from any input subset to any target subset.

The model (``medscale.model.encdec.EncoderDecoder``) is split once into a graph definition and its state
(``nnx.split``); every device function below is a plain ``jax.jit`` of the state, so the parameters are
arguments, not constants, and a new checkpoint does not recompile anything.

- Inputs: token arrays per input modality (image-like: the full grid, ``[B, h*w]``; sequences: ``[B, T]``
  with a validity mask). They are laid out in the encoder in the order of ``ModelSpec.modalities``, each with
  its own positions 0..n-1. The encoder length is the sum of the input modalities' lengths (positions are
  fixed sin-cos, so the model has no length-dependent weights; this equals the training length when an
  image alone is given).
- Decoder self-attention is restricted to one modality (the 4M mask), so target modalities do not see each
  other: decoding them one at a time is exactly decoding them together.
- Sequence targets (caption, boxes-as-text): autoregressive. ``prefill`` runs the encoder once and computes
  every decoder layer's cross-attention keys and values from its output; ``step`` decodes one position with a
  self-attention key/value cache of fixed length (the longest target's ``max_tokens``). Several sequence
  targets of one vocabulary size are decoded together as extra rows of one batch (row r decodes target
  ``target_B[r]``, a traced value), so caption and boxes share one compiled step and one host loop. Every
  call has the same shapes: the step compiles once per (rows, cache length, encoder length). Sampling inside
  the step: greedy (temperature 0), temperature, top-k (k = 0: no truncation), a per-row mask of allowed
  ids, and per-row id groups for "grouped greedy" (the choice between sets of ids is made on their total
  probability: for boxes, "a new box starts" -- any of the 32 first-corner bins -- against "</s>"; plain
  argmax would let "none"/"</s>" win whenever no single bin beats it although a box is the more likely
  continuation); all are traced values, so changing them does not recompile either.
- Compiled functions are cached per (graph definition, spec), so a second ``Decoder`` of the same
  architecture (another checkpoint, another CLI call in the same process) reuses them.
- Image-like targets (segmentation, image tokens): all positions predicted in parallel from the learned mask
  vector. With ``steps > 1`` the MaskGIT schedule (Chang et al., 2022, "MaskGIT: Masked Generative Image
  Transformer", CVPR) is used: at step s of S the most confident predictions are kept so that
  ``floor(n * cos(pi/2 * (s+1)/S))`` positions remain open; kept tokens become encoder inputs of their own
  modality (as in 4M's chained generation, Mizrahi et al., 2023), open ones stay decoder queries.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medscale.model.attention import attend


@dataclasses.dataclass
class SequenceResult:
    tokens: np.ndarray  # [B, T] int32, local ids; positions after EOS (or unused) are -1
    lengths: np.ndarray  # [B] tokens before EOS (EOS not counted)
    logprobs: np.ndarray  # [B, T] float32 log-probability of each chosen token under the model (0 after end)


@dataclasses.dataclass
class GridResult:
    tokens: np.ndarray  # [B, n] int32 local ids
    confidence: np.ndarray  # [B, n] float32 probability of the chosen token when it was fixed


def _proj(x_BLD, w, dtype):
    return jnp.einsum("bld,dhk->blhk", x_BLD, w[...].astype(dtype),
                      preferred_element_type=jnp.float32).astype(dtype)


def _out(a_BLHK, w, dtype):
    return jnp.einsum("blhk,hkd->bld", a_BLHK.astype(dtype), w[...].astype(dtype),
                      preferred_element_type=jnp.float32).astype(dtype)


def _sample(logits_BV, key, temperature, top_k, group_BV=None):
    """Greedy when temperature <= 0, else softmax(logits / T) truncated to the top-k (k <= 0: all).

    ``group_BV`` (ids in ``[0, V)``; None: every id its own group): greedy first picks the group of largest
    total probability, then its most likely id ("grouped greedy"; with singleton groups it is plain argmax).
    """
    v = logits_BV.shape[-1]
    k_eff = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    scaled = logits_BV / jnp.maximum(temperature, 1e-6)
    kth = jnp.take_along_axis(jnp.sort(scaled, axis=-1),
                              jnp.broadcast_to(v - k_eff, scaled.shape[:-1] + (1,)).astype(jnp.int32), axis=-1)
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    if group_BV is None:
        greedy = jnp.argmax(logits_BV, axis=-1)
    else:
        probs = jax.nn.softmax(logits_BV, axis=-1)
        mass = jax.vmap(lambda p, g: jax.ops.segment_sum(p, g, num_segments=v))(probs, group_BV)
        best = jnp.argmax(mass, axis=-1)
        greedy = jnp.argmax(jnp.where(group_BV == best[:, None], logits_BV, -jnp.inf), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _make_fns(graphdef, spec):
    """The three jitted device functions of one architecture (see the module docstring)."""

    def prefill(state, enc):
        """Encoder once, and every decoder layer's cross-attention K/V: ``[layers, B, E, H, K]``."""
        model = nnx.merge(graphdef, state)
        dtype = model.dtype
        enc_BED, eseg_BE = model.encode(enc)
        ck = jnp.stack([_proj(enc_BED, lyr.cross_attn.k, dtype) for lyr in model.decoder])
        cv = jnp.stack([_proj(enc_BED, lyr.cross_attn.v, dtype) for lyr in model.decoder])
        return {"cross_k": ck, "cross_v": cv, "eseg": eseg_BE}

    def step(state, cache, tok_B, t, target_B, temperature, top_k, allowed_BV, group_BV, key, *, size: int):
        """Decode position ``t`` of row b's sequence modality ``target_B[b]`` given its previous token;
        ids where ``allowed_BV`` is False are never produced; ``group_BV``: greedy's id groups (``_sample``).
        All targets share the vocabulary ``size``.

        Returns ``(next token [B], its log-probability [B], logits [B, size], cache)``."""
        model = nnx.merge(graphdef, state)
        dtype = model.dtype
        b = tok_B.shape[0]
        length = cache["self_k"].shape[2]
        pos = jnp.full((b, 1), t, jnp.int32)
        tok, rest = model._embed(tok_B[:, None].astype(jnp.int32), target_B[:, None], pos, model.dec_modality)
        y_B1D = (tok + rest).astype(model.residual_dtype)
        q_seg = jnp.zeros((b, 1), jnp.int32)
        self_seg = jnp.broadcast_to(jnp.where(jnp.arange(length) <= t, 0, -1).astype(jnp.int32), (b, length))
        sk, sv = cache["self_k"], cache["self_v"]
        for i, lyr in enumerate(model.decoder):
            h = lyr.ln1(y_B1D, dtype)
            q = _proj(h, lyr.self_attn.q, dtype)
            sk = jax.lax.dynamic_update_slice(sk, _proj(h, lyr.self_attn.k, dtype)[None], (i, 0, t, 0, 0))
            sv = jax.lax.dynamic_update_slice(sv, _proj(h, lyr.self_attn.v, dtype)[None], (i, 0, t, 0, 0))
            a = attend(q, sk[i], sv[i], q_segment=q_seg, kv_segment=self_seg)
            y_B1D = y_B1D + _out(a, lyr.self_attn.o, dtype)
            h = lyr.ln2(y_B1D, dtype)
            a = attend(_proj(h, lyr.cross_attn.q, dtype), cache["cross_k"][i], cache["cross_v"][i],
                       q_segment=q_seg, kv_segment=cache["eseg"])
            y_B1D = y_B1D + _out(a, lyr.cross_attn.o, dtype)
            y_B1D = y_B1D + lyr.mlp(lyr.ln3(y_B1D, dtype), dtype, model.ops)
        full = model._logits(model.dec_norm(y_B1D, dtype))[:, 0]  # [B, V_total]
        offs = jnp.asarray(spec.vocab_offsets, jnp.int32)[target_B]
        logits = jnp.take_along_axis(full, offs[:, None] + jnp.arange(size, dtype=jnp.int32)[None], axis=1)
        logits = jnp.where(allowed_BV, logits, -jnp.inf)
        nxt = _sample(logits, key, temperature, top_k, group_BV)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
        return nxt, logp, logits, {**cache, "self_k": sk, "self_v": sv}

    def parallel(state, enc, fixed_tok, fixed, temperature, key, *, target: int):
        """One parallel pass over image-like modality ``target``: tokens in ``fixed`` are encoder inputs, the
        others decoder queries. Returns (sampled tokens [B, n], their probability [B, n], logits)."""
        model = nnx.merge(graphdef, state)
        b, n = fixed_tok.shape
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        mod = jnp.full((b, n), target, jnp.int32)
        full = {
            "enc_tokens": jnp.concatenate([enc["enc_tokens"], jnp.where(fixed, fixed_tok, 0)], 1),
            "enc_modality": jnp.concatenate([enc["enc_modality"], mod], 1),
            "enc_pos": jnp.concatenate([enc["enc_pos"], pos], 1),
            "enc_valid": jnp.concatenate([enc["enc_valid"], fixed], 1),
        }
        enc_BED, eseg = model.encode(full)
        dec = {"dec_input": jnp.zeros((b, n), jnp.int32), "dec_modality": mod, "dec_pos": pos,
               "dec_valid": ~fixed, "dec_causal": jnp.zeros((b, n), bool)}
        y = model.decode(dec, enc_BED, eseg)
        off, size = spec.vocab_offsets[target], spec.vocab_sizes[target]
        logits = model._logits(y)[..., off:off + size]
        tok = _sample(logits.reshape(b * n, size), key, temperature, jnp.int32(0)).reshape(b, n)
        prob = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), tok[..., None], axis=-1)[..., 0]
        return tok, prob, logits

    return (jax.jit(prefill), jax.jit(step, static_argnames=("size",), donate_argnums=(1,)),
            jax.jit(parallel, static_argnames=("target",)))


_FNS: dict = {}


class Decoder:
    """Cached autoregressive and parallel decoding of one model (see the module docstring)."""

    def __init__(self, model):
        self.spec = model.spec
        self.graphdef, self.state = nnx.split(model)
        key = (self.graphdef, self.spec)
        if key not in _FNS:
            _FNS[key] = _make_fns(self.graphdef, self.spec)
        self.prefill, self.step, self.parallel = _FNS[key]

    # ------------------------------------------------------------------------------------------ host side
    def encoder_inputs(self, inputs: dict) -> dict:
        """Encoder arrays from ``{modality: tokens [B, n]}`` or ``{modality: (tokens, valid)}`` (numpy)."""
        spec = self.spec
        unknown = [k for k in inputs if k not in {m.name for m in spec.modalities}]
        if unknown:
            raise ValueError(f"unknown input modality {unknown[0]!r}")
        parts = []
        for i, m in enumerate(spec.modalities):
            if m.name not in inputs:
                continue
            val = inputs[m.name]
            tok, valid = (val if isinstance(val, tuple) else (val, None))
            tok = np.asarray(tok, np.int32)
            valid = np.ones(tok.shape, bool) if valid is None else np.asarray(valid, bool)
            if tok.shape[1] > m.max_tokens:
                raise ValueError(f"input {m.name!r} has {tok.shape[1]} tokens > max_tokens {m.max_tokens}")
            b, n = tok.shape
            parts.append((np.where(valid, tok, 0), np.full((b, n), i, np.int32),
                          np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)), valid))
        if not parts:
            raise ValueError("give at least one input modality")
        cat = [np.concatenate([p[j] for p in parts], axis=1) for j in range(4)]
        keys = ("enc_tokens", "enc_modality", "enc_pos", "enc_valid")
        return {k: np.ascontiguousarray(a) for k, a in zip(keys, cat)}

    # ------------------------------------------------------------------------------------------ loops
    def generate_sequences(self, enc: dict, targets, *, start_id: int, eos_id: int | None,
                           max_len: int | None = None, temperature: float = 0.0, top_k: int = 0,
                           seed: int = 0, banned_ids=None, groups=None) -> dict:
        """Autoregressive decoding of sequence modalities ``targets`` (same vocabulary size), together as rows
        of one batch; a host loop over the jitted step stops when every row has produced ``eos_id`` or
        reached its modality's ``max_tokens`` (or ``max_len``). ``banned_ids``: ids never produced, one list
        for all targets or ``{target: ids}`` (constrained decoding: padding, the start id, sentinels when the
        target is not also an input). ``groups``: ``{target: [[ids], ...]}`` sets of ids that greedy decoding
        weighs as one choice (e.g. every first-corner coordinate of a new box against end-of-sequence), then
        the best id inside the chosen set. Returns ``{target: SequenceResult}``."""
        spec = self.spec
        targets = list(targets)
        mods = [spec.modalities[spec.modality_index(t)] for t in targets]
        for t, mod in zip(targets, mods):
            if mod.kind != "sequence":
                raise ValueError(f"{t!r} is image-like; use generate_grid")
        sizes = {mod.vocab_size for mod in mods}
        if len(sizes) != 1:
            raise ValueError(f"targets {targets} have different vocabulary sizes; decode them separately")
        size = sizes.pop()
        b = np.asarray(enc["enc_tokens"]).shape[0]
        r = len(targets)
        limits = [mod.max_tokens if max_len is None else min(max_len, mod.max_tokens) for mod in mods]
        length = max(mod.max_tokens for mod in mods)
        ctx = self.prefill(self.state, {k: jnp.asarray(v) for k, v in enc.items()})
        if r > 1:  # one copy of the encoder context per target
            ctx = {"cross_k": jnp.concatenate([ctx["cross_k"]] * r, axis=1),
                   "cross_v": jnp.concatenate([ctx["cross_v"]] * r, axis=1),
                   "eseg": jnp.concatenate([ctx["eseg"]] * r, axis=0)}
        nl, rows, _, h, k = ctx["cross_k"].shape
        shape, dtype = (nl, rows, length, h, k), ctx["cross_k"].dtype
        cache = {"self_k": jnp.zeros(shape, dtype), "self_v": jnp.zeros(shape, dtype), **ctx}
        allowed = np.ones((rows, size), bool)
        for j, t in enumerate(targets):
            ban = banned_ids.get(t, ()) if isinstance(banned_ids, dict) else (banned_ids or ())
            ban = np.asarray([i for i in ban if 0 <= i < size and i != eos_id], np.int64)
            allowed[j * b:(j + 1) * b, ban] = False
        group = np.broadcast_to(np.arange(size, dtype=np.int32), (rows, size)).copy()
        for j, t in enumerate(targets):
            for ids in (groups or {}).get(t, ()):
                ids = [i for i in ids if 0 <= i < size]
                if ids:
                    group[j * b:(j + 1) * b, ids] = ids[0]
        target_rows = np.repeat(np.asarray([spec.modality_index(t) for t in targets], np.int32), b)
        limit_rows = np.repeat(np.asarray(limits), b)
        key = jax.random.key(seed)
        tok = jnp.full((rows,), start_id, jnp.int32)
        out = np.full((rows, length), -1, np.int32)
        logps = np.zeros((rows, length), np.float32)
        done = limit_rows <= 0
        lengths = limit_rows.astype(np.int64).copy()
        args = (jnp.asarray(target_rows), jnp.float32(temperature), jnp.int32(top_k), jnp.asarray(allowed),
                jnp.asarray(group))
        for t in range(max(limits)):
            key, sub = jax.random.split(key)
            tok, logp, _, cache = self.step(self.state, cache, tok, jnp.int32(t), *args, sub, size=size)
            tok_np, logp_np = np.asarray(tok), np.asarray(logp)
            live = ~done
            hit_eos = live & (tok_np == eos_id) if eos_id is not None else np.zeros(rows, bool)
            keep = live & ~hit_eos
            out[keep, t] = tok_np[keep]
            logps[live, t] = logp_np[live]
            lengths[hit_eos] = t
            done |= hit_eos | (t + 1 >= limit_rows)
            if done.all():
                break
        res = {}
        for j, (t, mod) in enumerate(zip(targets, mods)):
            sl = slice(j * b, (j + 1) * b)
            res[t] = SequenceResult(out[sl, :mod.max_tokens], lengths[sl], logps[sl, :mod.max_tokens])
        return res

    def generate_sequence(self, enc: dict, target: str, **kw) -> SequenceResult:
        """One sequence target (see :meth:`generate_sequences`)."""
        return self.generate_sequences(enc, [target], **kw)[target]

    def generate_grid(self, enc: dict, target: str, *, steps: int = 1, temperature: float = 0.0,
                      seed: int = 0) -> GridResult:
        """Parallel decoding of image-like modality ``target``, refined over ``steps`` (MaskGIT schedule)."""
        spec = self.spec
        m = spec.modality_index(target)
        mod = spec.modalities[m]
        if mod.kind != "image":
            raise ValueError(f"{target!r} is a sequence; use generate_sequence")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        enc = {k: jnp.asarray(v) for k, v in enc.items()}
        b, n = enc["enc_tokens"].shape[0], mod.max_tokens
        tokens = np.zeros((b, n), np.int32)
        conf = np.zeros((b, n), np.float32)
        fixed = np.zeros((b, n), bool)
        key = jax.random.key(seed)
        for s in range(steps):
            key, sub = jax.random.split(key)
            tok, prob, _ = self.parallel(self.state, enc, jnp.asarray(tokens), jnp.asarray(fixed),
                                         jnp.float32(temperature), sub, target=m)
            tok, prob = np.asarray(tok), np.asarray(prob)
            remain = math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps)) if s + 1 < steps else 0
            score = np.where(fixed, -np.inf, prob)
            for r in range(b):
                n_open = int((~fixed[r]).sum())
                take = max(n_open - remain, 1 if n_open else 0)
                idx = np.argsort(-score[r], kind="stable")[:take]
                tokens[r, idx], conf[r, idx], fixed[r, idx] = tok[r, idx], prob[r, idx], True
        return GridResult(tokens, conf)
