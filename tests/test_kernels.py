"""The CPU kernels: attention (medscale/kernels/attention_cpu.cc) built here, used by the training step, and
equal to the XLA implementation of ``dense`` at the benchmark's head shapes (tests/test_attention_equivalence.py
checks both against plain autodiff on small masked cases); the OpenBLAS matmul (matmul_cpu.cc) equal to a
float64 product for every transpose combination and used for every projection and the head."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medscale import kernels
from medscale.bench.step import bench_spec
from medscale.model import attention
from medscale.train import step as S
from medscale.train.batches import random_batch

CAN_BUILD = (kernels.simd_supported() and shutil.which("g++") is not None
             and os.environ.get("MEDSCALE_CPU_KERNELS", "1") != "0")


try:
    import scipy_openblas32  # noqa: F401

    CAN_BUILD_MATMUL = (shutil.which("g++") is not None and os.environ.get("MEDSCALE_CPU_KERNELS", "1") != "0"
                        and os.environ.get("MEDSCALE_CPU_MATMUL", "1") != "0")
except ImportError:
    CAN_BUILD_MATMUL = False


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


@pytest.mark.skipif(not CAN_BUILD, reason="the CPU kernel cannot be built here")
@pytest.mark.parametrize("lq,lk,same_segment", [(256, 256, False), (64, 256, False), (64, 64, True), (37, 50, True)])
def test_kernel_equals_xla_dense(lq, lk, same_segment):
    rng = np.random.default_rng(lq + lk)
    b, h, d = 2, 4, 64 if lq >= 64 else 24
    q, k, v, w = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk, lq))
    qs = jnp.asarray(rng.integers(-1, 3, (b, lq)), jnp.int32)
    ks = jnp.asarray(rng.integers(-1, 3, (b, lk)), jnp.int32)
    causal = jnp.asarray(rng.integers(0, 2, (b, lq)), bool) if same_segment else None
    bias, rows = attention._bias_and_rows(qs, ks, causal, same_segment)

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, bias, rows), q, k, v)
        return (out, *vjp(w))

    got, want = ([np.asarray(x) for x in jax.jit(functools.partial(run, fn))()]
                 for fn in (attention._cpu_kernel, attention._fused))
    assert np.abs(want[0]).max() > 0.1 and (np.asarray(rows) == 0).any()  # non-trivial, with empty rows
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, atol=1e-5 * np.abs(x).max(), rtol=1e-5)


@pytest.mark.skipif(not CAN_BUILD, reason="the CPU kernel cannot be built here")
def test_training_step_calls_the_kernel_and_flop_count_does_not():
    spec = bench_spec(32, 1, 1, 2, 64, "32,32,32,32", 16, 8)
    prog = S.build(spec, S.OptConfig())
    state, batch = prog.init(0), prog.put_batch(random_batch(spec, 2, 0))
    with_kernel = prog.step.lower(state, batch).compile().as_text()
    with kernels.xla_only():  # read at trace time: a freshly built step
        plain = S.build(spec, S.OptConfig()).step.lower(state, batch).compile().as_text()
    # encoder self, decoder self and cross-attention: one forward and one backward call each
    assert with_kernel.count(f'custom_call_target="{kernels.FORWARD}"') == 3
    assert with_kernel.count(f'custom_call_target="{kernels.BACKWARD}"') == 3
    assert kernels.FORWARD not in plain
    if CAN_BUILD_MATMUL:
        # every linear (encoder 4, decoder 6, the cross-attention k/v of all layers 1) and the head: forward,
        # input gradient, weight gradient
        assert with_kernel.count(f'custom_call_target="{kernels.MATMUL}"') == 3 * (4 + 6 + 1 + 1)
        assert kernels.MATMUL not in plain


@pytest.mark.skipif(not CAN_BUILD_MATMUL, reason="the matmul kernel cannot be built here")
@pytest.mark.parametrize("m,k,n", [(300, 70, 45), (40, 33, 700), (1, 5, 1), (130, 1, 64)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_kernel_equals_float64_product(m, k, n, trans_a, trans_b):
    from medscale.model.matmul import matmul, use_native

    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    assert use_native(jnp.asarray(a), jnp.asarray(b)), kernels.unavailable_reason("matmul")
    got = np.asarray(jax.jit(lambda a, b: matmul(a, b, trans_a, trans_b))(a, b))
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k) * np.abs(want).max())
