"""The 4M-style encoder-decoder in Flax NNX, built from a :class:`medscale.spec.ModelSpec` only.

Every weight of the spec's docstring and nothing else is a parameter (a test checks the count against
``medscale.accounting.param_counts`` for every ladder size). Tensor names carry their shapes as suffixes:
B batch, E encoder length, L decoder length, D d_model, H heads, K head dim, F d_ff, V combined vocab,
M modalities.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medscale.model.attention import attend, site_implementation
from medscale.model.matmul import matmul
from medscale.model.matmul import use_native as use_native_matmul
from medscale.model.sharding import constrain
from medscale.options import REMAT_POLICIES
from medscale.spec import ModelSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_BLD = ("activation_batch", "activation_length", "activation_embed")
_BLHK = ("activation_batch", "activation_length", "activation_heads", None)
_BLF = ("activation_batch", "activation_length", "activation_mlp")
_BLV = ("activation_batch", "activation_length", "activation_vocab")


@jax.custom_vjp
def linear(x, w):
    """``x[..., i] @ w[i, o]`` with f32 accumulation, output in x's dtype.

    The backward pass is written out so that the weight gradient contracts the token axis of the flattened
    2D operands (XLA:CPU then transposes the small input instead of the wide activation gradient inside an
    elementwise fusion, which profiling showed to dominate the step)."""
    return _linear_fwd(x, w)[0]


def _linear_fwd(x, w):
    y = matmul(x.reshape(-1, x.shape[-1]), w).astype(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1]), (x, w)


def _linear_bwd(res, g):
    x, w = res
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    if use_native_matmul(x2, w) or w.shape[0] <= w.shape[1]:
        dw = matmul(x2, g2, trans_a=True)  # x^T g: contracts the token axis
    else:
        # XLA, a narrowing weight (the MLP's down-projection): form dw^T [out, in] and transpose it. XLA:CPU
        # runs the token-contracting matmul about 1.6x faster with the wide operand on the output's minor
        # side; without the barrier XLA folds the transpose back into the matmul (``docs/model.md``, "Speed")
        dw = jax.lax.optimization_barrier(matmul(g2, x2, trans_a=True)).T
    dx = matmul(g2, w, trans_b=True)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def _unstack(y, axis):
    """The slices of ``y`` along ``axis``, by ``lax.split``: its gradient is one concatenate, where indexing
    each slice gives one zero-padded full-size gradient per slice, summed (profiled: an elementwise pass over
    the whole projection output per layer)."""
    return [p.squeeze(axis) for p in jax.lax.split(y, [1] * y.shape[axis], axis=axis % y.ndim)]


_GELU_C, _GELU_A = math.sqrt(2.0 / math.pi), 0.044715


@jax.custom_vjp
def gelu_tanh(x):
    """``jax.nn.gelu(x, approximate=True)`` whose backward is one elementwise pass over ``x`` and the incoming
    gradient (autodiff of the tanh form summed two gradient paths in separate passes over ``[tokens, d_ff]``)."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return jax.nn.gelu(x, approximate=True), x


