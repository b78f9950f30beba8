"""The 4M-style encoder-decoder in Flax NNX, built from a :class:`medscale.spec.ModelSpec` only.

Every weight of the spec's docstring and nothing else is a parameter (a test checks the count against
``medscale.accounting.param_counts`` for every ladder size). Tensor names carry their shapes as suffixes:
B batch, E encoder length, L decoder length, D d_model, H heads, K head dim, F d_ff, V combined vocab,
M modalities.

Projections, attention, the GELU and the output head's NLL go through the model's ``ops``
(:class:`medscale.model.ops.Ops`, given at construction): by default the plain JAX path (``jnp.tensordot``
with float32 accumulation, autodiff), which is what runs on accelerators; ``medscale.train.step`` gives the
native CPU implementation (``medscale/kernels/cpu.py``) where it applies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medscale.model.attention import site_implementation
from medscale.model.ops import PLAIN, Ops
from medscale.model.sharding import constrain
from medscale.options import REMAT_POLICIES
from medscale.spec import ModelSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_BLD = ("activation_batch", "activation_length", "activation_embed")
_BLHK = ("activation_batch", "activation_length", "activation_heads", None)
_BLF = ("activation_batch", "activation_length", "activation_mlp")
_BLV = ("activation_batch", "activation_length", "activation_vocab")


def _normal(std):
    return jax.nn.initializers.normal(std)


def _param(rngs, init, shape, axes):
    return nnx.Param(init(rngs.params(), shape, jnp.float32), axes=axes)


# ---------------------------------------------------------------------------------------------- positions
def _sincos_1d(n: int, dim: int) -> np.ndarray:
    """[n, dim] fixed sin-cos table (first half sines, second half cosines); dim may be odd (zero-padded)."""
    half = dim // 2
    out = np.zeros((n, dim), np.float64)
    if half:
        freqs = 1.0 / (10000.0 ** (np.arange(half) / half))
        ang = np.arange(n)[:, None] * freqs[None, :]
        out[:, :half] = np.sin(ang)
        out[:, half:2 * half] = np.cos(ang)
    return out


def _sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
    """[h*w, dim] fixed 2D sin-cos: half the channels encode the row, half the column (row-major grid)."""
    dr = dim // 2
    rows = _sincos_1d(h, dr)
    cols = _sincos_1d(w, dim - dr)
    out = np.concatenate([np.repeat(rows, w, axis=0), np.tile(cols, (h, 1))], axis=1)
    return out


def position_table(spec: ModelSpec) -> np.ndarray:
    """[M * P, D] float32 constant: row ``m * P + pos`` is modality m's position ``pos`` (P = max tokens)."""
    p_max = max(m.max_tokens for m in spec.modalities)
    table = np.zeros((spec.num_modalities, p_max, spec.d_model), np.float64)
    for i, m in enumerate(spec.modalities):
        if m.kind == "image":
            table[i, :m.max_tokens] = _sincos_2d(m.grid[0], m.grid[1], spec.d_model)
        else:
            table[i, :m.max_tokens] = _sincos_1d(m.max_tokens, spec.d_model)
    return table.reshape(-1, spec.d_model).astype(np.float32)


# ---------------------------------------------------------------------------------------------- layers
class LayerNorm(nnx.Module):
    def __init__(self, d: int):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), axes=("norm",))

    def __call__(self, x_BLD, dtype):
        x = x_BLD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-6) * self.scale[...] + self.bias[...]
        return y.astype(dtype)


class Attention(nnx.Module):
    """q, k, v, o projections (d_model x d_model each, no bias) around :func:`attend`."""

    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        k = d // heads
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
        self.q = _param(rngs, init, (d, heads, k), ("embed", "heads", "kv"))
        self.k = _param(rngs, init, (d, heads, k), ("embed", "heads", "kv"))
        self.v = _param(rngs, init, (d, heads, k), ("embed", "heads", "kv"))
        oinit = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)
        self.o = _param(rngs, oinit, (heads, k, d), ("heads", "kv", "embed"))

    def __call__(self, xq_BLD, xkv_BED, *, q_segment, kv_segment, q_causal, same_segment, dtype, impl, ops,
                 site, kv=None):
        """``kv``: precomputed ``(k_BEHK, v_BEHK)`` (the decoder's cross-attention, :func:`cross_kv`); then
        ``xkv_BED`` is not used."""
        def proj(x, *ws):
            return [constrain(p, _BLHK) for p in ops.project(x, [w[...].astype(dtype) for w in ws])]

        if kv is not None:
            (q_BLHK,) = proj(xq_BLD, self.q)
            k_BEHK, v_BEHK = kv
        elif xkv_BED is xq_BLD:
            q_BLHK, k_BEHK, v_BEHK = proj(xq_BLD, self.q, self.k, self.v)
        else:
            (q_BLHK,) = proj(xq_BLD, self.q)
            k_BEHK, v_BEHK = proj(xkv_BED, self.k, self.v)
        name, opts = impl
        a_BLHK = ops.attend(q_BLHK, k_BEHK, v_BEHK, q_segment=q_segment, kv_segment=kv_segment,
                            q_causal=q_causal, same_segment=same_segment,
                            implementation=site_implementation(name, site), **dict(opts))
        (out,) = ops.project(a_BLHK.astype(dtype), [self.o[...].astype(dtype)], contract=2)
        return constrain(out, _BLD)


