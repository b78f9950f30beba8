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
import itertools
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


def process_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """The rows of a global batch of ``global_batch`` examples that this process's devices hold under
    ``sharding`` (what ``jax.make_array_from_process_local_data`` expects this process to give); all rows in a
    single-process run. A mesh that gives a process rows that are not contiguous is a UserError."""
    if jax.process_count() == 1:
        return slice(0, global_batch)
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map((global_batch,)).values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start or any(b0 > a1 for (_, b0), (a1, _) in itertools.pairwise(spans)):
        raise UserError(f"process {jax.process_index()} holds rows {spans} of the batch, not one contiguous block; "
                        "order mesh.shape so that each process's devices are neighbours on the data axes")
    return slice(start, stop)


DISTRIBUTED_ENV = ("MEDSCALE_COORDINATOR", "MEDSCALE_NUM_PROCESSES", "MEDSCALE_PROCESS_ID",
                   "MEDSCALE_LOCAL_DEVICE_IDS", "MEDSCALE_HEARTBEAT_S")


def distributed_settings(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, env=None) -> dict | None:
    """The ``jax.distributed.initialize`` arguments of this process, or None for a single-process run.

    Explicit arguments (``medscale train --coordinator HOST:PORT --num-processes N --process-id I``) win over
    the environment: ``MEDSCALE_COORDINATOR`` (or ``JAX_COORDINATOR_ADDRESS``) names the coordinator, the
    process count comes from ``MEDSCALE_NUM_PROCESSES`` / ``JAX_NUM_PROCESSES`` / ``SLURM_NTASKS`` and the id
    from ``MEDSCALE_PROCESS_ID`` / ``JAX_PROCESS_ID`` / ``JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job) /
    ``SLURM_PROCID``. ``MEDSCALE_LOCAL_DEVICE_IDS`` (comma-separated) restricts the process to those local
    devices (one process per GPU); ``MEDSCALE_HEARTBEAT_S`` is how long the others wait for a silent process
    before they stop (JAX's default 100 s). Without a coordinator, a SLURM step of several tasks is left to
    JAX's own SLURM detection. ``MEDSCALE_DISTRIBUTED=0`` turns it all off."""
    env = os.environ if env is None else env
    if env.get("MEDSCALE_DISTRIBUTED", "") == "0":
        return None

    def first(*names):
        return next((env[n] for n in names if env.get(n, "") != ""), None)

    coordinator = coordinator or first("MEDSCALE_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise UserError("--num-processes / --process-id need --coordinator HOST:PORT (the address of process 0)")
        if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
            return {}  # jax's SLURM cluster detection fills in the rest
        return None
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"coordinator {coordinator!r} is not HOST:PORT (a port in 1..65535)")
    raw_n = num_processes if num_processes is not None else first("MEDSCALE_NUM_PROCESSES", "JAX_NUM_PROCESSES",
                                                                  "SLURM_NTASKS")
    raw_id = process_id if process_id is not None else first("MEDSCALE_PROCESS_ID", "JAX_PROCESS_ID",
                                                             "JOB_COMPLETION_INDEX", "SLURM_PROCID")
    try:
        n = int(raw_n) if raw_n is not None else None
        pid = int(raw_id) if raw_id is not None else None
    except ValueError:
        raise UserError(f"process count {raw_n!r} and id {raw_id!r} must be integers") from None
    if n is None or pid is None:
        raise UserError(f"coordinator {coordinator} is set but the process count or id is not "
                        "(--num-processes / --process-id, or MEDSCALE_NUM_PROCESSES / MEDSCALE_PROCESS_ID)")
    if n < 1 or not 0 <= pid < n:
        raise UserError(f"process id {pid} is not in 0..{n - 1} (process count {n})")
    out = {"coordinator_address": coordinator, "num_processes": n, "process_id": pid}
    ids = env.get("MEDSCALE_LOCAL_DEVICE_IDS", "").strip()
    if ids:
        try:
            out["local_device_ids"] = [int(i) for i in ids.split(",")]
        except ValueError:
            raise UserError(f"MEDSCALE_LOCAL_DEVICE_IDS={ids!r}: give comma-separated device numbers") from None
    beat = env.get("MEDSCALE_HEARTBEAT_S", "").strip()
    if beat:
        if not beat.isdigit() or int(beat) < 1:
            raise UserError(f"MEDSCALE_HEARTBEAT_S={beat!r}: give a whole number of seconds >= 1")
        out["heartbeat_timeout_seconds"] = int(beat)
    return out


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` (once per process) when :func:`distributed_settings` says this
    process is one of several; True when it did (now or earlier). A one-process "group" is not started."""
    if getattr(maybe_initialize_distributed, "_done", False):
        return True
    kwargs = distributed_settings(coordinator, num_processes, process_id)
    if kwargs is None or kwargs.get("num_processes") == 1:
        return False
    log.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    maybe_initialize_distributed._done = True
    return True
