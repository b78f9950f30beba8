"""The CPU backend: the model's hooks (:class:`medscale.model.ops.Ops`) for XLA:CPU in float32 on one device.

``medscale.train.step.build`` gives the model a :class:`CpuOps` where it applies (``choose_ops`` there); the
model's code is the same either way. What this backend does differently from the plain path, and why (profiles
of the training step on two cores; docs/model.md, "Speed"):

- **projections** (:meth:`CpuOps.project`): the weights that share an input (q, k, v; the cross-attention
  keys and values of every decoder layer) are concatenated at call time into one wide matmul (wide matmuls
  run closer to peak than narrow ones) and its output is split with ``lax.split`` (whose gradient is one
  concatenate, where indexing gave one zero-padded full-size gradient per slice). The matmul is :func:`linear`,
  whose backward pass is written out: the weight gradient contracts the token axis of the 2-D operands, and
  with XLA's matmuls the gradient of a narrowing weight (the MLP's down-projection) is formed transposed
  behind an ``optimization_barrier`` (XLA:CPU ran that matmul ~1.6x faster with the wide operand on the
  output's minor side, and would otherwise fold the transpose back). Every product is :func:`matmul`:
  OpenBLAS's sgemm through ``matmul_cpu.cc`` where that kernel built, else ``lax.dot_general``.
- **dense attention** (:meth:`CpuOps.attend`): ``attention_cpu.cc``, one native call per direction (each
  (batch, head) pair's scores stay in cache from QK^T through the softmax to PV); where it did not build,
  :func:`_fused`, the same equations as XLA operations. Both keep the probabilities as the only
  ``Lq x Lk`` residual and take the mask as an additive bias (over keys only for encoder and cross-attention).
  Other attention implementations are the plain ones.
- **the output head's NLL** (:meth:`CpuOps.nll`): :func:`sliced_softmax_nll`, one pass for the statistics and
  the logit gradient, which is the only ``[N, V]`` residual; the backward is two matmuls.
- **GELU** (:meth:`CpuOps.gelu`): :func:`gelu_tanh`, whose backward is one elementwise pass.

Each of these equals the plain path to float32 rounding (``tests/test_kernels.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from medscale import kernels
from medscale.model.attention import allowed_mask
from medscale.model.ops import Ops


@dataclasses.dataclass(frozen=True)
class CpuOps(Ops):
    """The CPU implementation of the model's hooks. ``attention_kernel``/``matmul_kernel``: use the native
    kernel (built on first use, :func:`medscale.kernels.attention_targets`, :func:`medscale.kernels.matmul_target`;
    tracing raises where it cannot be built); ``False`` traces the same algorithm as XLA operations."""

    attention_kernel: bool = True
    matmul_kernel: bool = True

    def project(self, x, ws, contract: int = 1) -> list:
        lead = x.shape[:x.ndim - contract]
        x2 = x.reshape(*lead, -1)
        flat = [w.reshape(x2.shape[-1], -1) for w in ws]
        y = linear(self.matmul_kernel, x2, flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1))
        parts = [y] if len(flat) == 1 else _split(y, [w.shape[1] for w in flat])
        return [p.reshape(*lead, *w.shape[contract:]) for p, w in zip(parts, ws)]

    def gelu(self, x):
        return gelu_tanh(x)

    def attend(self, q, k, v, *, q_segment, kv_segment, q_causal=None, same_segment=False,
               implementation="dense", **options):
        if implementation != "dense":
            return super().attend(q, k, v, q_segment=q_segment, kv_segment=kv_segment, q_causal=q_causal,
                                  same_segment=same_segment, implementation=implementation, **options)
        bias, rows = _bias_and_rows(q_segment, kv_segment, q_causal, same_segment)
        return (_cpu_kernel if self.attention_kernel else _fused)(q, k, v, bias, rows)

    def nll(self, h_ND, w_DV, offset_N, size_N, index_N):
        return sliced_softmax_nll(self.matmul_kernel, h_ND, w_DV, offset_N, size_N, index_N)


def _targets(kernel: str):
    """The FFI target name(s) of a kernel, built and registered on first use (a ``CpuOps`` that asks for a
    kernel that cannot be built here is an error, with the reason)."""
    target = kernels.attention_targets() if kernel == "attention" else kernels.matmul_target()
    if target is None:
        raise RuntimeError(f"the {kernel} kernel is unavailable: {kernels.unavailable_reason(kernel)}")
    return target


def _split(y, widths):
    """The column blocks of ``y`` of these widths, by ``lax.split`` (its gradient is one concatenate)."""
    return jax.lax.split(y, widths, axis=y.ndim - 1)


# ----------------------------------------------------------------------------------------------- matmuls


def matmul(native: bool, a, b, trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b)`` in float32 (op: transpose where asked) for 2-D float32 ``a``, ``b``: one call of
    ``matmul_cpu.cc`` (``native``), else ``lax.dot_general``. No differentiation rule: callers give the
    backward pass (:func:`linear`, :func:`sliced_softmax_nll`)."""
    if native:
        m = a.shape[1] if trans_a else a.shape[0]
        n = b.shape[0] if trans_b else b.shape[1]
        return jax.ffi.ffi_call(_targets("matmul"), jax.ShapeDtypeStruct((m, n), jnp.float32))(
            a, b, trans_a=int(trans_a), trans_b=int(trans_b))
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear(native, x, w):
    """``x[..., i] @ w[i, o]`` with f32 accumulation, output in x's dtype (``native``: by :func:`matmul`'s
    kernel). The backward pass contracts the token axis of the flattened 2-D operands for the weight
    gradient."""
    return _linear_fwd(native, x, w)[0]


