"""Per-device memory of a training step, and the plan (mesh, micro-batches, remat) that fits a device.

Pure Python (no JAX): ``medscale memory`` and ``medscale budget`` import it without starting JAX. The formulas
are written out in ``docs/memory.md``; in short, for one device of a mesh ``data x fsdp x tensor`` with ``k``
micro-batches, ``b = B / (data * fsdp * k)`` examples per micro-batch, compute dtype of ``c`` bytes (4, or 2 for
bfloat16/float16), ``t`` the tensor-parallel size:

- **state** (the step's donated arguments, live throughout): float32 parameters, Adam's two float32 moments,
  each weight sharded as the sharding rules say (``medscale.options.SHARDING_RULES``: ``embed`` over fsdp;
  ``mlp``, ``heads``, ``vocab`` over tensor; a dimension the mesh axis does not divide stays whole);
- **gradients**: float32, sharded like the parameters; with ``k > 1`` one more float32 buffer accumulates them;
- **weight copies**: each weight cast to the compute dtype (and gathered over fsdp) for its matmuls, kept from
  the forward pass to the backward pass (none in float32 without fsdp, where the cast is the weight itself);
- **activations**: what autodiff keeps for the backward pass, per layer, as the model code
  (``medscale/model/encdec.py``, ``attention.py``) produces it and XLA keeps it (bytes per element below), for
  the remat policy: ``none`` keeps everything; ``save_dots`` keeps each layer's input and the outputs of its
  weight matmuls and recomputes the rest; ``full`` keeps each layer's input only and recomputes the layer in
  the backward pass, so one layer's activations come back at a time;
- **attention**: ``dense``/``xla`` keep the ``[b, H/t, Lq, Lk]`` scores (float32 scores, the masked scores,
  the softmax's max indicator and exponentials, and the probabilities in the compute dtype); ``blockwise``,
  ``cudnn`` and ``local`` keep q, k, v, the output and the per-row log-sum-exp, and need one block of scores
  as workspace;
- **head and loss**: the float32 logits ``[b, Ldec, V/t]``, the masked logits and their exponentials, and the
  modality mask, at the start of the backward pass;
- **workspace**: a stated allowance for what the backward pass of one layer needs on top (its incoming
  gradients and temporaries) and for allocator fragmentation: ``WORKSPACE_FRACTION`` of the rest.

The peak is the state plus the largest of three phases: the end of the forward pass (activations, head, weight
copies), the backward pass of one rematerialised layer, and the optimizer update (gradients).
"""

from __future__ import annotations

import dataclasses
import math

from medscale import accounting
from medscale.errors import UserError
from medscale.hardware import memory_bytes, peak_flops, precision_for_dtype
from medscale.options import ATTENTION_IMPLEMENTATIONS, MESH_AXES, REMAT_POLICIES, SHARDING_RULES
from medscale.spec import ModelSpec

COMPUTE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_BLOCK = 512  # medscale.model.attention.DEFAULT_BLOCK (blockwise attention's key/query block)
HEADROOM = 0.90  # a plan fits when its estimate is at most this fraction of the device memory
WORKSPACE_FRACTION = 0.05  # allowance on top of the counted buffers (one layer's backward temporaries, fragmentation)
MAX_TENSOR = 8  # tensor parallelism stays within one node's NVLink domain
MAX_MICROBATCHES = 64

# cost model (docs/memory.md): relative step time of a plan, used only to rank plans
ASSUMED_MFU = 0.4  # fraction of the peak the matmuls reach (it scales compute against communication)
LINK_BYTES_PER_S = 100e9  # effective per-device collective bandwidth (NVLink class, e.g. DGX-1 V100)
REMAT_EXTRA = {"none": 0.0, "save_dots": 0.05, "full": None}  # full: one more forward of the layers (FLOPs)
MICROBATCH_PENALTY = 0.03  # per doubling of the micro-batch count: smaller matmuls, a loop, one more pass of grads


# ---------------------------------------------------------------------------------------------- sharding
def _rules() -> dict:
    return {name: target for name, target in SHARDING_RULES}


