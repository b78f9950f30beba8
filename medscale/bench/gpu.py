"""The GPU acceptance run (``medscale bench gpu``): what a person with GPUs (a DGX-1, a cloud node) runs first.

Four checks, each a real computation on the devices present, each reported with its figures:

1. ``sharding``: three train steps of a small model on one device and on every mesh the devices allow
   (data-parallel ``n x 1 x 1``, and ``data x fsdp x tensor`` with fsdp and tensor 2 when ``n`` allows): the
   losses agree to float32 rounding (matmuls at ``highest`` precision, so TF32 does not enter); and the same in
   float16 with loss scaling and 2 micro-batches, to float16 rounding.
2. ``attention``: ``dense``, ``blockwise`` and ``cudnn`` attention in bfloat16 and float16, outputs and
   gradients against a float32 dense reference on a 4M decoder mask with padding; the error, relative to the
   reference's largest magnitude, is within ``ATTENTION_FACTOR`` x the dtype's epsilon. ``cudnn`` needs an
   NVIDIA GPU; elsewhere it is reported as skipped.
3. ``float16``: ``steps`` training steps of the tiny config in float16 with dynamic loss scaling
   (``medscale.train.loop.train``): the run ends ``done``, the loss falls, the scale stays >= 1.
4. ``mfu``: ``medscale bench step`` on the largest ladder size whose compiled step fits one device (XLA's own
   memory analysis against the device's memory), in bfloat16, or float16 on devices without bf16 tensor cores
   (Volta).

``run(...)`` returns one dict (the command prints it as one JSON line). A check that fails is reported with its
error and ``ok: false``; the run goes on. Checks that would start after ``budget_s`` seconds are skipped (the
whole run, compilation included, is meant to finish in under 8 minutes on one 8-GPU node).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from medscale import accounting, hardware, memory, rundir
from medscale.bench.step import DoesNotFit, bench_step
from medscale.configs import load_config
from medscale.errors import UserError
from medscale.model.attention import attend
from medscale.model.sharding import make_mesh
from medscale.spec import ModelSpec, default_modalities
from medscale.sweep.registry import read_metrics
from medscale.train.batches import random_batch
from medscale.train.loop import train
from medscale.train.step import OptConfig, build

ATTENTION_FACTOR = 16  # error bound: FACTOR x eps(dtype) x max |reference|
SHARDING_RTOL = 1e-5  # float32 losses after 3 steps, relative
BUDGET_S = 480.0
FP16_STEPS = 200


def devices_for(platform: str) -> list:
    """The devices of ``platform`` (``gpu`` or ``cpu``); no GPU -> UserError ``no GPU``."""
    if platform not in ("gpu", "cpu"):
        raise UserError(f"--platform must be gpu or cpu, not {platform!r}")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        devices = []
    if not devices:
        raise UserError("no GPU: JAX sees only " + ", ".join(sorted({d.platform for d in jax.devices()})) +
                        " devices (install jax[cuda12] on a machine with NVIDIA GPUs, or pass --platform cpu to "
                        "rehearse the checks on the CPU)")
    return devices


def half_dtype(device) -> str:
    """The 16-bit dtype the device's tensor cores run: float16 on Volta (no bf16), else bfloat16."""
    cc = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and (("v100" in device.device_kind.lower())
                                     or (cc is not None and float(cc) < 8.0)):
        return "float16"
    return "bfloat16"


def _small_spec() -> ModelSpec:
    mods = default_modalities(text_vocab=64, image_vocab=32, seg_vocab=16, grid=(4, 4), caption_tokens=12,
                              box_tokens=8)
    return ModelSpec(d_model=32, enc_layers=1, dec_layers=1, num_heads=2, d_ff=64, modalities=mods, enc_len=24,
                     dec_len=16, name="sharding-check")


