"""The compiled pieces of training: sharded init, the train step, the eval step, and XLA's FLOP count.

Split/merge pattern: the NNX model is split once into a static ``graphdef`` and a pure parameter dict; the
train state is a plain pytree ``{"params", "opt", "step", "rng", "schedule"}`` (the learning-rate schedule's
numbers ride in the state, so a compiled step does not depend on the run's length) and the step is a plain ``jax.jit`` with
explicit in/out shardings (params sharded by their logical axis names and ``cfg.mesh.rules``; batches over
('data', 'fsdp')). Parameters are created by a jit-ed init whose ``out_shardings`` are the target
shardings, so they are born sharded and never gathered on one device.

The model's compute hooks (:class:`medscale.model.ops.Ops`) are chosen here, once per build
(:func:`choose_ops`): the native CPU kernels where they apply, the plain JAX path everywhere else.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medscale import kernels
from medscale.data.batch import BATCH_SPEC
from medscale.kernels.cpu import CpuOps
from medscale.kernels.malloc import tune_malloc
from medscale.model.encdec import EncoderDecoder
from medscale.model.ops import PLAIN, Ops
from medscale.model.sharding import batch_sharding, logical_to_spec, make_mesh, rules_dict, sharding_context
from medscale.options import SHARDING_RULES
from medscale.spec import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_RULES = SHARDING_RULES


@dataclasses.dataclass(frozen=True)
class OptConfig:
    lr: float = 3e-3
    warmup_steps: int = 50
    total_steps: int = 1000
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class LossScale:
    """Dynamic loss scaling of a float16 step (:func:`build`): the loss is multiplied by ``scale`` before
    differentiation and the gradient divided by it after; a step whose gradient has a non-finite value is
    skipped (parameters and optimizer state unchanged) and the scale divided by ``factor``; after ``period``
    consecutive finite steps the scale is multiplied by ``factor``."""

    init: float = 2.0**15
    factor: float = 2.0
    period: int = 2000


def init_loss_scale(ls: LossScale) -> dict:
    """The scale state a float16 train state carries (``state["loss_scale"]``): the current scale, finite steps
    since the last change, skipped steps so far."""
    return {"scale": jnp.asarray(ls.init, jnp.float32), "good_steps": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32)}


def adjust_loss_scale(ls: LossScale, state: dict, finite) -> dict:
    """The scale state after a step whose gradient was ``finite`` (a boolean scalar): halve (by ``factor``) and
    count a skipped step when not finite; grow after ``period`` consecutive finite steps (unless the grown
    scale would not be a finite float32)."""
    good = jnp.where(finite, state["good_steps"] + 1, 0)
    grown = state["scale"] * ls.factor
    grow = finite & (good >= ls.period) & jnp.isfinite(grown)
    scale = jnp.where(finite, jnp.where(grow, grown, state["scale"]), state["scale"] / ls.factor)
    return {"scale": scale, "good_steps": jnp.where(grow, 0, good).astype(jnp.int32),
            "skipped": state["skipped"] + jnp.where(finite, 0, 1).astype(jnp.int32)}


def all_finite(tree):
    """True when every element of every leaf is finite (a boolean scalar)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


SCHEDULE_KEYS = ("lr", "warmup", "total", "end")


def schedule_hyperparams(oc: OptConfig) -> dict:
    """The learning-rate schedule's numbers as float32 scalars: the train state carries them
    (``state["schedule"]``), so one compiled step serves runs of every length and peak rate."""
    warm = max(0, min(oc.warmup_steps, oc.total_steps - 1))
    values = {"lr": oc.lr, "warmup": warm, "total": max(oc.total_steps, warm + 1), "end": oc.lr * oc.final_lr_ratio}
    return {k: np.asarray(values[k], np.float32) for k in SCHEDULE_KEYS}


