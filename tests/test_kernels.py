"""The CPU backend: the native kernels (medscale/kernels/*.cc) build where they can and the training step calls
them; the CPU implementation of the model's hooks (medscale/kernels/cpu.py, with and without the kernels)
equals the plain path in values and gradients; the attention kernel equals its XLA form (``_fused``) at the
benchmark's head shapes (tests/test_attention_equivalence.py checks both against plain autodiff on small masked
cases); the OpenBLAS matmul equals a float64 product for every transpose combination.

Float tolerances: two float32 computations of the same quantity in different orders each differ from the exact
value by rounding errors of size eps = 2**-23 times the magnitudes summed; for a sum of ``n`` terms the error
grows like sqrt(n) in practice (n in the worst case). The bounds below are ``FACTOR * sqrt(n) * eps`` times
the largest magnitude involved, so they hold whatever order the CPU's vector width (AVX2, AVX-512) gives.
"""

import functools
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medscale import kernels
from medscale.bench.step import bench_spec
from medscale.kernels import cpu
from medscale.model.ops import PLAIN
from medscale.model.sharding import make_mesh
from medscale.train import step as S
from medscale.train.batches import random_batch

EPS = float(np.finfo(np.float32).eps)
FACTOR = 8  # rounding errors per term: products, sums of partial sums, exp/log, a few chained operations

CAN_BUILD = (kernels.simd_supported() and shutil.which("g++") is not None
             and os.environ.get("MEDSCALE_CPU_KERNELS", "1") != "0")


try:
    import scipy_openblas32  # noqa: F401

    CAN_BUILD_MATMUL = (shutil.which("g++") is not None and os.environ.get("MEDSCALE_CPU_KERNELS", "1") != "0"
                        and os.environ.get("MEDSCALE_CPU_MATMUL", "1") != "0")
except ImportError:
    CAN_BUILD_MATMUL = False

# the CPU implementation as the step builds it here (kernels where they build), and as XLA operations only
CPU_VARIANTS = {"kernels": cpu.CpuOps(attention_kernel=CAN_BUILD, matmul_kernel=CAN_BUILD_MATMUL),
                "xla": cpu.CpuOps(attention_kernel=False, matmul_kernel=False)}