def mesh_shapes(n: int, heads: int) -> list[tuple[int, int, int]]:
    """The meshes the sharding check compares with one device: data-parallel, and a 3-D mesh when n allows."""
    shapes = [(n, 1, 1)] if n > 1 else []
    t = 2 if n % 2 == 0 and heads % 2 == 0 else 1
    f = 2 if (n // t) % 2 == 0 else 1
    if t * f > 1 and (n // (t * f), f, t) not in shapes:
        shapes.append((n // (t * f), f, t))
    return shapes


def _train_losses(spec, batches, shape, devices, **build_kw):
    prog = build(spec, OptConfig(lr=1e-2, warmup_steps=1, total_steps=len(batches)),
                 mesh=make_mesh(shape, devices[:int(np.prod(shape))]), cpu_kernels=False, **build_kw)
    state = prog.init(0)
    up = state["params"]["encoder"][0]["mlp"]["up"]  # read before the step donates it
    row = {"up_spec": str(up.sharding.spec), "up_shard_shape": list(up.addressable_shards[0].data.shape)}
    losses = []
    for b in batches:
        state, m = prog.step(state, prog.put_batch(b))
        losses.append(float(m["loss"]))
    row.update(losses=losses, head_sum=float(np.asarray(jax.device_get(state["params"]["head"])).sum()))
    if "skipped_steps" in m:
        row["skipped_steps"] = int(m["skipped_steps"])
    return row


def _max_rel(ref, rows):
    return max((abs(a - b) / abs(a) for r in rows for a, b in zip(ref, r["losses"])), default=0.0)


def check_sharding(devices, steps: int = 3) -> dict:
    """Losses of ``steps`` train steps on one device and on each mesh of :func:`mesh_shapes`, in float32 (``ok``
    when every loss agrees with the one-device loss within ``SHARDING_RTOL``), and in float16 with loss scaling
    and 2 micro-batches on one device and on the last mesh (bound ``8 sqrt(n) eps16``, n the decoder tokens
    summed over 3 stages; no step skipped). Also reports how the MLP's first weight is split on each mesh
    (shard shape), so a mesh that silently replicates shows."""
    spec = _small_spec()
    n = len(devices)
    batch_size = 8 * max(1, -(-n // 8))
    batches = [random_batch(spec, batch_size, seed) for seed in range(steps)]
    meshes = [(1, 1, 1)] + mesh_shapes(n, spec.num_heads)
    out = {"devices": n, "meshes": {}, "float16": {}}
    with jax.default_matmul_precision("highest"):
        for shape in meshes:
            out["meshes"]["x".join(map(str, shape))] = _train_losses(spec, batches, shape, devices)
        for shape in (meshes[0], meshes[-1]) if len(meshes) > 1 else meshes:
            out["float16"]["x".join(map(str, shape))] = _train_losses(spec, batches, shape, devices,
                                                                      dtype="float16", microbatches=2)
    ref = out["meshes"]["1x1x1"]["losses"]
    worst = _max_rel(ref, out["meshes"].values())
    ref16 = out["float16"]["1x1x1"]["losses"]
    worst16 = _max_rel(ref16, out["float16"].values())
    rtol16 = 8 * (batch_size * spec.dec_len * 3) ** 0.5 * float(jnp.finfo(jnp.float16).eps)
    skipped = sum(r.get("skipped_steps", 0) for r in out["float16"].values())
    out.update(max_rel_loss_diff=worst, rtol=SHARDING_RTOL, trains=ref[-1] < ref[0],
               float16_max_rel_loss_diff=worst16, float16_rtol=rtol16, float16_skipped_steps=skipped,
               ok=bool(worst <= SHARDING_RTOL and ref[-1] < ref[0] and worst16 <= rtol16 and skipped == 0))
    return out


def _attention_inputs(dtype, seed=0, b=2, length=128, heads=4, dh=64):
    """q, k, v, cotangent in ``dtype`` and a 4M decoder mask: an image-like bidirectional segment, two causal
    sequence segments, padding."""
    rng = np.random.default_rng(seed)
    q, k, v, g = (jnp.asarray(rng.standard_normal((b, length, heads, dh)), dtype) for _ in range(4))
    seg = np.full((b, length), -1, np.int32)
    causal = np.zeros((b, length), bool)
    a, b_, c, d, e = (length * x // 128 for x in (48, 96, 120, 30, 100))
    seg[0, :a], seg[0, a:b_], seg[0, b_:c] = 0, 1, 3
    causal[0, a:c] = True
    seg[1, :d], seg[1, d:e] = 2, 1
    causal[1, d:e] = True
    return q, k, v, g, jnp.asarray(seg), jnp.asarray(causal)


def _attention_value_and_grads(impl, q, k, v, g, seg, causal):
    def f(q, k, v):
        out = attend(q, k, v, q_segment=seg, kv_segment=seg, q_causal=causal, same_segment=True,
                     implementation=impl, block=32)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def check_attention(platform: str, length: int = 128) -> dict:
    """Every implementation in bfloat16 and float16 against the float32 dense reference of the same (rounded)
    inputs; error = max |x - ref| / max |ref| over output and the three gradients. ``length``: query and key
    length (at least 128)."""
    results = {}
    ok = True
    for dtype in ("bfloat16", "float16"):
        q, k, v, g, seg, causal = _attention_inputs(dtype, length=length)
        with jax.default_matmul_precision("highest"):
            ref = _attention_value_and_grads("dense", *(x.astype(jnp.float32) for x in (q, k, v, g)), seg, causal)
        bound = ATTENTION_FACTOR * float(jnp.finfo(dtype).eps)
        for impl in ("dense", "blockwise", "cudnn"):
            key = f"{impl}/{dtype}"
            if impl == "cudnn" and platform != "gpu":
                results[key] = {"skipped": "cudnn needs an NVIDIA GPU"}
                continue
            try:
                got = _attention_value_and_grads(impl, q, k, v, g, seg, causal)
            except Exception as exc:  # noqa: BLE001 - a failing implementation is a finding, not a crash
                results[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
                ok = False
                continue
            errs = [float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30)) for a, r in zip(got, ref)]
            this_ok = bool(all(np.isfinite(errs)) and max(errs) <= bound)
            results[key] = {"out_err": errs[0], "grad_err": max(errs[1:]), "bound": bound, "ok": this_ok}
            ok = ok and this_ok
    return {"results": results, "length": length, "ok": ok}


def check_float16(steps: int = FP16_STEPS) -> dict:
    """``steps`` steps of the tiny config in float16 with dynamic loss scaling, on the default devices (data
    parallel over all of them)."""
    cfg = load_config("tiny")
    cfg.model.dtype = "float16"
    cfg.train.steps = steps
    cfg.train.warmup_steps = min(int(cfg.train.warmup_steps), max(1, steps // 10))
    cfg.train.eval_every = cfg.train.ckpt_every = steps
    cfg.train.log_every = max(1, steps // 20)
    cfg.train.task_eval_examples = 0
    n = jax.device_count()
    cfg.train.batch_size = max(int(cfg.train.batch_size), n) // n * n
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "float16")
        summary = train(cfg, workdir, progress=False)
        rows = [r for r in read_metrics(rundir.path(workdir, rundir.METRICS)) if r.get("kind") == "train" and r.get("loss") is not None]
    out = {k: summary.get(k) for k in ("status", "error", "steps", "final_train_loss", "final_eval_loss",
                                       "skipped_steps", "loss_scale", "wall_s")}
    out["first_train_loss"] = rows[0]["loss"] if rows else None
    scale = out.get("loss_scale")
    out["ok"] = bool(summary.get("status") == "done" and rows and out["final_train_loss"] is not None
                     and out["final_train_loss"] < rows[0]["loss"] and scale is not None and scale >= 1.0)
    return out


def check_mfu(devices, sizes=None, batch: int = 16, enc_len: int = 256, dec_len: int = 64, steps: int = 5,
              deadline: float | None = None) -> dict:
    """``bench step`` on one device for the largest of ``sizes`` (ladder names; default all) whose compiled step
    fits the device, in the device's 16-bit dtype: sizes whose :func:`medscale.memory.estimate` exceeds the
    planner's headroom are not compiled; of the rest, XLA's memory analysis of the compiled step decides."""
    dev = devices[0]
    dtype = half_dtype(dev)
    limit = (dev.memory_stats() or {}).get("bytes_limit") if dev.platform == "gpu" else None
    specs = accounting.ladder_specs(enc_len, dec_len)
    if sizes:
        specs = [s for s in specs if s.name in sizes]
    specs.sort(key=lambda s: accounting.param_counts(s)["total"], reverse=True)
    tried = []
    for spec in specs:
        n_params = accounting.param_counts(spec)["total"]
        est = memory.estimate(memory.Setting(spec, batch, dtype), (1, 1, 1))["total"]
        if limit and est > memory.HEADROOM * limit:  # not worth compiling: medscale memory's estimate
            tried.append({"size": spec.name, "fits": False,
                          "why": f"estimated {est / 2**30:.1f} GiB > {memory.HEADROOM:.0%} of the device"})
            continue
        if deadline is not None and time.time() > deadline:
            return {"skipped": "time budget spent", "tried": tried, "ok": False}
        try:
            with jax.default_device(dev):
                res = bench_step(spec, batch, dtype=dtype, steps=steps, hardware="auto", max_bytes=limit,
                                 devices=[dev])
        except DoesNotFit as exc:
            tried.append({"size": spec.name, "fits": False, "why": str(exc)})
            continue
        return {"size": spec.name, "params": n_params, "dtype": dtype, "batch": batch, "enc_len": enc_len,
                "dec_len": dec_len, "step_s": res["step_s"], "mfu": res["mfu"], "compile_s": res["compile_s"],
                "model_tflops_per_s": res["model_tflops_per_s"], "hardware": res["hardware"],
                "peak_bytes": res.get("peak_bytes"), "estimated_bytes": est, "device_bytes": limit, "tried": tried,
                "ok": True}
    return {"tried": tried, "ok": False, "error": "no ladder size fits one device"}


def run(platform: str = "gpu", steps: int = FP16_STEPS, sizes=None, budget_s: float = BUDGET_S, batch: int = 16,
        progress=None) -> dict:
    """All four checks (see the module docstring); the result dict has one entry per check, ``ok`` (all
    passed), ``wall_s``, and the devices."""
    devices = devices_for(platform)
    known = [s.name for s in accounting.ladder_specs()]
    unknown = sorted(set(sizes or ()) - set(known))
    if unknown:
        raise UserError(f"--sizes: unknown ladder size(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if platform == "cpu" and jax.default_backend() != "cpu":
        raise UserError("--platform cpu needs JAX's default backend to be the CPU (set JAX_PLATFORMS=cpu)")
    t0 = time.time()
    deadline = t0 + budget_s
    out = {"platform": platform, "devices": len(devices), "device_kind": devices[0].device_kind,
           "hardware": None, "half_dtype": half_dtype(devices[0]), "jax": jax.__version__}
    try:
        out["hardware"] = hardware.hardware_for_jax_devices(devices)
    except UserError:
        pass
    checks = (("sharding", lambda: check_sharding(devices)),
              ("attention", lambda: check_attention(platform, 128 if platform == "gpu" else 64)),
              ("float16", lambda: check_float16(steps)),
              ("mfu", lambda: check_mfu(devices, sizes=sizes, batch=batch, deadline=deadline)))
    for name, fn in checks:
        if time.time() > deadline:
            out[name] = {"skipped": f"time budget of {budget_s:.0f} s spent", "ok": False}
            continue
        if progress:
            progress(f"{name} ...")
        t = time.time()
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001  # report and go on: the other checks still tell the user something
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                         "trace": traceback.format_exc(limit=3)[-800:]}
        out[name]["seconds"] = time.time() - t
        if progress:
            progress(f"{name}: {'ok' if out[name].get('ok') else 'FAILED'} ({out[name]['seconds']:.1f} s)")
    out["wall_s"] = time.time() - t0
    out["ok"] = all(out[name].get("ok") for name, _ in checks)
    return out