def lr_at(count, hp: dict):
    """Linear warmup from 0 to ``hp["lr"]`` over ``hp["warmup"]`` updates, then cosine decay to ``hp["end"]`` at
    update ``hp["total"]`` (held after it): optax's ``warmup_cosine_decay_schedule`` with traced numbers."""
    count = jnp.asarray(count, jnp.float32)
    warm, total, peak, end = hp["warmup"], hp["total"], hp["lr"], hp["end"]
    rising = peak * count / jnp.maximum(warm, 1.0)
    progress = jnp.clip((count - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
    decaying = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warm, rising, decaying)


def lr_schedule(oc: OptConfig):
    """``count -> learning rate`` of ``oc`` (:func:`lr_at` with its numbers)."""
    hp = schedule_hyperparams(oc)
    return lambda count: lr_at(count, hp)


def make_optimizer(oc: OptConfig):
    """AdamW without its learning rate: the step multiplies the update by ``-lr_at(count, state["schedule"])``
    (decoupled weight decay scaled by the rate, as ``optax.adamw``)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(oc.clip_norm) if oc.clip_norm and oc.clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=oc.b1, b2=oc.b2),
        optax.add_decayed_weights(oc.weight_decay, mask=decay_mask),
    )
    return tx, lr_schedule(oc)


def _apply(params, updates, lr):
    return jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)


def abstract_model(spec: ModelSpec, dtype="float32", remat="none", attention="dense", **model_kw):
    """The model built under ``nnx.eval_shape``: shapes and metadata, no memory (``model_kw``: the
    attention options and ``ops``)."""
    return nnx.eval_shape(lambda: EncoderDecoder(spec, rngs=nnx.Rngs(0), dtype=dtype, remat=remat,
                                                 attention=attention, **model_kw))


def param_axes(abstract) -> Any:
    """Pure dict (same structure as the params) of each weight's logical axis names."""
    _, state = nnx.split(abstract)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def init_params(spec: ModelSpec, seed: int = 0, **model_kw):
    """(graphdef, params pure dict) with the parameters created by one jit-ed call (fast, unsharded)."""
    graphdef, _ = nnx.split(abstract_model(spec, **model_kw))

    @jax.jit
    def make(key):
        return nnx.to_pure_dict(nnx.split(EncoderDecoder(spec, rngs=nnx.Rngs(params=key), **model_kw))[1])

    return graphdef, make(jax.random.key(seed))


def count_params(spec: ModelSpec) -> int:
    """Exact parameter count of the model a spec builds (via eval_shape)."""
    _, state = nnx.split(abstract_model(spec))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(state))))


def batch_shapes(spec: ModelSpec, batch_size: int) -> dict:
    return {k: jax.ShapeDtypeStruct((batch_size, spec.enc_len if side == "enc" else spec.dec_len), dt)
            for k, (dt, side) in BATCH_SPEC.items()}


@dataclasses.dataclass
class Program:
    """Everything compiled for one (spec, options, mesh): call ``init(seed)``, ``step(state, batch)``,
    ``eval(params, batch)``; shardings to place host batches and restore checkpoints."""

    spec: ModelSpec
    mesh: Mesh
    graphdef: Any
    tx: Any
    schedule: Callable
    state_shardings: Any
    abstract_state: Any
    batch_sharding: NamedSharding
    init: Callable
    step: Callable
    eval: Callable
    microbatches: int = 1
    loss_scale: LossScale | None = None  # the dynamic loss scaling of a float16 step; None: no scaling
    grad: Callable | None = None  # (params, batch) -> (loss, aux, gradient): the step's, before the update

    def put_batch(self, batch: dict) -> dict:
        """Host batch (numpy, this process's rows) -> global device arrays sharded over the batch axes."""
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch_sharding)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)


