"""Every attention implementation against dense: outputs and gradients, with the three mask kinds.

Float32 tolerances are ``FACTOR * sqrt(n) * eps`` times the largest magnitude of the reference, for results
that sum ``n`` terms in an order the implementation (and the CPU's vector width) chooses.
"""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medscale import kernels
from medscale.errors import UserError
from medscale.kernels.cpu import CpuOps
from medscale.model import attention
from medscale.model.attention import allowed_mask, attend, site_implementation

B, H, D = 2, 2, 8
EPS = float(np.finfo(np.float32).eps)
FACTOR = 8
KERNEL = (kernels.simd_supported() and shutil.which("g++") is not None
          and os.environ.get("MEDSCALE_CPU_KERNELS", "1") != "0")
# the CPU backend's dense attention (medscale/kernels/cpu.py): the native kernel where it builds, and its
# XLA form; every other implementation is attention.attend's
ATTEND = {"dense-cpu": CpuOps(attention_kernel=KERNEL).attend, "dense-fused": CpuOps(attention_kernel=False).attend}


def _attend(implementation):
    return ATTEND.get(implementation, attend)


def _assert_close(got, want, terms):
    bound = FACTOR * np.sqrt(terms) * EPS * np.abs(want).max()
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)


def _masks(kind, rng):
    """(lq, lk, q_segment, kv_segment, q_causal, same_segment) of one mask kind, with padding."""
    if kind == "encoder":
        lq = lk = 45
        valid = np.arange(lq)[None] < np.array([[45], [31]])
        valid[1, 5] = False  # a hole, not only trailing padding
        seg = np.where(valid, 0, -1)
        return lq, lk, seg, seg, None, False
    if kind == "decoder":  # 4M: image-like segment bidirectional, two causal sequence segments, padding
        lq = lk = 29
        seg = np.full((B, lq), -1)
        causal = np.zeros((B, lq), bool)
        seg[0, :10], seg[0, 10:20], seg[0, 20:26] = 0, 1, 3
        causal[0, 10:26] = True
        seg[1, :7], seg[1, 7:22] = 2, 1
        causal[1, 7:22] = True
        return lq, lk, seg, seg, causal, True
    if kind == "cross":
        lq, lk = 13, 40
        qseg = np.where(np.arange(lq)[None] < np.array([[13], [9]]), 0, -1)
        kvseg = np.where(rng.random((B, lk)) < 0.8, 0, -1)
        return lq, lk, qseg, kvseg, None, False
    raise AssertionError(kind)


def _inputs(kind, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    lq, lk, qseg, kvseg, causal, same = _masks(kind, rng)
    q, k, v, w = (jnp.asarray(rng.normal(size=(B, n, H, D)), jnp.float32) for n in (lq, lk, lk, lq))
    vectors = {"q_segment": jnp.asarray(qseg, jnp.int32), "kv_segment": jnp.asarray(kvseg, jnp.int32),
                   "q_causal": None if causal is None else jnp.asarray(causal), "same_segment": same}
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), w, vectors


def _value_and_grads(fn, qkv, w):
    """Output and d(sum(out * w))/d(q, k, v), in one jitted call, as float32 numpy."""

    def both(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w.astype(out.dtype))

    out, grads = jax.jit(both)(*qkv)
    return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def _dense_reference(vectors, window=None):
    mask = allowed_mask(vectors["q_segment"], vectors["kv_segment"], vectors["q_causal"],
                        vectors["same_segment"], window=window)

    def fn(q, k, v):
        return attention._dense(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)

    return fn


@functools.cache
def _dense_fp32(kind, window):
    qkv, w, vectors = _inputs(kind)
    return _value_and_grads(_dense_reference(vectors, window), qkv, w)


CASES = [(kind, impl, {}) for kind in ("encoder", "decoder", "cross")
         for impl in ("dense", "dense-cpu", "dense-fused", "xla")] + [
    # several key blocks, lengths not multiples of the block
    (kind, "blockwise", {"block": 8}) for kind in ("encoder", "decoder", "cross")] + [
    ("decoder", "blockwise", {"block": 16, "block_q": 4}),  # query blocks smaller than key blocks
    ("encoder", "blockwise", {"block": 512}),  # one block larger than the sequence
    ("encoder", "local", {"window": 9, "block": 4}),  # local is a self-attention (encoder) technique
    ("decoder", "local", {"window": 9, "block": 4}),  # (it also composes with segments and causal rows)
    ("encoder", "local", {"window": 200}),  # window wider than the sequence: equals blockwise
]


def test_reference_masks_are_not_trivial():
    """Each mask kind forbids some pairs of *valid* tokens (so an implementation ignoring the rule fails)."""
    for kind in ("encoder", "decoder", "cross"):
        _, _, vectors = _inputs(kind)
        mask = np.asarray(allowed_mask(vectors["q_segment"], vectors["kv_segment"], vectors["q_causal"],
                                       vectors["same_segment"]))[:, 0]
        padding_only = (np.asarray(vectors["q_segment"])[:, :, None] >= 0) & (
            np.asarray(vectors["kv_segment"])[:, None, :] >= 0)
        assert mask.any() and (~padding_only).any()
        if kind == "decoder":  # segments and causal rows remove valid pairs too
            assert (padding_only & ~mask).any()
            assert mask[0, 12, 11] and not mask[0, 12, 13] and mask[0, 2, 9] and not mask[0, 2, 10]