class Mlp(nnx.Module):
    def __init__(self, d: int, f: int, kind: str, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.kind = kind
        if kind == "swiglu":
            self.gate = _param(rngs, init, (d, f), ("embed", "mlp"))
        self.up = _param(rngs, init, (d, f), ("embed", "mlp"))
        self.down = _param(rngs, init, (f, d), ("mlp", "embed"))

    def __call__(self, x_BLD, dtype, ops):
        def mm(x, w):
            (y,) = ops.project(x, [w[...].astype(dtype)])
            return y.astype(jnp.float32)

        h_BLF = mm(x_BLD, self.up)
        if self.kind == "swiglu":
            h_BLF = jax.nn.silu(mm(x_BLD, self.gate)) * h_BLF
        else:
            h_BLF = ops.gelu(h_BLF)
        h_BLF = constrain(h_BLF.astype(dtype), _BLF)
        return constrain(mm(h_BLF, self.down).astype(dtype), _BLD)


class EncoderLayer(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(spec.d_model)
        self.attn = Attention(spec.d_model, spec.num_heads, rngs)
        self.ln2 = LayerNorm(spec.d_model)
        self.mlp = Mlp(spec.d_model, spec.d_ff, spec.mlp, rngs)

    def __call__(self, x_BED, seg_BE, dtype, impl, ops):
        h = self.ln1(x_BED, dtype)
        x_BED = x_BED + self.attn(h, h, q_segment=seg_BE, kv_segment=seg_BE, q_causal=None,
                                  same_segment=False, dtype=dtype, impl=impl, ops=ops, site="encoder")
        return x_BED + self.mlp(self.ln2(x_BED, dtype), dtype, ops)


class DecoderLayer(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(spec.d_model)
        self.self_attn = Attention(spec.d_model, spec.num_heads, rngs)
        self.ln2 = LayerNorm(spec.d_model)
        self.cross_attn = Attention(spec.d_model, spec.num_heads, rngs)
        self.ln3 = LayerNorm(spec.d_model)
        self.mlp = Mlp(spec.d_model, spec.d_ff, spec.mlp, rngs)

    def __call__(self, y_BLD, ck_BEHK, cv_BEHK, dseg_BL, dcausal_BL, qvalid_BL, eseg_BE, dtype, impl, ops):
        h = self.ln1(y_BLD, dtype)
        y_BLD = y_BLD + self.self_attn(h, h, q_segment=dseg_BL, kv_segment=dseg_BL, q_causal=dcausal_BL,
                                       same_segment=True, dtype=dtype, impl=impl, ops=ops, site="decoder")
        h = self.ln2(y_BLD, dtype)
        y_BLD = y_BLD + self.cross_attn(h, None, q_segment=qvalid_BL, kv_segment=eseg_BE, q_causal=None,
                                        same_segment=False, dtype=dtype, impl=impl, ops=ops, site="cross",
                                        kv=(ck_BEHK, cv_BEHK))
        return y_BLD + self.mlp(self.ln3(y_BLD, dtype), dtype, ops)


def cross_kv(layers, enc_BED, dtype, ops: Ops = PLAIN):
    """Every decoder layer's cross-attention keys and values, ``[(k_BEHK, v_BEHK), ...]``.

    They depend on the encoder output only, so they are computed once, before the decoder layers (as a decoding
    cache would hold them), in one :meth:`Ops.project` call of all ``2 * layers`` weights."""
    ws = [w[...].astype(dtype) for lyr in layers for w in (lyr.cross_attn.k, lyr.cross_attn.v)]
    parts = [constrain(p, _BLHK) for p in ops.project(enc_BED, ws)] if ws else []
    return list(zip(parts[0::2], parts[1::2]))


def _remat_policy(name):
    if name == "full":
        return None
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------- model
class EncoderDecoder(nnx.Module):
    """The 4M-style encoder-decoder. ``__call__(batch) -> logits [B, L, V]``; ``loss(batch)`` -> metrics."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype: str = "float32", remat: str = "none",
                 attention: str = "dense", attention_block: int | None = None,
                 attention_window: int | None = None, ops: Ops = PLAIN):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, not {dtype!r}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, not {remat!r}")
        self.spec = spec
        self.dtype_name, self.remat = dtype, remat
        self.ops = ops  # static: the compute hooks (medscale.model.ops), part of the graph definition
        # (implementation, options): static; each call site picks its implementation (site_implementation)
        self.attention = (attention, tuple((k, v) for k, v in (("block", attention_block),
                                                               ("window", attention_window)) if v is not None))
        d, m, v = spec.d_model, spec.num_modalities, spec.vocab_total
        self.token_embed = _param(rngs, _normal(1.0), (v, d), ("vocab", "embed"))
        self.enc_modality = _param(rngs, _normal(0.02), (m, d), ("modality", "embed"))
        self.dec_modality = _param(rngs, _normal(0.02), (m, d), ("modality", "embed"))
        self.mask_token = _param(rngs, _normal(1.0), (d,), ("embed",))
        if spec.encoder == "unified":
            self.encoder = nnx.List([EncoderLayer(spec, rngs) for _ in range(spec.enc_layers)])
            self.enc_norm = LayerNorm(d)
        else:  # one stack (and final LayerNorm) per modality with encoder tokens, in modality order
            self.encoders = nnx.List([nnx.List([EncoderLayer(spec, rngs) for _ in range(spec.enc_layers)])
                                      for _ in spec.encoder_stacks])
            self.enc_norms = nnx.List([LayerNorm(d) for _ in spec.encoder_stacks])
        self.decoder = nnx.List([DecoderLayer(spec, rngs) for _ in range(spec.dec_layers)])
        self.dec_norm = LayerNorm(d)
        self.head = _param(rngs, _normal(1.0 / math.sqrt(d)), (d, v), ("embed", "vocab"))

    # -- helpers
    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    @property
    def residual_dtype(self):
        """The residual stream's dtype: float32 under float16 (its range, 65504, is too small for a sum that
        grows with depth; each sublayer's input is the float16 output of a float32 LayerNorm), else
        :attr:`dtype`."""
        return jnp.float32 if self.dtype_name == "float16" else self.dtype

    def _call_layer(self, layer, *arrays):
        dtype, impl, ops = self.dtype, self.attention, self.ops
        if self.remat == "none":
            return layer(*arrays, dtype, impl, ops)
        fn = nnx.remat(lambda lyr, *a: lyr(*a, dtype, impl, ops), policy=_remat_policy(self.remat))
        return fn(layer, *arrays)

    def _embed(self, ids_BL, mod_BL, pos_BL, modality_table):
        spec = self.spec
        offsets = jnp.asarray(spec.vocab_offsets, jnp.int32)
        tok = jnp.take(self.token_embed[...], offsets[mod_BL] + ids_BL, axis=0)
        pos_table = jnp.asarray(position_table(spec))
        p_max = pos_table.shape[0] // spec.num_modalities
        pos = jnp.take(pos_table, mod_BL * p_max + pos_BL, axis=0)
        return tok, jnp.take(modality_table[...], mod_BL, axis=0) + pos

    def encode(self, batch):
        """``(enc_BED, seg_BE)``: the encoder output the decoder cross-attends to and its segment ids (0 a real
        token, -1 padding). Per-modality encoder: E = sum of ``spec.encoder_split`` (below)."""
        dtype = self.dtype
        tok, rest = self._embed(batch["enc_tokens"], batch["enc_modality"], batch["enc_pos"], self.enc_modality)
        x_BED = constrain((tok + rest).astype(self.residual_dtype), _BLD)
        if self.spec.encoder != "unified":
            return self._encode_per_modality(batch, x_BED)
        seg_BE = jnp.where(batch["enc_valid"], 0, -1).astype(jnp.int32)
        for layer in self.encoder:
            x_BED = self._call_layer(layer, x_BED, seg_BE)
        return self.enc_norm(x_BED, dtype), seg_BE

    def _encode_per_modality(self, batch, x_BED):
        """Stack m runs on the first ``encoder_split[m]`` valid tokens of modality m (in their order in the
        batch; a stable sort puts them first, a gather takes them: fixed shapes whatever the tokens' places;
        padding where the modality has fewer, tokens beyond the share are not seen); the stacks' outputs are
        concatenated in modality order."""
        spec, dtype = self.spec, self.dtype
        e = x_BED.shape[1]
        pos_E = jnp.arange(e, dtype=jnp.int32)
        outs, segs = [], []
        for stack, norm, m in zip(self.encoders, self.enc_norms, spec.encoder_stacks):
            n = min(spec.encoder_split[m], e)
            mine_BE = batch["enc_valid"] & (batch["enc_modality"] == m)
            idx_BN = jnp.argsort(jnp.where(mine_BE, pos_E, e + pos_E), axis=1)[:, :n]
            mine_BN = jnp.take_along_axis(mine_BE, idx_BN, axis=1)
            x_BND = jnp.where(mine_BN[..., None], jnp.take_along_axis(x_BED, idx_BN[..., None], axis=1), 0)
            x_BND = constrain(x_BND.astype(x_BED.dtype), _BLD)  # padding places hold zeros
            seg_BN = jnp.where(mine_BN, 0, -1).astype(jnp.int32)
            for layer in stack:
                x_BND = self._call_layer(layer, x_BND, seg_BN)
            outs.append(norm(x_BND, dtype))
            segs.append(seg_BN)
        return constrain(jnp.concatenate(outs, axis=1), _BLD), jnp.concatenate(segs, axis=1)

    def decode(self, batch, enc_BED, eseg_BE):
        dtype = self.dtype
        causal_BL = batch["dec_causal"]
        tok, rest = self._embed(batch["dec_input"], batch["dec_modality"], batch["dec_pos"], self.dec_modality)
        tok = jnp.where(causal_BL[..., None], tok, self.mask_token[...])
        y_BLD = constrain((tok + rest).astype(self.residual_dtype), _BLD)
        valid_BL = batch["dec_valid"]
        dseg_BL = jnp.where(valid_BL, batch["dec_modality"], -1).astype(jnp.int32)
        qvalid_BL = jnp.where(valid_BL, 0, -1).astype(jnp.int32)
        for layer, (ck, cv) in zip(self.decoder, cross_kv(self.decoder, enc_BED, dtype, self.ops)):
            y_BLD = self._call_layer(layer, y_BLD, ck, cv, dseg_BL, causal_BL, qvalid_BL, eseg_BE)
        return self.dec_norm(y_BLD, dtype)

    def hidden(self, batch):
        enc_BED, eseg_BE = self.encode(batch)
        return self.decode(batch, enc_BED, eseg_BE)

    def __call__(self, batch):
        """Logits ``[B, L, V]`` (float32) over the combined vocabulary; outside a position's own modality
        slice they are -inf (each position's softmax is over its modality's vocabulary only)."""
        logits = self._logits(self.hidden(batch))
        spec = self.spec
        col = jnp.arange(spec.vocab_total)
        offs = jnp.asarray(spec.vocab_offsets)[batch["dec_modality"]][..., None]
        size = jnp.asarray(spec.vocab_sizes)[batch["dec_modality"]][..., None]
        return jnp.where((col >= offs) & (col < offs + size), logits, -jnp.inf)

    def _logits(self, y_BLD):
        out = jnp.dot(y_BLD, self.head[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(out, _BLV)

    def loss(self, batch, normalizer=None):
        """Token-averaged cross-entropy over valid decoder targets, and per-modality sums/counts.

        Returns ``(loss, aux)`` with ``aux = {"sum": [M], "count": [M]}`` (f32): per-modality NLL sums and
        target counts from one-hot segment sums (no boolean indexing, no dynamic shapes). ``normalizer``: divide
        the NLL sum by it instead of this batch's target count (a micro-batch's share of a larger batch's
        token-weighted mean)."""
        spec = self.spec
        y_BLD = self.hidden(batch)
        b, l, d = y_BLD.shape
        mod_BL = batch["dec_modality"]
        offsets = jnp.asarray(spec.vocab_offsets, jnp.int32)[mod_BL]
        sizes = jnp.asarray(spec.vocab_sizes, jnp.int32)[mod_BL]
        nll = self.ops.nll(y_BLD.reshape(b * l, d), self.head[...].astype(self.dtype), offsets.reshape(-1),
                           sizes.reshape(-1), (offsets + batch["dec_target"]).reshape(-1))
        nll_BL = constrain(nll.reshape(b, l), ("activation_batch", "activation_length"))
        onehot_BLM = jax.nn.one_hot(mod_BL, spec.num_modalities, dtype=jnp.float32)
        w_BL = batch["dec_valid"].astype(jnp.float32)
        nll_BL = nll_BL * w_BL
        sums_M = jnp.einsum("bl,blm->m", nll_BL, onehot_BLM)
        counts_M = jnp.einsum("bl,blm->m", w_BL, onehot_BLM)
        loss = jnp.sum(nll_BL) / (jnp.maximum(jnp.sum(w_BL), 1.0) if normalizer is None else normalizer)
        return loss, {"sum": sums_M, "count": counts_M}