def _linear_fwd(native, x, w):
    y = matmul(native, x.reshape(-1, x.shape[-1]), w).astype(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1]), (x, w)


def _linear_bwd(native, res, g):
    x, w = res
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    if native or w.shape[0] <= w.shape[1]:
        dw = matmul(native, x2, g2, trans_a=True)  # x^T g: contracts the token axis
    else:
        # XLA, a narrowing weight (the MLP's down-projection): form dw^T [out, in] and transpose it. XLA:CPU
        # runs the token-contracting matmul about 1.6x faster with the wide operand on the output's minor
        # side; without the barrier XLA folds the transpose back into the matmul (``docs/model.md``, "Speed")
        dw = jax.lax.optimization_barrier(matmul(native, g2, x2, trans_a=True)).T
    dx = matmul(native, g2, w, trans_b=True)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


# ------------------------------------------------------------------------------------------------- GELU

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


# ------------------------------------------------------------------------------------------ the head's NLL


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def sliced_softmax_nll(native, h_ND, w_DV, offset_N, size_N, index_N):
    """:meth:`medscale.model.ops.Ops.nll` with its backward pass written out: one matmul for all modalities;
    the slice restriction costs one exp per logit, as a plain softmax would; the logit gradient is formed in
    the same pass as the forward statistics and kept as the only [N, V] residual, so the backward pass is
    just the two matmuls."""
    return _nll_fwd(native, h_ND, w_DV, offset_N, size_N, index_N)[0]


def _nll_fwd(native, h_ND, w_DV, offset_N, size_N, index_N):
    logits = matmul(native, h_ND, w_DV)
    nll, dlogits = _slice_stats(logits, offset_N, size_N, index_N)
    return nll, (h_ND, w_DV, dlogits.astype(h_ND.dtype), offset_N, size_N, index_N)


def _nll_bwd(native, res, g_N):
    h, w, dlogits, offset_N, size_N, index_N = res
    dl = dlogits * g_N[:, None].astype(dlogits.dtype)
    dh = matmul(native, dl, w, trans_b=True)
    dw = matmul(native, h, dl, trans_a=True)
    zero = np.zeros((), jax.dtypes.float0)
    return (dh.astype(h.dtype), dw.astype(w.dtype), np.broadcast_to(zero, offset_N.shape),
            np.broadcast_to(zero, size_N.shape), np.broadcast_to(zero, index_N.shape))


sliced_softmax_nll.defvjp(_nll_fwd, _nll_bwd)


# ----------------------------------------------------------------------------------------- dense attention


