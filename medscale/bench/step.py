"""Timing of the real training step (``medscale bench step``)."""

from __future__ import annotations

import statistics
import time

from medscale import accounting, kernels
from medscale import hardware as hw
from medscale.errors import UserError
from medscale.hardware import _cpu_model, measure_cpu_flops, record_cpu_peak
from medscale.modalities import from_vocab_flag
from medscale.model.attention import IMPLEMENTATIONS
from medscale.model.sharding import make_mesh
from medscale.spec import ModelSpec
from medscale.train.batches import random_batch
from medscale.train.step import OptConfig, build

# untimed steps before timing: XLA:CPU frees a step's temporary buffer asynchronously, after the step's outputs
# are ready, so the next step may allocate a second one; the heap (see kernels/malloc.py) reaches its steady size
# within the first few steps, and the page faults of that growth are not part of a step's steady-state time
WARMUP_STEPS = 3


class DoesNotFit(Exception):
    """The compiled step needs more device memory than ``bench_step``'s ``max_bytes``."""


def compiled_memory(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program in bytes: ``arguments``, ``outputs``, ``aliased`` (donated),
    ``temporaries`` and ``peak`` = arguments + outputs - aliased + temporaries; None where the backend has none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends have no memory analysis
        return None
    if m is None:
        return None
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def bench_spec(d_model, enc_layers, dec_layers, heads, d_ff, vocab, enc_len, dec_len, mlp="gelu") -> ModelSpec:
    """The ModelSpec ``medscale flops`` builds from the same flags (``vocab``: text vocabulary N, or
    "I,C,B,S,Q,A" per modality; None: the defaults)."""

    return ModelSpec(d_model=d_model, enc_layers=enc_layers, dec_layers=dec_layers, num_heads=heads, d_ff=d_ff,
                     mlp=mlp, modalities=from_vocab_flag(None if vocab is None else str(vocab)), enc_len=enc_len,
                     dec_len=dec_len, name="bench")


def bench_step(spec: ModelSpec, batch_size: int, *, dtype="float32", remat="none", attention="dense", steps=5,
               hardware="auto", window=None, block=None, max_bytes=None, devices=None) -> dict:
    """``devices``: the devices to run on (default all; data parallel). ``max_bytes``: raise
    :class:`DoesNotFit` before running when XLA's peak memory of the compiled step exceeds it."""
    import jax

    if attention not in IMPLEMENTATIONS:
        raise UserError(f"--attention {attention!r} unknown; known: {', '.join(IMPLEMENTATIONS)}")
    if steps < 1 or batch_size < 1:
        raise UserError("--steps and --batch must be positive")
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if batch_size % n:
        raise UserError(f"--batch {batch_size} is not divisible by the {n} devices")
    prog = build(spec, OptConfig(total_steps=1000, warmup_steps=10), mesh=make_mesh((-1, 1, 1), devices), dtype=dtype,
                 remat=remat, attention=attention, attention_block=block, attention_window=window)
    state = prog.init(0)
    batch = prog.put_batch(random_batch(spec, batch_size, 0))
    peak_before = 0.0
    if jax.devices()[0].platform == "cpu":
        peak_before = measure_cpu_flops()
    t = time.perf_counter()
    compiled = prog.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    peak_bytes = (compiled_memory(compiled) or {}).get("peak")
    if max_bytes is not None and peak_bytes is not None and peak_bytes > max_bytes:
        raise DoesNotFit(f"the compiled step needs {peak_bytes / 2**30:.2f} GiB of {max_bytes / 2**30:.2f} GiB")
    for _ in range(WARMUP_STEPS):
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)

    flops = accounting.step_flops(spec, batch_size, remat=remat, attention=attention,
                                  window=window if attention == "local" else None)
    model_flops, hw_flops = float(flops["model_flops"]), float(flops["hardware_flops"])
    name, peak = hw.device_peak(hardware, dtype)  # CPU: the measured fp32 peak for every dtype
    peak_now = None
    if jax.devices()[0].platform == "cpu" and dtype == "float32":  # the machine may be shared: the peak measured around the timing too

        peak_now = max(peak_before, measure_cpu_flops())
        if name == "cpu":  # keep the best peak seen on this CPU (hardware.record_cpu_peak)

            peak = record_cpu_peak(peak_now)
    cpu = cpu_kernels = None
    if jax.devices()[0].platform == "cpu":  # which CPU, and whether the native kernels ran (docs/model.md, "Speed")

        cpu = _cpu_model()
        hlo = compiled.as_text()  # read off the timed executable, not decided again here
        cpu_kernels = {"attention": f'custom_call_target="{kernels.FORWARD}"' in hlo,
                       "matmul": f'custom_call_target="{kernels.MATMUL}"' in hlo}
    tokens = batch_size * (spec.enc_len + spec.dec_len)
    mtf = model_flops / step_s / 1e12 if model_flops else None
    return {"step_s": step_s, "step_s_all": times, "tokens_per_s": tokens / step_s, "model_tflops_per_s": mtf,
            "hardware_tflops_per_s": hw_flops / step_s / 1e12 if hw_flops else None,
            "peak_tflops_per_s": peak * n / 1e12 if peak else None,
            "mfu": (mtf * 1e12 / (peak * n)) if (mtf and peak) else None,
            "mfu_vs_peak_now": (mtf * 1e12 / (peak_now * n)) if (mtf and peak_now) else None,
            "peak_now_tflops_per_s": peak_now * n / 1e12 if peak_now else None,
            "compile_s": compile_s, "peak_bytes": peak_bytes, "hardware": name, "cpu": cpu, "cpu_kernels": cpu_kernels, "devices": n, "dtype": dtype, "remat": remat,
            "attention": attention, "batch": batch_size, "loss": float(m["loss"]),
            "model_flops_per_step": model_flops, "hardware_flops_per_step": hw_flops}