def _sharded(shape, axes, mesh: dict) -> int:
    """Elements of one device's shard of a ``shape`` weight with logical ``axes`` (as
    ``medscale.model.sharding.logical_to_spec``: an axis not divisible stays whole; a mesh axis is used once)."""
    rules, used, n = _rules(), set(), 1
    for dim, name in zip(shape, axes):
        target = rules.get(name) if name is not None else None
        targets = () if target is None else (target if isinstance(target, tuple) else (target,))
        targets = tuple(a for a in targets if a not in used and mesh.get(a, 1) > 1)
        size = math.prod(mesh[a] for a in targets) if targets else 1
        if targets and dim % size == 0:
            used.update(targets)
            dim //= size
        n *= dim
    return n


def weights(spec: ModelSpec) -> list[tuple[str, tuple, tuple, int]]:
    """Every weight group ``(where, shape, logical axes, how many)``: the model's parameters exactly (the count
    equals ``accounting.param_counts(spec)['total']``; a test checks it)."""
    d, h, k, f, v, m = spec.d_model, spec.num_heads, spec.head_dim, spec.d_ff, spec.vocab_total, spec.num_modalities
    mlp = ([("layer", (d, f), ("embed", "mlp"), 1)] if spec.mlp == "gelu"
           else [("layer", (d, f), ("embed", "mlp"), 2)]) + [("layer", (f, d), ("mlp", "embed"), 1)]
    attn = [("layer", (d, h, k), ("embed", "heads", "kv"), 3), ("layer", (h, k, d), ("heads", "kv", "embed"), 1)]
    norm = ("layer", (d,), ("norm",), 2)
    stacks = len(spec.encoder_stacks)  # one encoder stack, or one per input modality
    enc = [(f"enc_{w}", s, a, c * spec.enc_layers * stacks) for w, s, a, c in attn + mlp + [norm, norm]]
    dec = [(f"dec_{w}", s, a, c * spec.dec_layers) for w, s, a, c in attn + attn + mlp + [norm, norm, norm]]
    return [("token_table", (v, d), ("vocab", "embed"), 1), ("modality_tables", (m, d), ("modality", "embed"), 2),
            ("mask_vector", (d,), ("embed",), 1), *enc, ("final_norms", (d,), ("norm",), 2 * stacks + 2), *dec,
            ("head", (d, v), ("embed", "vocab"), 1)]


def param_elements(spec: ModelSpec, mesh: dict, without_fsdp: bool = False) -> dict:
    """Elements per device: ``{"total", "layers", "embed_head"}`` (``without_fsdp``: as gathered over fsdp)."""
    mesh = dict(mesh, fsdp=1) if without_fsdp else mesh
    out = {"total": 0, "layers": 0, "embed_head": 0}
    for where, shape, axes, count in weights(spec):
        n = count * _sharded(shape, axes, mesh)
        out["total"] += n
        out["layers" if where.startswith(("enc_", "dec_")) else "embed_head"] += n
    return out


# ---------------------------------------------------------------------------------------------- activations
# Bytes per element that the backward pass keeps, by tensor kind; c = compute-dtype bytes. Derived from the
# model code (what autodiff saves) as XLA keeps it: elementwise work that XLA fuses into its consumers is not
# kept, transcendental and reduction results are. docs/memory.md lists the tensors behind each count.
def _per_element(c: int) -> dict:
    return {
        # encoder layer, per [b, E, D] element: LayerNorm centred inputs and outputs, the residual stream (f32
        # 12 bytes); LN outputs as matmul inputs (2c, replicated); q, k, v and the attention output (4c, /t)
        "enc_rep": 12 + 2 * c, "enc_tp": 4 * c,
        # decoder layer, per [b, L, D] element: three LayerNorms (f32 16 bytes + 4c); self q, k, v, out and
        # cross q, out (6c, /t)
        "dec_rep": 16 + 4 * c, "dec_tp": 6 * c,
        # cross-attention keys and values of one decoder layer on the encoder output, and k's transposed copy
        "cross_kv": 3 * c,
        # around the stacks: embeddings, final LayerNorms (per [b, L, D] element, f32)
        "edge": 12,
        # dense scores, per [b, H/t, Lq, Lk] element: scores, masked scores, max indicator, exponentials (f32)
        # and the probabilities (compute dtype)
        "scores": 16 + c,
        # GELU MLP per [b, L, F/t] element: matmul output (c), tanh (f32), activation (c); SwiGLU: + gate (c)
        "mlp_gelu": 4 + 2 * c, "mlp_swiglu": 4 + 3 * c,
        # memory-efficient attention, per [b, L, D/t] element: q, k, v transposed copies and the output (c)
        "flash": 4 * c,
        # head, per [b, Ld, V/t] element: two float32 logits-sized buffers (the logits and their masked
        # exponentials; the masking and the gradient reuse them in place)
        "head": 8,
    }