def choose_ops(dtype: str, mesh: Mesh, cpu_kernels: bool = True) -> Ops:
    """The model's compute hooks for a step: :class:`medscale.kernels.cpu.CpuOps` when the JAX backend is
    the CPU, ``dtype`` float32, the mesh one device, ``cpu_kernels`` and ``MEDSCALE_CPU_KERNELS`` (default 1)
    not 0, and at least one native kernel builds (each kernel is used where it built; ``MEDSCALE_CPU_MATMUL=0``
    leaves out the matmul); the plain path (:data:`medscale.model.ops.PLAIN`) otherwise. Choosing the CPU
    implementation also tunes the allocator for XLA:CPU (``medscale/kernels/malloc.py``). Logs one line:
    which kernels are active, and why a kernel is not."""
    why = None
    if not cpu_kernels:
        why = "not asked for"
    elif os.environ.get("MEDSCALE_CPU_KERNELS", "1") == "0":
        why = "MEDSCALE_CPU_KERNELS=0"
    elif jax.default_backend() != "cpu":
        why = f"the backend is {jax.default_backend()}"
    elif dtype != "float32":
        why = f"the dtype is {dtype}"
    elif mesh.size != 1:
        why = f"the mesh has {mesh.size} devices"
    if why is not None:
        log.info("model ops: plain (CPU kernels off: %s)", why)
        return PLAIN
    attention_ok, matmul_ok = kernels.attention_targets() is not None, kernels.matmul_target() is not None
    missing = "; ".join(f"{name} kernel unavailable: {kernels.unavailable_reason(name)}"
                        for name, ok in (("attention", attention_ok), ("matmul", matmul_ok)) if not ok)
    if not (attention_ok or matmul_ok):
        log.info("model ops: plain (%s)", missing)
        return PLAIN
    tune_malloc()
    active = ", ".join(n for n, ok in (("attention", attention_ok), ("matmul", matmul_ok)) if ok)
    log.info("model ops: cpu (native kernels: %s)%s", active, f"; {missing}" if missing else "")
    return CpuOps(attention_kernel=attention_ok, matmul_kernel=matmul_ok)


