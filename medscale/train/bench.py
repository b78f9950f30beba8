"""Timing of the real training step (``medscale bench step``) and the CPU matmul peak it is compared with."""

from __future__ import annotations

import logging
import statistics
import time

from medscale.errors import UserError
from medscale.spec import ModelSpec, default_modalities

log = logging.getLogger(__name__)


def bench_spec(d_model, enc_layers, dec_layers, heads, d_ff, vocab, enc_len, dec_len, mlp="gelu") -> ModelSpec:
    """A ModelSpec of the four default modalities with combined vocabulary ``vocab`` (image and segmentation
    1/8 each, caption and boxes sharing the text vocabulary: the rest split in two) and a 16x16 image grid."""
    if vocab < 16:
        raise UserError("--vocab must be at least 16")
    img = seg = vocab // 8
    text = (vocab - img - seg) // 2
    seg += vocab - img - seg - 2 * text  # odd remainders go to segmentation so the total is exact
    grid = (16, 16)
    mods = default_modalities(text_vocab=text, image_vocab=img, seg_vocab=seg, grid=grid,
                              caption_tokens=64, box_tokens=32)
    return ModelSpec(d_model=d_model, enc_layers=enc_layers, dec_layers=dec_layers, num_heads=heads, d_ff=d_ff,
                     mlp=mlp, modalities=mods, enc_len=enc_len, dec_len=dec_len, name="bench")


def measured_matmul_peak(dtype="float32", n=1024, repeats=5) -> float:
    """Best FLOP/s of a jit-ed n x n matmul chain on the default device (the CPU 'measured peak')."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype) / n
    f = jax.jit(lambda x: x @ x @ x @ x)
    f(a).block_until_ready()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def _peak(hardware: str, dtype: str):
    import jax

    precision = "bf16" if dtype == "bfloat16" else "fp32"
    try:
        from medscale import hardware as hw
    except ImportError:
        hw = None
    name = hardware
    if hw is not None:
        if name == "auto":
            name = hw.detect() if hasattr(hw, "detect") else jax.devices()[0].device_kind
        try:
            return name, float(hw.peak_flops(name, precision))
        except UserError:
            if hardware != "auto":
                raise
    if jax.devices()[0].platform == "cpu":
        return "cpu (measured here)", measured_matmul_peak(dtype)
    raise UserError(f"no peak FLOP/s known for {name!r}; pass --hardware with a hardware table key")


def bench_step(spec: ModelSpec, batch_size: int, *, dtype="float32", remat="none", attention="dense", steps=5,
               hardware="auto") -> dict:
    import jax

    from medscale.model.attention import IMPLEMENTATIONS
    from medscale.model.sharding import make_mesh
    from medscale.train.batches import random_batch
    from medscale.train.step import OptConfig, build

    if attention not in IMPLEMENTATIONS:
        raise UserError(f"--attention {attention!r} unknown; known: {', '.join(IMPLEMENTATIONS)}")
    if steps < 1 or batch_size < 1:
        raise UserError("--steps and --batch must be positive")
    n = jax.device_count()
    if batch_size % n:
        raise UserError(f"--batch {batch_size} is not divisible by the {n} devices")
    prog = build(spec, OptConfig(total_steps=1000, warmup_steps=10), mesh=make_mesh((-1, 1, 1)), dtype=dtype,
                 remat=remat, attention=attention)
    state = prog.init(0)
    batch = prog.put_batch(random_batch(spec, batch_size, 0))
    t = time.perf_counter()
    compiled = prog.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    try:
        from medscale import accounting

        flops = accounting.step_flops(spec, batch_size, remat=remat, attention=attention)
        model_flops, hw_flops = float(flops["model_flops"]), float(flops["hardware_flops"])
    except ImportError:
        model_flops = hw_flops = None
    name, peak = _peak(hardware, dtype)
    tokens = batch_size * (spec.enc_len + spec.dec_len)
    mtf = model_flops / step_s / 1e12 if model_flops else None
    return {"step_s": step_s, "step_s_all": times, "tokens_per_s": tokens / step_s, "model_tflops_per_s": mtf,
            "hardware_tflops_per_s": hw_flops / step_s / 1e12 if hw_flops else None,
            "peak_tflops_per_s": peak * n / 1e12, "mfu": (mtf * 1e12 / (peak * n)) if mtf else None,
            "compile_s": compile_s, "hardware": name, "devices": n, "dtype": dtype, "remat": remat,
            "attention": attention, "batch": batch_size, "loss": float(m["loss"]),
            "model_flops_per_step": model_flops, "hardware_flops_per_step": hw_flops}