@dataclasses.dataclass(frozen=True)
class Setting:
    """One training step's shape and options (what the estimate depends on)."""

    spec: ModelSpec
    batch: int
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "dense"
    block: int = DEFAULT_BLOCK
    window: int = 128


def _check(setting: Setting):
    if setting.dtype not in COMPUTE_BYTES:
        raise UserError(f"dtype must be one of {', '.join(COMPUTE_BYTES)}, not {setting.dtype!r}")
    if setting.remat not in REMAT_POLICIES:
        raise UserError(f"remat must be one of {', '.join(REMAT_POLICIES)}, not {setting.remat!r}")
    if setting.attention not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                        f"not {setting.attention!r}")
    if setting.batch <= 0:
        raise UserError(f"batch must be positive, got {setting.batch}")


def _attention_bytes(s: Setting, b: int, heads: int, lq: int, lk: int, impl: str, c: int) -> tuple[float, float]:
    """(kept bytes, transient workspace bytes) of one attention call on ``b`` examples, ``heads`` per device."""
    e = _per_element(c)
    if impl in ("dense", "xla"):
        return e["scores"] * b * heads * lq * lk, 0.0
    kd = s.spec.head_dim
    kept = e["flash"] * b * heads * lq * kd + 4 * b * heads * lq  # + the float32 log-sum-exp per row
    if impl == "cudnn":
        return kept, 0.0
    bq, bk = min(s.block, lq), min(s.block, lk)
    if impl == "local":
        bq = bk = min(bq, s.window)
    # one (query block, key block) pair at a time: scores, probabilities, their gradients (f32); the float32
    # dq, dk, dv accumulators of the backward pass
    return kept, 4 * 4 * b * heads * bq * bk + 3 * 4 * b * heads * max(lq, lk) * kd


def activation_bytes(s: Setting, b: int, tensor: int) -> dict:
    """Per device, for ``b`` examples: ``{"kept", "layer", "workspace", "head"}``: the activations the backward
    pass keeps under the remat policy, one layer's full activations (what a rematerialised layer brings back),
    the attention workspace, and the head's logits buffers."""
    spec, c = s.spec, COMPUTE_BYTES[s.dtype]
    e = _per_element(c)
    d, f, v = spec.d_model, spec.d_ff, spec.vocab_total
    le, ld = spec.enc_len, spec.dec_len
    t_heads = tensor if spec.num_heads % tensor == 0 else 1
    heads = spec.num_heads // t_heads
    f_dev = f // tensor if f % tensor == 0 else f
    v_dev = v // tensor if v % tensor == 0 else v
    mlp = e["mlp_swiglu" if spec.mlp == "swiglu" else "mlp_gelu"]
    enc_impl = s.attention
    dec_impl = "blockwise" if s.attention == "local" else s.attention
    enc_att, enc_ws = _attention_bytes(s, b, heads, le, le, enc_impl, c)
    self_att, self_ws = _attention_bytes(s, b, heads, ld, ld, dec_impl, c)
    cross_att, cross_ws = _attention_bytes(s, b, heads, ld, le, dec_impl, c)
    flash = s.attention not in ("dense", "xla")
    enc_full = (e["enc_rep"] + e["enc_tp"] / t_heads) * b * le * d + enc_att + mlp * b * le * f_dev
    dec_full = ((e["dec_rep"] + e["dec_tp"] / t_heads) * b * ld * d + self_att + cross_att
                + mlp * b * ld * f_dev)
    cross_kv = e["cross_kv"] / t_heads * b * le * d  # per decoder layer, computed outside the layers
    if s.remat == "none":
        enc_kept, dec_kept = enc_full, dec_full
    elif s.remat == "full":  # the layer's input only
        enc_kept, dec_kept = c * b * le * d, c * b * ld * d
    else:  # save_dots: the input and every weight matmul's output (q, k, v, o; MLP up [and gate], down)
        mats = 3 if spec.mlp == "swiglu" else 2
        enc_kept = c * b * le * d * (2 + 4 / t_heads) + c * b * le * f_dev * (mats - 1)
        dec_kept = c * b * ld * d * (2 + 6 / t_heads) + c * b * ld * f_dev * (mats - 1)
        if flash:  # the attention's own residuals (custom_vjp) stay saved
            enc_kept += enc_att
            dec_kept += self_att + cross_att
    kept = (spec.enc_layers * enc_kept + spec.dec_layers * (dec_kept + cross_kv)
            + e["edge"] * b * (le + ld) * d)
    # a rematerialised layer brings back what it did not keep, one layer at a time
    layer = 0.0 if s.remat == "none" else max(enc_full - enc_kept, dec_full - dec_kept)
    return {"kept": kept, "layer": layer, "workspace": max(enc_ws, self_ws, cross_ws),
            "head": e["head"] * b * ld * v_dev}