def build(spec: ModelSpec, opt: OptConfig, *, mesh: Mesh | None = None, rules=DEFAULT_RULES,
          dtype="float32", remat="none", attention="dense", attention_block=None, attention_window=None,
          donate: bool = True, cpu_kernels: bool = True, microbatches: int = 1,
          loss_scale: LossScale | None = None) -> Program:
    """Compile-ready init, train step and eval step. ``cpu_kernels=False``: the plain ops even where the CPU
    kernels apply (:func:`choose_ops`).

    ``microbatches``: the step splits each batch into that many micro-batches (row ``j * microbatches + i`` is
    row ``j`` of micro-batch ``i``, so every micro-batch is spread over the data axes like the batch), sums
    their gradients in a ``lax.scan`` (one micro-batch's activations live at a time) and applies one update;
    each micro-batch's NLL sum is divided by the whole batch's target count, so the loss and gradient are the
    full batch's token-weighted mean up to float rounding. The batch size must divide by ``microbatches`` x
    the data-parallel size.

    ``dtype="float16"`` turns on dynamic loss scaling (``loss_scale``, default :class:`LossScale`): the state
    gains ``"loss_scale"`` (:func:`init_loss_scale`), applied to the accumulated gradient; a skipped step still
    advances ``state["step"]`` (and the data), not the optimizer's count, so the learning-rate schedule is a
    function of the updates applied and the metric ``lr`` is the rate of the step's update. Other dtypes: no
    scaling, the step as without it."""
    if microbatches < 1:
        raise ValueError(f"microbatches must be positive, not {microbatches}")
    scaling = (loss_scale or LossScale()) if dtype == "float16" else None
    mesh = mesh if mesh is not None else make_mesh((1, 1, 1), jax.devices()[:1])
    rules = rules_dict(rules)
    model_kw = {"attention_block": attention_block, "attention_window": attention_window,
                "ops": choose_ops(dtype, mesh, cpu_kernels)}
    abstract = abstract_model(spec, dtype, remat, attention, **model_kw)
    graphdef, abs_state = nnx.split(abstract)
    abs_params = nnx.to_pure_dict(abs_state)
    axes = param_axes(abstract)
    param_sh = jax.tree.map(lambda a, x: NamedSharding(mesh, logical_to_spec(a, rules, mesh, x.shape)),
                            axes, abs_params, is_leaf=lambda a: isinstance(a, tuple))
    tx, schedule = make_optimizer(opt)
    replicated = NamedSharding(mesh, P())
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    state_sh = {"params": param_sh, "opt": opt_sh, "step": replicated, "rng": replicated,
                "schedule": {k: replicated for k in SCHEDULE_KEYS}}
    if scaling is not None:
        state_sh["loss_scale"] = {"scale": replicated, "good_steps": replicated, "skipped": replicated}

    def _init(seed, hp):
        key = jax.random.key(seed)
        pkey, rkey = jax.random.split(key)
        model = EncoderDecoder(spec, rngs=nnx.Rngs(params=pkey), dtype=dtype, remat=remat, attention=attention,
                               **model_kw)
        params = nnx.to_pure_dict(nnx.split(model)[1])
        state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.key_data(rkey),
                 "schedule": {k: jnp.asarray(hp[k], jnp.float32) for k in SCHEDULE_KEYS}}
        if scaling is not None:
            state["loss_scale"] = init_loss_scale(scaling)
        return state

    default_hp = schedule_hyperparams(opt)
    abstract_state = jax.eval_shape(_init, 0, default_hp)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_state, state_sh)
    # the seed and the schedule's numbers are traced: one compilation serves every seed and run length
    init_jit = jax.jit(_init, out_shardings=state_sh)

    def init(seed, hp: dict | None = None):
        """The initial train state for ``seed``, with the schedule ``hp`` (:func:`schedule_hyperparams`; default:
        the ``opt`` this program was built with)."""
        return init_jit(seed, default_hp if hp is None else hp)

    bsh = batch_sharding(mesh)

    def _loss(params, batch, normalizer=None):
        with sharding_context(mesh, rules):
            model = nnx.merge(graphdef, params)
            return model.loss(batch, normalizer)

    def _objective(params, batch, normalizer, scale):
        loss, aux = _loss(params, batch, normalizer)
        return loss * scale, (loss, aux)

    micro_sh = NamedSharding(mesh, P(None, *bsh.spec))

    def _split(x):
        """[B, ...] -> [microbatches, B / microbatches, ...]: micro-batch i holds rows i, i + mb, ..."""
        x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sh)

    def _grads(params, batch, scale):
        """(loss, aux, gradient of ``scale * loss``), the gradient summed over the micro-batches."""
        if microbatches == 1:
            (_, (loss, aux)), grads = jax.value_and_grad(_objective, has_aux=True)(params, batch, None, scale)
            return loss, aux, grads
        total = jnp.maximum(jnp.sum(batch["dec_valid"].astype(jnp.float32)), 1.0)

        def body(carry, micro):
            (_, (loss, aux)), grads = jax.value_and_grad(_objective, has_aux=True)(params, micro, total, scale)
            acc, loss_acc, sum_acc, count_acc = carry
            return (jax.tree.map(jnp.add, acc, grads), loss_acc + loss, sum_acc + aux["sum"],
                    count_acc + aux["count"]), None

        m = spec.num_modalities
        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), param_sh)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((m,), jnp.float32), jnp.zeros((m,), jnp.float32))
        (grads, loss, sums, counts), _ = jax.lax.scan(body, init, jax.tree.map(_split, batch))
        return loss, {"sum": sums, "count": counts}, grads

    def _next_rng(state):
        return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 1))

    def _step(state, batch):
        if microbatches == 1:
            (loss, aux), grads = jax.value_and_grad(_loss, has_aux=True)(state["params"], batch)
        else:
            loss, aux, grads = _grads(state["params"], batch, jnp.ones((), jnp.float32))
        updates, new_opt = tx.update(grads, state["opt"], state["params"])
        lr = lr_at(state["step"], state["schedule"])
        params = _apply(state["params"], updates, lr)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr, "sum": aux["sum"],
                   "count": aux["count"]}
        return {"params": params, "opt": new_opt, "step": state["step"] + 1, "rng": _next_rng(state),
                "schedule": state["schedule"]}, metrics

    def _scaled_step(state, batch):
        ls = state["loss_scale"]
        loss, aux, grads = _grads(state["params"], batch, ls["scale"])
        grads = jax.tree.map(lambda g: g / ls["scale"], grads)  # a power of two: exact
        finite = all_finite(grads)
        updates, new_opt = tx.update(grads, state["opt"], state["params"])
        lr = lr_at(state["step"] - ls["skipped"], state["schedule"])  # the optimizer counts applied updates only
        new_params = _apply(state["params"], updates, lr)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_ls = adjust_loss_scale(scaling, ls, finite)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": lr,
                   "sum": aux["sum"], "count": aux["count"], "loss_scale": new_ls["scale"],
                   "skipped_steps": new_ls["skipped"]}
        return {"params": keep(new_params, state["params"]), "opt": keep(new_opt, state["opt"]),
                "step": state["step"] + 1, "rng": _next_rng(state), "loss_scale": new_ls,
                "schedule": state["schedule"]}, metrics

    step = jax.jit(_step if scaling is None else _scaled_step, in_shardings=(state_sh, bsh),
                   out_shardings=(state_sh, replicated),
                   donate_argnums=(0,) if donate else ())

    def _grad(params, batch):
        scale = jnp.asarray(scaling.init if scaling is not None else 1.0, jnp.float32)
        loss, aux, grads = _grads(params, batch, scale)
        return loss, aux, jax.tree.map(lambda g: g / scale, grads)

    grad = jax.jit(_grad, in_shardings=(param_sh, bsh), out_shardings=(replicated, replicated, param_sh))

    def _eval(params, batch):
        loss, aux = _loss(params, batch)
        return {"loss": loss, "sum": aux["sum"], "count": aux["count"]}

    evaluate = jax.jit(_eval, in_shardings=(param_sh, bsh), out_shardings=replicated)
    return Program(spec=spec, mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule, state_shardings=state_sh,
                   abstract_state=abstract_state, batch_sharding=bsh, init=init, step=step, eval=evaluate,
                   microbatches=microbatches, loss_scale=scaling, grad=grad)


