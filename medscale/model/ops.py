"""The model's compute hooks: the one place where a backend plugs its own implementation into the model.

:class:`Ops` is the plain path, the one that runs on GPUs, TPUs, meshes and in bfloat16: projections by
``jnp.tensordot`` with float32 accumulation, attention by :func:`medscale.model.attention.attend`, the output
head's NLL as a masked log-softmax, all differentiated by JAX. The model (``encdec.EncoderDecoder``) receives
one ``Ops`` at construction (a static attribute: it is part of the graph definition, not of the parameters, so
checkpoints do not depend on it) and calls only these methods for the work they name. ``medscale.train.step``
chooses the object when it builds the step; the native CPU kernels (``medscale/kernels/cpu.py``) are a subclass
that overrides these methods and nothing else.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medscale.model.attention import attend


@dataclasses.dataclass(frozen=True)
class Ops:
    """The plain JAX implementation of the model's hooks (hashable, compared by value)."""

    def project(self, x, ws, contract: int = 1) -> list:
        """``[tensordot(x, w) for w in ws]``: the last ``contract`` axes of ``x`` against the first ``contract``
        axes of each weight, float32 accumulation, result in ``x``'s dtype. The weights of one call share the
        input (q, k, v of self-attention; the cross-attention keys and values of every decoder layer)."""
        return [jnp.tensordot(x, w, axes=contract, preferred_element_type=jnp.float32).astype(x.dtype)
                for w in ws]

    def gelu(self, x):
        """The tanh-approximated GELU."""
        return jax.nn.gelu(x, approximate=True)

    def attend(self, q, k, v, **kwargs):
        """:func:`medscale.model.attention.attend` (same arguments)."""
        return attend(q, k, v, **kwargs)

    def nll(self, h_ND, w_DV, offset_N, size_N, index_N):
        """NLL per position of column ``index`` of the output head ``h @ w``, each position's softmax over its
        own modality's slice ``[offset, offset + size)`` of the combined vocabulary (float32)."""
        logits = jnp.dot(h_ND, w_DV, preferred_element_type=jnp.float32)
        col = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
        inside = (col >= offset_N[:, None]) & (col < (offset_N + size_N)[:, None])
        lse = jax.nn.logsumexp(jnp.where(inside, logits, -jnp.inf), axis=-1)
        return lse - jnp.take_along_axis(logits, index_N[:, None], axis=-1)[:, 0]


PLAIN = Ops()