# ---------------------------------------------------------------------------------------------- the estimate
def _mesh(mesh) -> dict:
    if isinstance(mesh, dict):
        m = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    else:
        m = dict(zip(MESH_AXES, (int(x) for x in mesh)))
    if len(m) != len(MESH_AXES) or any(x <= 0 for x in m.values()):
        raise UserError(f"a mesh has {len(MESH_AXES)} positive sizes {MESH_AXES}, got {mesh}")
    return m


def estimate(setting: Setting, mesh=(1, 1, 1), microbatches: int = 1) -> dict:
    """Per-device bytes of one training step at its peak: ``{"total", "parts": {...}, "phase", ...}``.

    The peak is the state (params, adam = mu + nu, the batch, and with ``microbatches > 1`` the gradient
    accumulator) plus the largest ``phase``: forward_end (activations, the head's logits, weight copies, the
    head's gradient), layer_backward (activations, one attention's workspace, weight copies, gradients) or
    optimizer (gradients). ``parts`` (bytes) are that peak's buffers: params, adam, batch, grads, weight_copies,
    activations, attention_workspace, head, workspace; they sum to ``total``."""
    _check(setting)
    m = _mesh(mesh)
    k = int(microbatches)
    dp = m["data"] * m["fsdp"]
    if k <= 0:
        raise UserError(f"micro-batches must be positive, got {microbatches}")
    if setting.batch % (dp * k):
        raise UserError(f"batch {setting.batch} is not divisible by data x fsdp x micro-batches = {dp} x {k}")
    b = setting.batch // (dp * k)
    c = COMPUTE_BYTES[setting.dtype]
    p = param_elements(setting.spec, m)
    gathered = param_elements(setting.spec, m, without_fsdp=True)
    copy_bytes = c if (c != 4 or m["fsdp"] > 1) else 0
    if copy_bytes and setting.remat == "full":  # cast (and gathered) inside the layer: one layer's at a time
        n_layers = setting.spec.enc_layers + setting.spec.dec_layers
        copies = copy_bytes * (gathered["embed_head"] + 2 * gathered["layers"] / n_layers)
    else:
        copies = copy_bytes * gathered["total"]
    act = activation_bytes(setting, b, m["tensor"])
    grads = 4 * p["total"]
    accumulator = 4 * p["total"] if k > 1 else 0
    head_grad = 4 * p["embed_head"] / 2  # the head's gradient, born at the start of the backward pass
    zero = {"weight_copies": 0.0, "activations": 0.0, "attention_workspace": 0.0, "head": 0.0}
    phases = {  # what is live besides the state in each phase
        # XLA schedules the last layer's recomputation while the head's buffers are still live
        "forward_end": dict(zero, grads=head_grad, weight_copies=copies, activations=act["kept"] + act["layer"],
                            head=act["head"]),
        "layer_backward": dict(zero, grads=grads, weight_copies=copies, activations=act["kept"] + act["layer"],
                               attention_workspace=act["workspace"]),
        "optimizer": dict(zero, grads=grads),
    }
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    parts = {"params": 4.0 * p["total"], "adam": 8.0 * p["total"],
             "batch": 4.0 * 9 * b * k * (setting.spec.enc_len + setting.spec.dec_len)}  # the batch's int32 arrays
    parts.update(phases[phase])
    parts["grads"] += accumulator
    parts["workspace"] = WORKSPACE_FRACTION * sum(parts.values())
    return {"total": sum(parts.values()), "parts": parts, "phase": phase, "micro_batch": b, "mesh": m,
            "microbatches": k}