def _bias_and_rows(q_segment, kv_segment, q_causal, same_segment, dtype=jnp.float32):
    """The mask rule of ``medscale.model.attention`` as an additive score bias and a query-row factor, both
    broadcastable to ``[B, H, Lq, Lk]``.

    Encoder and cross-attention (no segments to match, no causal rows) need only a key bias ``[B, 1, 1, Lk]``
    and the query validity ``[B, 1, Lq, 1]``, so no ``Lq x Lk`` mask is built; otherwise the bias is the full
    ``[B, 1, Lq, Lk]`` mask. ``rows`` is 1 where a query has at least one allowed key, else 0 (its output and
    gradients are then zero)."""
    big = jnp.asarray(-1e30, dtype)
    if not same_segment and q_causal is None:
        key_ok = kv_segment >= 0
        bias = jnp.where(key_ok, 0.0, big).astype(dtype)[:, None, None, :]
        rows = (q_segment >= 0) & jnp.any(key_ok, axis=-1, keepdims=True)
    else:
        mask = allowed_mask(q_segment, kv_segment, q_causal, same_segment)
        bias = jnp.where(mask, 0.0, big).astype(dtype)
        rows = jnp.any(mask[:, 0], axis=-1)
    return bias, rows.astype(dtype)[:, None, :, None]


def _to_heads(x):  # [B, L, H, Dh] -> [B, H, L, Dh]
    return jnp.transpose(x, (0, 2, 1, 3))


@jax.custom_vjp
def _fused(q, k, v, bias, rows):
    """Dense attention with a hand-written backward pass, as XLA operations (the kernel's equations).

    Works in ``[B, H, L, Dh]`` internally. The forward keeps the normalised probabilities P (float32) as the
    only ``Lq x Lk`` residual; the backward is the four matmuls dV = P^T dO, dP = dO V^T, dQ = dS K,
    dK = dS^T Q with dS = P (dP - rowsum(dO * O)) formed in one elementwise pass, so no mask or select is
    differentiated (profiled: autodiff spent most of the step in elementwise passes, transposes and selects
    over the score tensor; this is about twice as fast on CPU)."""
    return _fused_fwd(q, k, v, bias, rows)[0]


def _fused_fwd(q, k, v, bias, rows):
    # the scale goes on q (a [.., Dh] operand): a scalar multiply of the scores would be handed to XLA:CPU's
    # fused dot+softmax kernel as a materialised [B, H, Lq, Lk] constant
    qh = _to_heads(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype))
    kh, vh = _to_heads(k), _to_heads(v)
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) + bias
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = p * (rows / jnp.sum(p, axis=-1, keepdims=True))
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    o = o.astype(q.dtype)
    return jnp.transpose(o, (0, 2, 1, 3)), (qh, kh, vh, p, o, bias, rows)


def _fused_bwd(res, do):
    qh, kh, vh, p, o, bias, rows = res  # qh is the scaled q
    scale = qh.shape[-1] ** -0.5
    do = _to_heads(do)
    f32 = jnp.float32
    dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), do, preferred_element_type=f32)
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, vh, preferred_element_type=f32)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
    ds = (p * (dp - delta)).astype(qh.dtype)  # d(scores); the scale is applied to dq below
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kh, preferred_element_type=f32) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qh, preferred_element_type=f32)
    back = lambda x, like: jnp.transpose(x, (0, 2, 1, 3)).astype(like.dtype)
    return back(dq, qh), back(dk, kh), back(dv, vh), jnp.zeros_like(bias), jnp.zeros_like(rows)


_fused.defvjp(_fused_fwd, _fused_bwd)


@jax.custom_vjp
def _cpu_kernel(q, k, v, bias, rows):
    """:func:`_fused`'s equations in one native call per direction (``attention_cpu.cc``; same inputs, same
    result to float rounding)."""
    return _cpu_kernel_fwd(q, k, v, bias, rows)[0]


def _cpu_kernel_fwd(q, k, v, bias, rows):
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    qs = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    bias = jnp.broadcast_to(bias, (b, 1, bias.shape[2], lk)).reshape(b, bias.shape[2], lk)
    rows = jnp.broadcast_to(rows, (b, 1, lq, 1)).reshape(b, lq)
    o, p = jax.ffi.ffi_call(_targets("attention")[0], (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                       jax.ShapeDtypeStruct((b, h, lq, lk), jnp.float32)))(
        qs, k, v, bias, rows)
    return o, (qs, k, v, p, o)


def _cpu_kernel_bwd(res, do):
    qs, k, v, p, o = res
    dq, dk, dv = jax.ffi.ffi_call(_targets("attention")[1], (jax.ShapeDtypeStruct(qs.shape, qs.dtype),
                                                             jax.ShapeDtypeStruct(k.shape, k.dtype),
                                                             jax.ShapeDtypeStruct(v.shape, v.dtype)))(
        qs, k, v, p, o, do)
    return dq, dk, dv, None, None


_cpu_kernel.defvjp(_cpu_kernel_fwd, _cpu_kernel_bwd)
