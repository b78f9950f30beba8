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

Implementations (``implementation=``; all compute the rule above except ``local``):

- ``dense``: scores ``[B, H, Lq, Lk]`` in float32 under the boolean mask ``allowed_mask``, softmax, and the
  product with v (``_dense``), differentiated by JAX. The CPU backend (``medscale/kernels/cpu.py``, chosen
  by ``medscale.train.step``) replaces this implementation by a native kernel with a hand-written backward
  pass (:meth:`medscale.model.ops.Ops.attend` is the switch). That backward, which keeps only the
  probabilities, was shaped by CPU profiles, so it lives with the CPU backend; where memory for long
  sequences matters, ``blockwise`` and ``cudnn`` are the implementations to choose.
- ``xla``: ``jax.nn.dot_product_attention(implementation='xla')`` with the boolean mask built from the vectors.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``: cuDNN's fused flash kernel. It needs an
  NVIDIA GPU and a bfloat16/float16 compute dtype; anywhere else it raises :class:`UserError` (no silent
  fallback: pick ``xla`` or ``blockwise`` instead). The general mask is passed as a boolean mask, which cuDNN
  applies as an additive bias (a ``[B, 1, Lq, Lk]`` array, not differentiated).
- ``blockwise``: memory-efficient attention in pure JAX (Rabe & Staats 2021, "Self-attention does not need
  O(n^2) memory"; the backward pass of Dao et al. 2022, FlashAttention): queries in blocks of ``block_q``,
  keys/values in blocks of ``block`` (option), an online softmax over key blocks, each block's mask built from
  the vectors. A ``jax.custom_vjp`` saves only q, k, v, the output and the per-row log-sum-exp, and recomputes
  each block's scores in the backward pass, so forward and backward use O(L) memory beyond the block scores.
- ``local``: sliding-window attention for the encoder: the rule above AND ``|i - j| <= window // 2``
  (``window`` option). This is a *different function* from the others; it equals ``dense`` with
  ``allowed_mask(..., window=window)``. Blockwise, visiting only the key blocks that a query block's window
  reaches, so memory and compute are O(L * window). Use :func:`site_implementation` to apply it to the
  encoder only.

Options (keyword arguments after ``implementation``; others are an error): ``block`` (key/value block, and
query block unless ``block_q`` is given; default 512; ``blockwise`` and ``local``), ``block_q``, ``window``
(``local``; default 128). Options that an implementation does not use are ignored, so a model may pass
``block=cfg.model.attention_block, window=cfg.model.attention_window`` at every call site. Defaults for
calls that do not pass an option can also be set around tracing with :func:`attention_options` (used by
``medscale bench seqlen`` to tune blocks without threading them through the model).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medscale.errors import UserError
from medscale.options import ATTENTION_IMPLEMENTATIONS

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
OPTIONS = ("block", "block_q", "window")
DEFAULT_BLOCK = 512
DEFAULT_WINDOW = 128
_DEFAULT_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("medscale_attention_options",
                                                                              default=None)


@contextlib.contextmanager
def attention_options(**options):
    """Defaults for the options of :func:`attend` calls *traced* inside the block (explicit options win).

    The options are read when a function is traced: wrap the ``jit(...).lower(...)`` (or first call) of a
    freshly built function, not the later calls of an already compiled one.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"attention_options() got unknown option(s) {unknown}; known: {OPTIONS}")
    token = _DEFAULT_OPTIONS.set({**(_DEFAULT_OPTIONS.get() or {}), **{k: v for k, v in options.items() if v is not None}})
    try:
        yield
    finally:
        _DEFAULT_OPTIONS.reset(token)


def allowed_mask(q_segment, kv_segment, q_causal=None, same_segment=False, window=None):
    """Dense boolean mask ``[B, 1, Lq, Lk]`` of the rule above (used by the dense path and by tests).

    ``window``: also require ``|i - j| <= window // 2`` (the function ``local`` computes).
    """
    ok = (q_segment[:, :, None] >= 0) & (kv_segment[:, None, :] >= 0)
    if same_segment:
        ok = ok & (q_segment[:, :, None] == kv_segment[:, None, :])
    lq, lk = q_segment.shape[1], kv_segment.shape[1]
    if q_causal is not None:
        tri = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None]
        ok = ok & (~q_causal[:, :, None] | tri[None])
    if window is not None:
        near = jnp.abs(jnp.arange(lq)[:, None] - jnp.arange(lk)[None, :]) <= window // 2
        ok = ok & near[None]
    return ok[:, None]


def site_implementation(attention: str, site: str) -> str:
    """The implementation to use at a call site (``encoder``, ``decoder`` or ``cross``) for a configured one.

    ``local`` is an encoder technique: decoder self- and cross-attention then use ``blockwise`` (the exact
    function, O(L) memory). Every other implementation is used everywhere.
    """
    if site not in ("encoder", "decoder", "cross"):
        raise ValueError(f"site must be encoder, decoder or cross, not {site!r}")
    if attention == "local" and site != "encoder":
        return "blockwise"
    return attention


# ----------------------------------------------------------------------------------------------------- dense


def _dense(q, k, v, mask):
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.maximum(denom, 1e-30)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


# ------------------------------------------------------------------------------------ jax.nn (xla / cudnn)


def _row_has_key(mask):
    """``[B, Lq, 1, 1]``: 1 where a query row has at least one allowed key (``mask`` is ``[B, 1, Lq, Lk]``)."""
    return jnp.any(mask[:, 0], axis=-1)[:, :, None, None]


def _jax_nn(q, k, v, mask, implementation):
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    # jax.nn gives a fully masked row the mean of all values; the rule here is zeros.
    return jnp.where(_row_has_key(mask), out, jnp.zeros((), out.dtype))


def _check_cudnn(q):
    backend = jax.default_backend()
    if backend != "gpu":
        raise UserError(f"attention 'cudnn' (cuDNN flash attention) needs an NVIDIA GPU, but the JAX backend is "
                        f"{backend!r}; set model.attention=xla or model.attention=blockwise")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"attention 'cudnn' needs a bfloat16 or float16 compute dtype, not {q.dtype}; "
                        "set model.dtype=bfloat16, or float16 on V100s (or use model.attention=blockwise)")


# ------------------------------------------------------------------------------------ blockwise and local


class _Plan(NamedTuple):
    """Static description of a blockwise attention call (hashable: a custom_vjp non-differentiable argument)."""

    block_q: int
    block_k: int
    same_segment: bool
    window: int | None  # None: every key block is visited; else |i - j| <= window // 2
    visits: int  # key blocks visited per query block


def _visited_blocks(plan: _Plan, i, num_k):
    """Indices of the key blocks query block ``i`` visits (``visits`` of them) and whether each is real."""
    t = jnp.arange(plan.visits)
    if plan.window is None or plan.visits == num_k:
        return t, jnp.ones_like(t, dtype=bool)
    first = jnp.floor_divide(i * plan.block_q - plan.window // 2, plan.block_k)
    j = first + t
    return jnp.clip(j, 0, num_k - 1), (j >= 0) & (j < num_k)


def _block_mask(plan, qs, qc, qpos, ks, kpos, real):
    """``[B, 1, bq, bk]`` allowed mask of one (query block, key block) pair from the vectors."""
    ok = (qs[:, :, None] >= 0) & (ks[:, None, :] >= 0)
    if plan.same_segment:
        ok = ok & (qs[:, :, None] == ks[:, None, :])
    ok = ok & (~qc[:, :, None] | (kpos[None, None, :] <= qpos[None, :, None]))
    if plan.window is not None:
        ok = ok & (jnp.abs(qpos[:, None] - kpos[None, :]) <= plan.window // 2)[None]
    return (ok & real)[:, None]


def _blocks(x, block, axis):
    """Split ``axis`` (a multiple of ``block``) into ``[n, ...]`` leading blocks."""
    n = x.shape[axis] // block
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis):
    """Inverse of :func:`_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _flash_forward(plan, q, k, v, qs, ks, qc):
    """q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` (lengths multiples of the blocks). Returns (o, lse ``[B,H,Lq]``)."""
    scale = q.shape[-1] ** -0.5
    bq, bk = plan.block_q, plan.block_k
    num_k = k.shape[2] // bk
    kb, vb, ksb = _blocks(k, bk, 2), _blocks(v, bk, 2), _blocks(ks, bk, 1)
    qb, qsb, qcb = _blocks(q, bq, 2), _blocks(qs, bq, 1), _blocks(qc, bq, 1)
    B, H, _, D = q.shape

    def query_block(_, xs):
        i, q_i, qs_i, qc_i = xs
        qpos = i * bq + jnp.arange(bq)
        js, real = _visited_blocks(plan, i, num_k)

        def key_block(carry, ys):
            m, l, acc = carry
            j, real_j = ys
            ks_j = jax.lax.dynamic_index_in_dim(ksb, j, keepdims=False)
            mask = _block_mask(plan, qs_i, qc_i, qpos, ks_j, j * bk + jnp.arange(bk), real_j)

            def compute(carry):
                m, l, acc = carry
                k_j = jax.lax.dynamic_index_in_dim(kb, j, keepdims=False)
                v_j = jax.lax.dynamic_index_in_dim(vb, j, keepdims=False)
                s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
                s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])  # masked: exp(-inf) = 0
                alpha = jnp.exp(m - m_safe)  # m = -inf (nothing seen yet): 0
                l = alpha * l + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv

            return jax.lax.cond(jnp.any(mask), compute, lambda c: c, (m, l, acc)), None

        init = (jnp.full((B, H, bq), -jnp.inf, jnp.float32), jnp.zeros((B, H, bq), jnp.float32),
                jnp.zeros((B, H, bq, D), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, (js, real))
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(q.dtype)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return None, (o, lse)

    num_q = q.shape[2] // bq
    _, (ob, lseb) = jax.lax.scan(query_block, None, (jnp.arange(num_q), qb, qsb, qcb))
    return _unblocks(ob, 2), _unblocks(lseb, 2)


def _flash_backward(plan, q, k, v, qs, ks, qc, o, lse, do):
    scale = q.shape[-1] ** -0.5
    bq, bk = plan.block_q, plan.block_k
    num_k = k.shape[2] // bk
    kb, vb, ksb = _blocks(k, bk, 2), _blocks(v, bk, 2), _blocks(ks, bk, 1)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, H, Lq]
    xs = (jnp.arange(q.shape[2] // bq), _blocks(q, bq, 2), _blocks(qs, bq, 1), _blocks(qc, bq, 1),
          _blocks(do, bq, 2), _blocks(lse, bq, 2), _blocks(delta, bq, 2))

    def query_block(carry, xs):
        dkb, dvb = carry
        i, q_i, qs_i, qc_i, do_i, lse_i, delta_i = xs
        qpos = i * bq + jnp.arange(bq)
        js, real = _visited_blocks(plan, i, num_k)

        def key_block(carry, ys):
            j, real_j = ys
            ks_j = jax.lax.dynamic_index_in_dim(ksb, j, keepdims=False)
            mask = _block_mask(plan, qs_i, qc_i, qpos, ks_j, j * bk + jnp.arange(bk), real_j)

            def compute(carry):
                dq_i, dkb, dvb = carry
                k_j = jax.lax.dynamic_index_in_dim(kb, j, keepdims=False)
                v_j = jax.lax.dynamic_index_in_dim(vb, j, keepdims=False)
                s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
                dv_j = jnp.einsum("bhqk,bhqd->bhkd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(q_i.dtype)
                dq_i = dq_i + jnp.einsum("bhqk,bhkd->bhqd", ds, k_j, preferred_element_type=jnp.float32)
                dk_j = jnp.einsum("bhqk,bhqd->bhkd", ds, q_i, preferred_element_type=jnp.float32)
                dkb = dkb.at[j].add(dk_j)
                dvb = dvb.at[j].add(dv_j)
                return dq_i, dkb, dvb

            return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry), None

        init = (jnp.zeros(q_i.shape, jnp.float32), dkb, dvb)
        (dq_i, dkb, dvb), _ = jax.lax.scan(key_block, init, (js, real))
        return (dkb, dvb), dq_i

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dkb, dvb), dqb = jax.lax.scan(query_block, (zeros, zeros), xs)
    return (_unblocks(dqb, 2).astype(q.dtype), _unblocks(dkb, 2).astype(k.dtype),
            _unblocks(dvb, 2).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q, k, v, qs, ks, qc):
    return _flash_forward(plan, q, k, v, qs, ks, qc)[0]


def _flash_fwd(plan, q, k, v, qs, ks, qc):
    o, lse = _flash_forward(plan, q, k, v, qs, ks, qc)
    return o, (q, k, v, qs, ks, qc, o, lse)


def _flash_bwd(plan, res, do):
    q, k, v, qs, ks, qc, o, lse = res
    dq, dk, dv = _flash_backward(plan, q, k, v, qs, ks, qc, o, lse, do)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"attention option {name} must be a positive integer, got {value!r}")
    return value


def _pad_to(x, length, axis, value):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blockwise(q, k, v, q_segment, kv_segment, q_causal, same_segment, block, block_q, window):
    lq, lk = q.shape[1], k.shape[1]
    bq = min(block_q, lq)
    bk = min(block, lk)
    lq_p, lk_p = -(-lq // bq) * bq, -(-lk // bk) * bk
    num_k = lk_p // bk
    if window is None:
        visits = num_k
    else:
        visits = min(num_k, (bq - 1 + 2 * (window // 2)) // bk + 2)
    plan = _Plan(bq, bk, bool(same_segment), window, visits)
    if q_causal is None:
        q_causal = jnp.zeros(q_segment.shape, bool)
    # [B, L, H, D] -> [B, H, L, D] once, so every block product is a plain batched matmul.
    qt = _pad_to(jnp.swapaxes(q, 1, 2), lq_p, 2, 0)
    kt = _pad_to(jnp.swapaxes(k, 1, 2), lk_p, 2, 0)
    vt = _pad_to(jnp.swapaxes(v, 1, 2), lk_p, 2, 0)
    qs = _pad_to(q_segment.astype(jnp.int32), lq_p, 1, -1)
    ks = _pad_to(kv_segment.astype(jnp.int32), lk_p, 1, -1)
    qc = _pad_to(q_causal.astype(bool), lq_p, 1, False)
    o = _flash(plan, qt, kt, vt, qs, ks, qc)
    return jnp.swapaxes(o[:, :, :lq], 1, 2)


# ------------------------------------------------------------------------------------------------- attend


def attend(q, k, v, *, q_segment, kv_segment, q_causal=None, same_segment=False,
           implementation="dense", **options):
    """Attention under the segment/causal rule of this module's docstring (``local``: also the window)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"attend() got unknown option(s) {unknown}; known: {OPTIONS}")
    options = {**(_DEFAULT_OPTIONS.get() or {}), **{k: v for k, v in options.items() if v is not None}}
    if implementation == "dense":
        return _dense(q, k, v, allowed_mask(q_segment, kv_segment, q_causal, same_segment))
    if implementation == "xla":
        return _jax_nn(q, k, v, allowed_mask(q_segment, kv_segment, q_causal, same_segment), "xla")
    if implementation == "cudnn":
        _check_cudnn(q)
        return _jax_nn(q, k, v, allowed_mask(q_segment, kv_segment, q_causal, same_segment), "cudnn")
    if implementation in ("blockwise", "local"):
        block = _positive_int("block", options.get("block", DEFAULT_BLOCK))
        block_q = _positive_int("block_q", options.get("block_q", block))
        window = None
        if implementation == "local":
            if q.shape[1] != k.shape[1]:
                raise ValueError("attention 'local' is self-attention (query and key lengths differ here): use "
                                 "site_implementation(attention, 'cross') for cross-attention")
            window = _positive_int("window", options.get("window", DEFAULT_WINDOW))
            # blocks no larger than the window: the visited key span stays ~ block + window
            block, block_q = min(block, window), min(block_q, window)
        return _blockwise(q, k, v, q_segment, kv_segment, q_causal, same_segment, block, block_q, window)
    raise UserError(f"unknown attention implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")


__all__ = ["IMPLEMENTATIONS", "OPTIONS", "allowed_mask", "attend", "attention_options", "site_implementation"]