def _gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (xf + _GELU_A * xf ** 3))
    d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * xf * xf)
    return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def _slice_stats(logits_NV, offset_N, size_N, index_N):
    """Per position: NLL of column ``index`` under the softmax over columns [offset, offset+size), and the
    gradient of that NLL with respect to the logits (zero outside the slice)."""
    col = jnp.arange(logits_NV.shape[-1], dtype=jnp.int32)[None, :]
    lo = offset_N[:, None]
    inside = (col >= lo) & (col < lo + size_N[:, None])
    m = jnp.max(jnp.where(inside, logits_NV, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(inside, jnp.exp(logits_NV - m), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    hit = col == index_N[:, None]
    target = jnp.sum(jnp.where(hit, logits_NV, 0.0), axis=-1)
    nll = (m + jnp.log(z))[:, 0] - target
    return nll, e / z - hit.astype(jnp.float32)


@jax.custom_vjp
def sliced_softmax_nll(h_ND, w_DV, offset_N, size_N, index_N):
    """NLL per position of the output head ``h @ w`` with each position's softmax restricted to its own
    modality's slice of the combined vocabulary (logits outside it are masked, i.e. -inf).

    One matmul for all modalities; the slice restriction costs one exp per logit, as a plain softmax would.
    The logit gradient is formed in the same pass as the forward statistics and kept as the only [N, V]
    residual, so the backward pass is just the two matmuls."""
    return _nll_fwd(h_ND, w_DV, offset_N, size_N, index_N)[0]


def _nll_fwd(h_ND, w_DV, offset_N, size_N, index_N):
    logits = matmul(h_ND, w_DV)
    nll, dlogits = _slice_stats(logits, offset_N, size_N, index_N)
    return nll, (h_ND, w_DV, dlogits.astype(h_ND.dtype), offset_N, size_N, index_N)


def _nll_bwd(res, g_N):
    h, w, dlogits, offset_N, size_N, index_N = res
    dl = dlogits * g_N[:, None].astype(dlogits.dtype)
    dh = matmul(dl, w, trans_b=True)
    dw = matmul(h, dl, trans_a=True)
    zero = np.zeros((), jax.dtypes.float0)
    return (dh.astype(h.dtype), dw.astype(w.dtype), np.broadcast_to(zero, offset_N.shape),
            np.broadcast_to(zero, size_N.shape), np.broadcast_to(zero, index_N.shape))


sliced_softmax_nll.defvjp(_nll_fwd, _nll_bwd)


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

    def __call__(self, xq_BLD, xkv_BED, *, q_segment, kv_segment, q_causal, same_segment, dtype, impl, site,
                 kv=None):
        """``kv``: precomputed ``(k_BEHK, v_BEHK)`` (the decoder's cross-attention, :func:`cross_kv`); then
        ``xkv_BED`` is not used."""
        def proj(x, *ws):
            # one matmul for the projections of the same input (q, k, v in self-attention; k, v in
            # cross-attention): wider matmuls run closer to peak on CPU than three narrow ones
            ws = [w[...].astype(dtype) for w in ws]
            w = jnp.concatenate([w.reshape(w.shape[0], -1) for w in ws], axis=1)
            y = linear(x, w).reshape(*x.shape[:-1], len(ws), *ws[0].shape[1:])
            return [constrain(p, _BLHK) for p in _unstack(y, -3)]

        if kv is not None:
            (q_BLHK,) = proj(xq_BLD, self.q)
            k_BEHK, v_BEHK = kv
        elif xkv_BED is xq_BLD:
            q_BLHK, k_BEHK, v_BEHK = proj(xq_BLD, self.q, self.k, self.v)
        else:
            (q_BLHK,) = proj(xq_BLD, self.q)
            k_BEHK, v_BEHK = proj(xkv_BED, self.k, self.v)
        name, opts = impl
        a_BLHK = attend(q_BLHK, k_BEHK, v_BEHK, q_segment=q_segment, kv_segment=kv_segment,
                        q_causal=q_causal, same_segment=same_segment,
                        implementation=site_implementation(name, site), **dict(opts))
        o = self.o[...].astype(dtype)
        out = linear(a_BLHK.astype(dtype).reshape(*a_BLHK.shape[:2], -1), o.reshape(-1, o.shape[-1]))
        return constrain(out, _BLD)


class Mlp(nnx.Module):
    def __init__(self, d: int, f: int, kind: str, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.kind = kind
        if kind == "swiglu":
            self.gate = _param(rngs, init, (d, f), ("embed", "mlp"))
        self.up = _param(rngs, init, (d, f), ("embed", "mlp"))
        self.down = _param(rngs, init, (f, d), ("mlp", "embed"))

    def __call__(self, x_BLD, dtype):
        def mm(x, w):
            return linear(x, w[...].astype(dtype)).astype(jnp.float32)

        h_BLF = mm(x_BLD, self.up)
        if self.kind == "swiglu":
            h_BLF = jax.nn.silu(mm(x_BLD, self.gate)) * h_BLF
        else:
            h_BLF = gelu_tanh(h_BLF)
        h_BLF = constrain(h_BLF.astype(dtype), _BLF)
        return constrain(mm(h_BLF, self.down).astype(dtype), _BLD)


class EncoderLayer(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(spec.d_model)
        self.attn = Attention(spec.d_model, spec.num_heads, rngs)
        self.ln2 = LayerNorm(spec.d_model)
        self.mlp = Mlp(spec.d_model, spec.d_ff, spec.mlp, rngs)

    def __call__(self, x_BED, seg_BE, dtype, impl):
        h = self.ln1(x_BED, dtype)
        x_BED = x_BED + self.attn(h, h, q_segment=seg_BE, kv_segment=seg_BE, q_causal=None,
                                  same_segment=False, dtype=dtype, impl=impl, site="encoder")
        return x_BED + self.mlp(self.ln2(x_BED, dtype), dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(spec.d_model)
        self.self_attn = Attention(spec.d_model, spec.num_heads, rngs)
        self.ln2 = LayerNorm(spec.d_model)
        self.cross_attn = Attention(spec.d_model, spec.num_heads, rngs)
        self.ln3 = LayerNorm(spec.d_model)
        self.mlp = Mlp(spec.d_model, spec.d_ff, spec.mlp, rngs)

    def __call__(self, y_BLD, ck_BEHK, cv_BEHK, dseg_BL, dcausal_BL, qvalid_BL, eseg_BE, dtype, impl):
        h = self.ln1(y_BLD, dtype)
        y_BLD = y_BLD + self.self_attn(h, h, q_segment=dseg_BL, kv_segment=dseg_BL, q_causal=dcausal_BL,
                                       same_segment=True, dtype=dtype, impl=impl, site="decoder")
        h = self.ln2(y_BLD, dtype)
        y_BLD = y_BLD + self.cross_attn(h, None, q_segment=qvalid_BL, kv_segment=eseg_BE, q_causal=None,
                                        same_segment=False, dtype=dtype, impl=impl, site="cross",
                                        kv=(ck_BEHK, cv_BEHK))
        return y_BLD + self.mlp(self.ln3(y_BLD, dtype), dtype)


def cross_kv(layers, enc_BED, dtype):
    """Every decoder layer's cross-attention keys and values, ``[(k_BEHK, v_BEHK), ...]``, from one matmul.

    All layers read the same encoder output, so their k and v projections are one ``[D, layers * 2 * H * K]``
    weight (concatenated at call time; the parameters stay per layer): one wide matmul instead of
    ``2 * layers`` narrow ones, forward and backward."""
    ws = [w[...].astype(dtype) for lyr in layers for w in (lyr.cross_attn.k, lyr.cross_attn.v)]
    if not ws:
        return []
    d, h, k = ws[0].shape
    y = linear(enc_BED, jnp.concatenate([w.reshape(d, h * k) for w in ws], axis=1))
    parts = [constrain(p, _BLHK) for p in _unstack(y.reshape(*enc_BED.shape[:-1], len(ws), h, k), -3)]
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
                 attention_window: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, not {dtype!r}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, not {remat!r}")
        self.spec = spec
        self.dtype_name, self.remat = dtype, remat
        # (implementation, options): static; each call site picks its implementation (site_implementation)
        self.attention = (attention, tuple((k, v) for k, v in (("block", attention_block),
                                                               ("window", attention_window)) if v is not None))
        d, m, v = spec.d_model, spec.num_modalities, spec.vocab_total
        self.token_embed = _param(rngs, _normal(1.0), (v, d), ("vocab", "embed"))
        self.enc_modality = _param(rngs, _normal(0.02), (m, d), ("modality", "embed"))
        self.dec_modality = _param(rngs, _normal(0.02), (m, d), ("modality", "embed"))
        self.mask_token = _param(rngs, _normal(1.0), (d,), ("embed",))
        self.encoder = nnx.List([EncoderLayer(spec, rngs) for _ in range(spec.enc_layers)])
        self.enc_norm = LayerNorm(d)
        self.decoder = nnx.List([DecoderLayer(spec, rngs) for _ in range(spec.dec_layers)])
        self.dec_norm = LayerNorm(d)
        self.head = _param(rngs, _normal(1.0 / math.sqrt(d)), (d, v), ("embed", "vocab"))

    # -- helpers
    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    def _call_layer(self, layer, *arrays):
        dtype, impl = self.dtype, self.attention
        if self.remat == "none":
            return layer(*arrays, dtype, impl)
        fn = nnx.remat(lambda lyr, *a: lyr(*a, dtype, impl), policy=_remat_policy(self.remat))
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
        dtype = self.dtype
        tok, rest = self._embed(batch["enc_tokens"], batch["enc_modality"], batch["enc_pos"], self.enc_modality)
        x_BED = constrain((tok + rest).astype(dtype), _BLD)
        seg_BE = jnp.where(batch["enc_valid"], 0, -1).astype(jnp.int32)
        for layer in self.encoder:
            x_BED = self._call_layer(layer, x_BED, seg_BE)
        return self.enc_norm(x_BED, dtype), seg_BE

    def decode(self, batch, enc_BED, eseg_BE):
        dtype = self.dtype
        causal_BL = batch["dec_causal"]
        tok, rest = self._embed(batch["dec_input"], batch["dec_modality"], batch["dec_pos"], self.dec_modality)
        tok = jnp.where(causal_BL[..., None], tok, self.mask_token[...])
        y_BLD = constrain((tok + rest).astype(dtype), _BLD)
        valid_BL = batch["dec_valid"]
        dseg_BL = jnp.where(valid_BL, batch["dec_modality"], -1).astype(jnp.int32)
        qvalid_BL = jnp.where(valid_BL, 0, -1).astype(jnp.int32)
        for layer, (ck, cv) in zip(self.decoder, cross_kv(self.decoder, enc_BED, dtype)):
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

    def loss(self, batch):
        """Token-averaged cross-entropy over valid decoder targets, and per-modality sums/counts.

        Returns ``(loss, aux)`` with ``aux = {"sum": [M], "count": [M]}`` (f32): per-modality NLL sums and
        target counts from one-hot segment sums (no boolean indexing, no dynamic shapes)."""
        spec = self.spec
        y_BLD = self.hidden(batch)
        b, l, d = y_BLD.shape
        mod_BL = batch["dec_modality"]
        offsets = jnp.asarray(spec.vocab_offsets, jnp.int32)[mod_BL]
        sizes = jnp.asarray(spec.vocab_sizes, jnp.int32)[mod_BL]
        nll = sliced_softmax_nll(y_BLD.reshape(b * l, d), self.head[...].astype(self.dtype),
                                 offsets.reshape(-1), sizes.reshape(-1),
                                 (offsets + batch["dec_target"]).reshape(-1))
        nll_BL = constrain(nll.reshape(b, l), ("activation_batch", "activation_length"))
        onehot_BLM = jax.nn.one_hot(mod_BL, spec.num_modalities, dtype=jnp.float32)
        w_BL = batch["dec_valid"].astype(jnp.float32)
        nll_BL = nll_BL * w_BL
        sums_M = jnp.einsum("bl,blm->m", nll_BL, onehot_BLM)
        counts_M = jnp.einsum("bl,blm->m", w_BL, onehot_BLM)
        loss = jnp.sum(nll_BL) / jnp.maximum(jnp.sum(w_BL), 1.0)
        return loss, {"sum": sums_M, "count": counts_M}
