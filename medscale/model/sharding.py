"""Logical axis names -> mesh axes; the mesh; multi-host start-up.

Weights carry logical axis names in their ``axes`` metadata (``nnx.Param(value, axes=("embed", "mlp"))``) and
activations are constrained with :func:`constrain`; the rules table (``cfg.mesh.rules``: pairs of logical
name -> mesh axis, tuple of mesh axes, or None) maps them to the mesh. Changing the parallelism is a config
change, never a model edit. A logical axis whose dimension the mapped mesh axes do not divide is replicated,
and a mesh axis is never used twice in one spec.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medscale.errors import UserError
from medscale.options import MESH_AXES

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")

_CTX: contextvars.ContextVar = contextvars.ContextVar("medscale_sharding", default=None)


def rules_dict(rules) -> dict:
    if isinstance(rules, dict):
        return dict(rules)
    out = {}
    for item in rules or ():
        name, target = item
        if isinstance(target, list):
            target = tuple(target)
        out[str(name)] = target
    return out


def logical_to_spec(names, rules, mesh: Mesh | None = None, shape=None) -> P:
    """PartitionSpec for a tuple of logical axis names under ``rules`` (dict or pairs)."""
    rules = rules if isinstance(rules, dict) else rules_dict(rules)
    used: set = set()
    out = []
    for i, name in enumerate(names):
        target = rules.get(name) if name is not None else None
        axes = () if target is None else (target if isinstance(target, tuple) else (target,))
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        if mesh is not None and shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


@contextlib.contextmanager
def sharding_context(mesh: Mesh | None, rules):
    """Activate activation constraints for code traced inside (mesh None: constraints are no-ops)."""
    token = _CTX.set((mesh, rules_dict(rules)) if mesh is not None else None)
    try:
        yield
    finally:
        _CTX.reset(token)


def active_mesh_size() -> int:
    """Devices of the mesh that code traced here is partitioned over (1 when none is active)."""
    ctx = _CTX.get()
    if ctx is not None:
        return ctx[0].size
    abstract = jax.sharding.get_abstract_mesh()
    return 1 if abstract.empty else abstract.size


def constrain(x, names):
    """``with_sharding_constraint`` by logical names, when a sharding context with a real mesh is active."""
    ctx = _CTX.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape)))


def resolve_mesh_shape(shape, n_devices: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    fills = [i for i, s in enumerate(shape) if s == -1]
    if len(fills) > 1:
        raise UserError(f"mesh.shape {shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh.shape {shape}: sizes must be positive (or one -1)")
    known = math.prod(s for s in shape if s != -1)
    if fills:
        if n_devices % known:
            raise UserError(f"mesh.shape {shape} does not divide the {n_devices} devices; "
                            "change mesh.shape")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise UserError(f"mesh.shape {shape} needs {math.prod(shape)} devices but there are {n_devices}; "
                        "change mesh.shape")
    return shape


def make_mesh(shape, devices=None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh with Auto axis types (one axis may be -1)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: leading axis over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process job.

    Recognised: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), a SLURM job step with more
    than one task (SLURM_NTASKS > 1), a Kubernetes indexed Job (JOB_COMPLETION_INDEX with
    MEDSCALE_NUM_PROCESSES and MEDSCALE_COORDINATOR). ``MEDSCALE_DISTRIBUTED=0`` disables it.
    """
    env = os.environ
    if env.get("MEDSCALE_DISTRIBUTED", "") == "0" or getattr(maybe_initialize_distributed, "_done", False):
        return False
    kwargs = None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {}
        if env.get("JAX_NUM_PROCESSES"):
            kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                          "num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env.get("JAX_PROCESS_ID", 0))}
    elif int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        kwargs = {}  # jax's SLURM cluster detection fills in the rest
    elif env.get("JOB_COMPLETION_INDEX") and env.get("MEDSCALE_COORDINATOR"):
        kwargs = {"coordinator_address": env["MEDSCALE_COORDINATOR"],
                      "num_processes": int(env.get("MEDSCALE_NUM_PROCESSES", "1")),
                      "process_id": int(env["JOB_COMPLETION_INDEX"])}
    if kwargs is None:
        return False
    log.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    maybe_initialize_distributed._done = True
    return True
