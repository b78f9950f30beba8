"""``matmul(a, b, trans_a, trans_b)``: the 2-D products of the model's projections and output head.

Traced for XLA:CPU with float32 operands on one device, it is one call of ``medscale/kernels/matmul_cpu.cc``
(OpenBLAS's sgemm in single-threaded blocks on XLA's thread pool, through ``jax.ffi``); anywhere else
(GPU, bfloat16, a mesh of several devices, no OpenBLAS or compiler, ``MEDSCALE_CPU_KERNELS=0`` or
``MEDSCALE_CPU_MATMUL=0``, or inside :func:`medscale.kernels.xla_only`) it is ``lax.dot_general`` with
float32 accumulation. Callers give the backward pass themselves (``encdec.linear``, ``sliced_softmax_nll``),
so the native call needs no differentiation rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medscale.kernels import kernels_allowed, matmul_target
from medscale.model.sharding import active_mesh_size


def use_native(a, b) -> bool:
    """Whether :func:`matmul` of these operands, traced now, is the native call."""
    return (kernels_allowed() and jax.default_backend() == "cpu" and a.dtype == jnp.float32
            and b.dtype == jnp.float32 and active_mesh_size() == 1 and matmul_target() is not None)


def matmul(a, b, trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b)`` in float32 (op: transpose where asked) for 2-D ``a``, ``b``."""
    if use_native(a, b):
        m = a.shape[1] if trans_a else a.shape[0]
        n = b.shape[0] if trans_b else b.shape[1]
        return jax.ffi.ffi_call(matmul_target(), jax.ShapeDtypeStruct((m, n), jnp.float32))(
            a, b, trans_a=int(trans_a), trans_b=int(trans_b))
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