@pytest.mark.parametrize("kind,implementation,options", CASES, ids=[f"{k}-{i}-{o}" for k, i, o in CASES])
def test_equals_dense_fp32(kind, implementation, options):
    qkv, w, vectors = _inputs(kind)
    window = options.get("window") if implementation == "local" else None
    want, want_grads = _dense_fp32(kind, window)
    impl = implementation.split("-")[0]
    got, got_grads = _value_and_grads(
        lambda q, k, v: _attend(implementation)(q, k, v, implementation=impl, **vectors, **options), qkv, w)
    lk = qkv[1].shape[1]
    _assert_close(got, want, lk)  # sums over the keys
    for g, gw in zip(got_grads, want_grads):  # over keys (dq, through the softmax) or queries (dk, dv), and D
        _assert_close(g, gw, max(lk, qkv[0].shape[1]) * D)


def test_local_differs_from_full_attention():
    qkv, _, vectors = _inputs("encoder")
    full = attend(*qkv, implementation="dense", **vectors)
    local = attend(*qkv, implementation="local", window=9, block=4, **vectors)
    assert np.abs(np.asarray(full - local)).max() > 1e-2


@pytest.mark.parametrize("kind,implementation,options", [
    ("decoder", "blockwise", {"block": 8}), ("encoder", "local", {"window": 9, "block": 4}),
    ("decoder", "dense", {}), ("cross", "dense", {})])
def test_bfloat16_close_to_fp32_dense(kind, implementation, options):
    qkv, w, vectors = _inputs(kind, seed=1, dtype=jnp.bfloat16)
    window = options.get("window") if implementation == "local" else None
    want, want_grads = _value_and_grads(_dense_reference(vectors, window), [x.astype(jnp.float32) for x in qkv], w)
    fn = lambda q, k, v: attend(q, k, v, implementation=implementation, **vectors, **options)
    assert jax.eval_shape(fn, *qkv).dtype == jnp.bfloat16
    got, got_grads = _value_and_grads(fn, qkv, w)
    # bfloat16 inputs, probabilities and products: a few roundings of relative size eps(bfloat16) = 2**-7
    tol = 6 * float(jnp.finfo(jnp.bfloat16).eps)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    for g, gw in zip(got_grads, want_grads):
        assert np.abs(g - gw).max() <= tol * np.abs(gw).max()


@pytest.mark.parametrize("implementation", ["dense", "dense-cpu", "dense-fused", "xla", "blockwise", "local"])
def test_fully_masked_rows_give_zeros_and_finite_grads(implementation):
    qkv, w, vectors = _inputs("decoder", seed=2)
    qseg = np.array(vectors["q_segment"])
    dead = qseg < 0  # padding rows
    qseg[0, 3] = 7  # a segment with no key of its own: also no allowed key
    dead[0, 3] = True
    vectors = dict(vectors, q_segment=jnp.asarray(qseg))
    fn = lambda q, k, v: _attend(implementation)(q, k, v, implementation=implementation.split("-")[0], block=8,
                                                 window=9, **vectors)
    out, grads = _value_and_grads(fn, qkv, w)
    assert dead.sum() > 3
    assert np.all(out[dead] == 0)
    assert np.abs(out[~dead]).max() > 0
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(grads[0][dead] == 0)  # no gradient reaches a dead query


def test_blockwise_under_remat_and_with_unused_options():
    qkv, w, vectors = _inputs("decoder", seed=3)
    want, want_grads = _value_and_grads(_dense_reference(vectors), qkv, w)
    fn = jax.checkpoint(lambda q, k, v: attend(q, k, v, implementation="blockwise", block=8, window=5, **vectors))
    got, got_grads = _value_and_grads(fn, qkv, w)
    lk = qkv[1].shape[1]
    _assert_close(got, want, lk)
    for g, gw in zip(got_grads, want_grads):
        _assert_close(g, gw, lk * D)


def test_cudnn_without_gpu_is_a_user_error():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    qkv, _, vectors = _inputs("encoder")
    with pytest.raises(UserError, match="cudnn.*GPU"):
        attend(*qkv, implementation="cudnn", **vectors)


def test_bad_implementation_and_options():
    qkv, _, vectors = _inputs("encoder")
    with pytest.raises(UserError, match="unknown attention implementation 'flash'"):
        attend(*qkv, implementation="flash", **vectors)
    with pytest.raises(UserError, match="block"):
        attend(*qkv, implementation="blockwise", block=-4, **vectors)
    with pytest.raises(UserError, match="window"):
        attend(*qkv, implementation="local", window=2.5, **vectors)
    with pytest.raises(TypeError, match="blok"):
        attend(*qkv, implementation="blockwise", blok=4, **vectors)


def test_site_implementation():
    assert site_implementation("local", "encoder") == "local"
    assert site_implementation("local", "decoder") == "blockwise"
    assert site_implementation("local", "cross") == "blockwise"
    assert site_implementation("xla", "cross") == "xla"
    with pytest.raises(ValueError):
        site_implementation("dense", "middle")


def test_attention_options_set_defaults_at_trace_time():
    from medscale.model.attention import attention_options

    qkv, _, vectors = _inputs("encoder")
    fn = lambda q, k, v: attend(q, k, v, implementation="local", **vectors)
    with attention_options(window=9, block=4):
        narrow = jax.jit(fn)(*qkv)
        explicit = jax.jit(lambda q, k, v: attend(q, k, v, implementation="local", window=200, **vectors))(*qkv)
    want = jax.jit(_dense_reference(vectors, window=9))(*qkv)
    lk = qkv[1].shape[1]
    _assert_close(np.asarray(narrow), np.asarray(want), lk)
    _assert_close(np.asarray(explicit), np.asarray(jax.jit(_dense_reference(vectors))(*qkv)), lk)  # explicit wins
    with pytest.raises(TypeError), attention_options(blocks=3):
        pass


def test_local_refuses_cross_attention():
    qkv, _, vectors = _inputs("cross")
    with pytest.raises(ValueError, match="site_implementation"):
        attend(*qkv, implementation="local", **vectors)