# ---------------------------------------------------------------------------------------------- cost model
def relative_time(setting: Setting, mesh: dict, microbatches: int, hardware: str) -> float:
    """Seconds of one step under the simple cost model of docs/memory.md (used to rank plans, not to predict):
    hardware FLOPs (remat full: + one forward of the layers; save_dots: + REMAT_EXTRA) at ASSUMED_MFU of the
    dtype's peak, split over the devices, plus communication at LINK_BYTES_PER_S: the gradient reduction over
    data x fsdp (ring, 2 (n-1)/n of the gradient bytes) where it outlasts the backward pass it overlaps, fsdp's
    weight all-gathers (forward, backward, and the remat forward; per micro-batch), tensor parallelism's two
    activation all-reduces per sublayer forward and backward; times (1 + MICROBATCH_PENALTY x log2 k)."""
    spec, m, k = setting.spec, mesh, microbatches
    n = m["data"] * m["fsdp"] * m["tensor"]
    flops = accounting.step_flops(spec, setting.batch, remat=setting.remat, attention=setting.attention,
                                  window=setting.window)["hardware_flops"]
    if REMAT_EXTRA.get(setting.remat):
        flops *= 1 + REMAT_EXTRA[setting.remat]
    peak = peak_flops(hardware, precision_for_dtype(hardware, setting.dtype))
    compute = flops / (n * peak * ASSUMED_MFU)
    c = COMPUTE_BYTES[setting.dtype]
    p_tensor = param_elements(spec, dict(m, data=1, fsdp=1))["total"]  # per device after tensor sharding
    comm = 0.0
    dp = m["data"] * m["fsdp"]
    if dp > 1:
        # gradient reduction (all-reduce = reduce-scatter + all-gather), overlapped with the backward pass
        # (2/3 of the compute): only what is longer than it counts
        reduce = 2 * (dp - 1) / dp * 4 * p_tensor / LINK_BYTES_PER_S
        comm += max(0.0, reduce - 2 / 3 * compute)
        if m["fsdp"] > 1:  # weight all-gathers, per micro-batch: forward, backward (and the remat forward)
            gathers = 3 if setting.remat == "full" else 2
            comm += gathers * k * (m["fsdp"] - 1) / m["fsdp"] * c * p_tensor / LINK_BYTES_PER_S
    if m["tensor"] > 1:  # two all-reduces of [b, L, D] per sublayer (forward and backward), not overlapped
        b = setting.batch // dp
        tokens = b * (spec.enc_layers * 2 * spec.enc_len + spec.dec_layers * 3 * spec.dec_len)
        comm += 2 * 2 * (m["tensor"] - 1) / m["tensor"] * c * spec.d_model * tokens / LINK_BYTES_PER_S
    return (compute + comm) * (1 + MICROBATCH_PENALTY * math.log2(k))