def assert_close(got, want, terms, scale=None):
    """``|got - want| <= FACTOR * sqrt(terms) * eps * scale`` elementwise (scale: max |want| by default)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = np.abs(want).max() if scale is None else scale
    bound = FACTOR * np.sqrt(terms) * EPS * scale
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)


def test_kernel_builds_where_it_can():
    if not CAN_BUILD:
        assert kernels.attention_targets() is None and kernels.unavailable_reason()
        pytest.skip(f"no AVX-512/AVX2 or g++ here: {kernels.unavailable_reason()}")
    assert kernels.attention_targets() == (kernels.FORWARD, kernels.BACKWARD), kernels.unavailable_reason()
    libs = list(kernels._cache_dir().glob("attention_cpu-*.so"))
    assert libs and kernels._build() in libs  # a second build finds the cached library


def test_matmul_kernel_builds_where_it_can_and_can_be_turned_off(monkeypatch):
    if not CAN_BUILD_MATMUL:
        assert kernels.matmul_target() is None and kernels.unavailable_reason("matmul")
        pytest.skip(f"no scipy-openblas32 or g++ here: {kernels.unavailable_reason('matmul')}")
    assert kernels.matmul_target() == kernels.MATMUL, kernels.unavailable_reason("matmul")
    assert list(kernels._cache_dir().glob("matmul_cpu-*.so"))
    monkeypatch.setenv("MEDSCALE_CPU_MATMUL", "0")
    with pytest.raises(RuntimeError, match="MEDSCALE_CPU_MATMUL=0"):
        kernels._load_matmul()


def test_step_chooses_the_cpu_ops_where_they_apply_and_says_so(monkeypatch, caplog):
    one = make_mesh((1, 1, 1), jax.devices()[:1])
    caplog.set_level(logging.INFO, logger="medscale.train.step")
    ops = S.choose_ops("float32", one)
    if CAN_BUILD or CAN_BUILD_MATMUL:
        assert ops == cpu.CpuOps(attention_kernel=CAN_BUILD, matmul_kernel=CAN_BUILD_MATMUL)
        assert "model ops: cpu (native kernels: " in caplog.text
    else:
        assert ops is PLAIN and caplog.messages == [caplog.messages[0]]
        assert caplog.messages[0].startswith("model ops: plain (")
    if not CAN_BUILD and os.environ.get("MEDSCALE_CPU_KERNELS", "1") != "0":  # a kernel that did not build: why
        assert f"attention kernel unavailable: {kernels.unavailable_reason('attention')}" in caplog.text
    caplog.clear()
    monkeypatch.delenv("MEDSCALE_CPU_KERNELS", raising=False)  # the other reasons, when the kernels may be used
    assert S.choose_ops("bfloat16", one) is PLAIN and "the dtype is bfloat16" in caplog.text
    assert S.choose_ops("float32", one, cpu_kernels=False) is PLAIN
    monkeypatch.setenv("MEDSCALE_CPU_KERNELS", "0")
    caplog.clear()
    assert S.choose_ops("float32", one) is PLAIN
    assert caplog.messages == ["model ops: plain (CPU kernels off: MEDSCALE_CPU_KERNELS=0)"]


def test_cpu_backend_is_foreseen_before_jax_starts(monkeypatch):
    """The CLI tunes malloc only where JAX will run on the CPU, judged before JAX starts (kernels/malloc.py)."""
    from medscale.kernels.malloc import cpu_backend_expected

    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not cpu_backend_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_backend_expected()
    monkeypatch.delenv("JAX_PLATFORMS")
    assert cpu_backend_expected() == (jax.default_backend() == "cpu")


# ------------------------------------------------------------------------ the CPU hooks equal the plain ones


def _value_and_grads(fn, args, cot):
    """``fn(*args)`` and the vector-Jacobian product of ``cot`` with respect to every argument (jitted)."""
    def both(*a):
        out, vjp = jax.vjp(fn, *a)
        return out, vjp(cot)

    return jax.jit(both)(*args)


@pytest.mark.parametrize("variant", sorted(CPU_VARIANTS))
@pytest.mark.parametrize("contract,shapes", [
    (1, [(64, 16)]), (1, [(16, 64)]), (1, [(32, 32)]),  # narrowing (transposed dw under XLA), widening, square
    (1, [(32, 2, 8)] * 3),  # q, k, v of one input: one concatenated matmul, split
    (2, [(2, 8, 32)]),  # the attention output projection: heads and head dim contracted
])
def test_cpu_project_equals_plain(variant, contract, shapes):
    ops = CPU_VARIANTS[variant]
    r = np.random.default_rng(len(shapes) + shapes[0][0])
    x = jnp.asarray(r.standard_normal((3, 5, *shapes[0][:contract])), jnp.float32) * 2
    ws = [jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes]
    cots = [jnp.asarray(r.standard_normal((3, 5, *s[contract:])), jnp.float32) for s in shapes]
    n_in, n_out = int(np.prod(shapes[0][:contract])), int(np.prod(shapes[0][contract:]))

    def loss(o, x, *ws):  # a GELU between, as in the MLP: its hand-written derivative is checked too
        return sum(jnp.sum(o.gelu(y) * c) for y, c in zip(o.project(x, ws, contract), cots))

    got = jax.jit(jax.value_and_grad(functools.partial(loss, ops), argnums=tuple(range(1 + len(ws)))))(x, *ws)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, PLAIN), argnums=tuple(range(1 + len(ws)))))(x, *ws)
    ys = ops.project(x, ws, contract)
    assert [y.shape for y in ys] == [(3, 5, *s[contract:]) for s in shapes]
    for y, y0 in zip(ys, PLAIN.project(x, ws, contract)):  # n_in products per output
        assert_close(y, y0, n_in)
    # the loss: 15 tokens x the outputs; gradients: 15 tokens (weights) or the outputs (input) per element
    assert_close(got[0], want[0], 15 * n_out * len(ws))
    for g, g0 in zip(got[1], want[1]):
        assert_close(g, g0, max(15, n_out * len(ws)))
    assert jnp.array_equal(ops.gelu(x), jax.nn.gelu(x, approximate=True))


@pytest.mark.parametrize("variant", sorted(CPU_VARIANTS))
def test_cpu_nll_equals_plain(variant):
    ops = CPU_VARIANTS[variant]
    r = np.random.default_rng(5)
    n, d, sizes = 40, 16, (24, 8, 32)
    offsets = np.cumsum((0, *sizes[:-1]))
    mod = r.integers(0, len(sizes), n)
    h = jnp.asarray(r.standard_normal((n, d)), jnp.float32)
    w = jnp.asarray(r.standard_normal((d, sum(sizes))), jnp.float32) / 2
    off, size = jnp.asarray(offsets[mod], jnp.int32), jnp.asarray(np.asarray(sizes)[mod], jnp.int32)
    idx = off + jnp.asarray(r.integers(0, 8, n), jnp.int32)
    cot = jnp.asarray(r.uniform(0.5, 1.5, n), jnp.float32)
    got = _value_and_grads(lambda h, w: ops.nll(h, w, off, size, idx), (h, w), cot)
    want = _value_and_grads(lambda h, w: PLAIN.nll(h, w, off, size, idx), (h, w), cot)
    logit_scale = float(np.abs(np.asarray(h) @ np.asarray(w)).max())
    assert_close(got[0], want[0], d + max(sizes), scale=logit_scale)  # a logit, then a log-sum-exp
    assert_close(got[1][0], want[1][0], max(sizes) * d)
    assert_close(got[1][1], want[1][1], n)


@pytest.mark.parametrize("variant", sorted(CPU_VARIANTS))
def test_cpu_model_loss_and_grads_equal_plain(variant):
    """The whole model (encoder, decoder, head) with the CPU hooks against the plain model, same parameters."""
    spec = bench_spec(32, 1, 2, 2, 64, "32,32,32,32,32,32", 24, 12)
    graphdef, params = S.init_params(spec, 0)
    cpu_graphdef, _ = S.init_params(spec, 0, ops=CPU_VARIANTS[variant])
    batch = {k: jnp.asarray(v) for k, v in random_batch(spec, 3, 1).items()}

    def grad(g):
        return jax.jit(jax.value_and_grad(lambda p: nnx.merge(g, p).loss(batch)[0]))(params)

    (l_cpu, g_cpu), (l_plain, g_plain) = grad(cpu_graphdef), grad(graphdef)
    # the longest sums: a weight gradient over the 72 decoder tokens (d_ff is 64); a parameter's gradient passes
    # through at most 4 such stages (head, 2 decoder layers, encoder layer)
    terms = 72 * 4
    assert abs(float(l_cpu) - float(l_plain)) <= FACTOR * np.sqrt(terms) * EPS * abs(float(l_plain))
    for a, b in zip(jax.tree.leaves(g_cpu), jax.tree.leaves(g_plain)):
        assert_close(a, b, terms)


# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.skipif(not CAN_BUILD, reason="the CPU kernel cannot be built here")
@pytest.mark.parametrize("lq,lk,same_segment", [(256, 256, False), (64, 256, False), (64, 64, True), (37, 50, True)])
def test_kernel_equals_xla_dense(lq, lk, same_segment):
    rng = np.random.default_rng(lq + lk)
    b, h, d = 2, 4, 64 if lq >= 64 else 24
    q, k, v, w = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk, lq))
    qs = jnp.asarray(rng.integers(-1, 3, (b, lq)), jnp.int32)
    ks = jnp.asarray(rng.integers(-1, 3, (b, lk)), jnp.int32)
    causal = jnp.asarray(rng.integers(0, 2, (b, lq)), bool) if same_segment else None
    bias, rows = cpu._bias_and_rows(qs, ks, causal, same_segment)

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, bias, rows), q, k, v)
        return (out, *vjp(w))

    got, want = ([np.asarray(x) for x in jax.jit(functools.partial(run, fn))()]
                 for fn in (cpu._cpu_kernel, cpu._fused))
    assert np.abs(want[0]).max() > 0.1 and (np.asarray(rows) == 0).any()  # non-trivial, with empty rows
    for g, x in zip(got, want):  # sums over up to lk keys and d head dims
        assert_close(g, x, max(lk, d))


@pytest.mark.skipif(not CAN_BUILD, reason="the CPU kernel cannot be built here")
def test_training_step_calls_the_kernel_and_flop_count_does_not():
    spec = bench_spec(32, 1, 1, 2, 64, "32,32,32,32,32,32", 16, 8)
    prog = S.build(spec, S.OptConfig())
    state, batch = prog.init(0), prog.put_batch(random_batch(spec, 2, 0))
    with_kernel = prog.step.lower(state, batch).compile().as_text()
    plain = S.build(spec, S.OptConfig(), cpu_kernels=False).step.lower(state, batch).compile().as_text()
    # encoder self, decoder self and cross-attention: one forward and one backward call each
    assert with_kernel.count(f'custom_call_target="{kernels.FORWARD}"') == 3
    assert with_kernel.count(f'custom_call_target="{kernels.BACKWARD}"') == 3
    assert kernels.FORWARD not in plain
    if CAN_BUILD_MATMUL:
        # every projection call (encoder 4, decoder 6, the cross-attention k/v of all layers 1) and the head:
        # forward, input gradient, weight gradient
        assert with_kernel.count(f'custom_call_target="{kernels.MATMUL}"') == 3 * (4 + 6 + 1 + 1)
        assert kernels.MATMUL not in plain


@pytest.mark.skipif(not CAN_BUILD_MATMUL, reason="the matmul kernel cannot be built here")
@pytest.mark.parametrize("m,k,n", [(300, 70, 45), (40, 33, 700), (1, 5, 1), (130, 1, 64)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_kernel_equals_float64_product(m, k, n, trans_a, trans_b):
    assert kernels.matmul_target() == kernels.MATMUL, kernels.unavailable_reason("matmul")
    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    got = np.asarray(jax.jit(lambda a, b: cpu.matmul(True, a, b, trans_a, trans_b))(a, b))
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    assert got.shape == (m, n) and got.dtype == np.float32
    # one float32 result against the exact one: k products, each term at most max|a| max|b|
    assert_close(got, want, k, scale=np.sqrt(k) * np.abs(a).max() * np.abs(b).max())