def abstract_batch(prog: Program, batch_size: int) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=prog.batch_sharding)
            for k, v in batch_shapes(prog.spec, batch_size).items()}


def xla_step_flops(spec: ModelSpec, batch_size: int, *, dtype="float32", remat="none", attention="dense",
                   window=None, block=None, mesh_shape=(1, 1, 1)) -> float:
    """XLA's ``cost_analysis()['flops']`` of the compiled train step, summed over the mesh's devices.

    Compiles ahead of time from abstract shapes (no parameters are allocated). The count includes the
    optimiser update and elementwise work (softmax, GELU, LayerNorm), which the analytic hardware FLOPs omit.
    """
    n = int(np.prod([s for s in mesh_shape if s != -1])) if -1 not in tuple(mesh_shape) else len(jax.devices())
    mesh = make_mesh(mesh_shape, jax.devices()[:n])
    # the plain ops: XLA cannot count FLOPs inside the CPU kernels' custom calls
    prog = build(spec, OptConfig(), mesh=mesh, dtype=dtype, remat=remat, attention=attention,
                 attention_block=block, attention_window=window if attention == "local" else None, donate=False,
                 cpu_kernels=False)
    compiled = prog.step.lower(prog.abstract_state, abstract_batch(prog, batch_size)).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"]) * mesh.size


