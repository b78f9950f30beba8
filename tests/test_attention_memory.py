"""Compiled memory of attention forward+backward: blockwise and local grow linearly with length, dense does not."""

import jax
import jax.numpy as jnp

from medscale.model.attention import attend

B, H, D = 1, 2, 16


def _temp_bytes(implementation, length, **options):
    """Temporary bytes of the AOT-compiled gradient of sum(attend(...)**2) wrt q, k, v."""
    x = jax.ShapeDtypeStruct((B, length, H, D), jnp.float32)
    seg = jax.ShapeDtypeStruct((B, length), jnp.int32)

    def loss(q, k, v, s):
        return jnp.sum(attend(q, k, v, q_segment=s, kv_segment=s, implementation=implementation, **options) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly():
    dense_large = _temp_bytes("dense", 2048)
    # dense stores (at least) one float32 score matrix for the backward pass
    assert dense_large >= B * H * 2048 * 2048 * 4
    small, large = _temp_bytes("blockwise", 512, block=128), _temp_bytes("blockwise", 2048, block=128)
    # 4x the length: linear is 4x; a stored [L, L] score matrix would be 16x
    assert large <= 5 * small, (small, large)
    assert large * 8 <= dense_large, (large, dense_large)
    # local (window 64, blocks of 64) keeps no more than blockwise does at the same length
    local = _temp_bytes("local", 2048, window=64)
    assert local <= 1.25 * large, (local, large)
