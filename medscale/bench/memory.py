"""XLA's own memory analysis of the compiled train step, beside ``medscale.memory``'s estimate.

Compiles the real step (``medscale.train.step.build``, the plain ops) ahead of time from abstract shapes, so no
parameter is allocated, and reads ``compiled.memory_analysis()``: the peak is arguments + outputs - aliased
(the donated state) + temporaries.

On the CPU, XLA's default scheduler favours concurrency and may move a rematerialised layer's recomputation
into the forward pass, which undoes the remat policy (measured: mini, batch 32, enc 128, dec 64, float32, remat
full: 380.7 MB with the default scheduler, 244.2 MB with the memory-minimising one; remat none: 380.7 MB and
347.1 MB). Accelerators schedule the recomputation in the backward pass, so the comparison asks XLA:CPU for
its memory-minimising scheduler (``--xla_cpu_enable_concurrency_optimized_scheduler=false``). XLA reads the
flag when its CPU backend starts: :func:`memory_scheduler_flag` must run before JAX's first computation in the
process (``medscale memory --xla`` does; ``schedule`` in the result says which scheduler compiled the step).
"""

from __future__ import annotations

import os

import jax

from medscale.bench.step import compiled_memory
from medscale.errors import UserError
from medscale.model.encdec import DTYPES
from medscale.model.sharding import make_mesh
from medscale.train.step import OptConfig, abstract_batch, build

MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def memory_scheduler_flag() -> bool:
    """Add the memory-minimising scheduler flag to ``XLA_FLAGS`` if no JAX backend has started yet; True when
    the flag is in effect for the compilations of this process."""
    from jax._src import xla_bridge  # private: whether a backend has started

    flags = os.environ.get("XLA_FLAGS", "")
    if MEMORY_SCHEDULER_FLAG in flags.split():
        return True
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()
    return True


def xla_memory(spec, batch_size: int, *, dtype="float32", remat="none", attention="dense", block=None,
               window=None, mesh_shape=(1, 1, 1), microbatches: int = 1) -> dict:
    """XLA's memory analysis of the compiled train step, per device: ``{"arguments", "outputs", "aliased",
    "temporaries", "peak", "schedule", "microbatches"}`` (bytes). ``microbatches`` is passed to the step's
    build where it accepts it; otherwise only 1 is possible."""
    if dtype not in DTYPES:
        raise UserError(f"the model does not build compute dtype {dtype} (it has {', '.join(DTYPES)}): --xla "
                        "compiles those only; the estimate without --xla covers it")
    schedule = "memory" if memory_scheduler_flag() else "default"  # before jax.devices() starts the backend
    n = 1
    for s in mesh_shape:
        n *= int(s)
    mesh = make_mesh(tuple(mesh_shape), jax.devices()[:n])
    prog = build(spec, OptConfig(), mesh=mesh, dtype=dtype, remat=remat, attention=attention,
                 attention_block=block, attention_window=window if attention == "local" else None, donate=True,
                 cpu_kernels=False, microbatches=int(microbatches))
    compiled = prog.step.lower(prog.abstract_state, abstract_batch(prog, batch_size)).compile()
    out = compiled_memory(compiled)
    out["schedule"] = schedule
    out["microbatches"] = int(microbatches)
    return out