# ---------------------------------------------------------------------------------------------- planner
def meshes(gpus: int, heads: int) -> list[dict]:
    """Every (data, fsdp, tensor) with product ``gpus``, tensor <= MAX_TENSOR and dividing the heads."""
    out = []
    for t in range(1, min(gpus, MAX_TENSOR) + 1):
        if gpus % t or heads % t:
            continue
        rest = gpus // t
        for f in range(1, rest + 1):
            if rest % f == 0:
                out.append({"data": rest // f, "fsdp": f, "tensor": t})
    return out


def plans(setting: Setting, hardware: str, gpus: int, remats=None, microbatches=None,
          headroom: float = HEADROOM) -> list[dict]:
    """Every candidate plan with its estimate, fit and relative speed (1 = the fastest candidate), fastest first.

    ``remats``: the policies to consider (default all); ``microbatches``: the counts (default 1, 2, 4, ... up
    to MAX_MICROBATCHES, as the batch allows)."""
    _check(setting)
    if gpus <= 0:
        raise UserError(f"gpus must be positive, got {gpus}")
    capacity = memory_bytes(hardware)
    remats = tuple(remats or REMAT_POLICIES)
    ks = microbatches or [2 ** i for i in range(int(math.log2(MAX_MICROBATCHES)) + 1)]
    out = []
    for m in meshes(gpus, setting.spec.num_heads):
        dp = m["data"] * m["fsdp"]
        for k in ks:
            if setting.batch % (dp * k):
                continue
            for remat in remats:
                s = dataclasses.replace(setting, remat=remat)
                est = estimate(s, m, k)
                out.append({"mesh": m, "microbatches": k, "remat": remat, "bytes": est["total"],
                            "parts": est["parts"], "phase": est["phase"], "micro_batch": est["micro_batch"],
                            "fits": est["total"] <= headroom * capacity,
                            "time": relative_time(s, m, k, hardware)})
    if not out:
        raise UserError(f"batch {setting.batch} cannot be split over {gpus} devices: no data x fsdp divides it "
                        "(choose a batch divisible by the device count or a divisor of it)")
    fastest = min(p["time"] for p in out)
    for p in out:
        p["speed"] = fastest / p["time"]
    out.sort(key=lambda p: (p["time"], p["bytes"]))
    return out


def choose(candidates: list[dict], hardware: str, headroom: float = HEADROOM) -> dict:
    """The fastest plan that fits, or UserError naming the smallest plan's bytes against the device memory."""
    fitting = [p for p in candidates if p["fits"]]
    if fitting:
        return fitting[0]
    small = min(candidates, key=lambda p: p["bytes"])
    cap = memory_bytes(hardware)
    raise UserError(f"no plan fits: the smallest ({mesh_name(small['mesh'])}, {small['microbatches']} micro-batches, "
                    f"remat {small['remat']}) needs {small['bytes'] / 1e9:.1f} GB per device, over "
                    f"{headroom:.0%} of {hardware}'s {cap / 1e9:.0f} GB; use more devices, a smaller model or "
                    "shorter sequences")


def mesh_name(m: dict) -> str:
    return f"{m['data']}x{m['fsdp']}x{m['tensor']}"


PRECISION_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "tf32": "float32", "fp32": "float32"}


def batch_examples(batch_tokens: float, spec: ModelSpec, gpus: int, granule: int = 64) -> int:
    """Examples per step for ``batch_tokens`` encoder + decoder tokens, rounded to a multiple of ``gpus x
    granule`` (so that data parallelism and micro-batches of powers of two divide it)."""
    per = spec.enc_len + spec.dec_len
    unit = gpus * granule
    return max(unit, round(batch_tokens / per / unit) * unit)


def plan_summary(spec: ModelSpec, hardware: str, gpus: int, precision: str, batch_tokens: float | None = None,
                 batch: int | None = None) -> str:
    """One line naming the plan for ``spec`` (the recommendation of ``medscale budget`` and the report): mesh,
    micro-batches, remat and GB per device, or why no plan fits. ``batch`` examples per step, or
    :func:`batch_examples` of ``batch_tokens``."""
    dtype = PRECISION_DTYPE[precision]
    batch = int(batch) if batch is not None else batch_examples(batch_tokens, spec, gpus)
    setting = Setting(spec, batch, dtype)
    try:
        p = choose(plans(setting, hardware, gpus), hardware)
    except UserError as exc:
        return f"{batch} examples per step in {dtype}: {exc}"
    return (f"mesh {mesh_name(p['mesh'])} (data x fsdp x tensor), {p['microbatches']} micro-batch(es) of "
            f"{p['micro_batch']}, remat {p['remat']}: {p['bytes'] / 1e9:.1f} GB per device "
            f"({batch} examples per step in {dtype}; medscale memory)")
