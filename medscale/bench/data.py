"""Input-pipeline benchmark (``medscale bench data``): rates measured within one process."""

from __future__ import annotations

import time

import numpy as np

from medscale.data.pipeline import build_data
from medscale.data.stream import render_scene


def _rate(fn, n: int, cpu: dict | None = None, key: str = "") -> float:
    """Calls per wall second; with ``cpu``, also stores this process's CPU milliseconds per call (all threads)
    under ``key`` — steadier than wall time when other jobs share the cores."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    if cpu is not None:
        cpu[key] = 1000 * (time.process_time() - c) / n
    return n / max(time.perf_counter() - t, 1e-9)


def bench_pipeline(cfg, spec, batch_size: int, batches: int = 100, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    data = build_data(cfg, spec, progress=progress)
    toks = data.tokens("train")
    setup_s = time.perf_counter() - t0
    n = len(toks[spec.modalities[0].name + "_len"])
    src = data.source("train")
    rng = np.random.default_rng(0)
    idx = iter(rng.integers(0, len(src), size=batches * batch_size * 2))
    cpu: dict = {}
    raw_eps = _rate(lambda: src[int(next(idx))], min(batches * batch_size, 2000), cpu, "raw_read_cpu_ms_per_example")
    sel = [rng.integers(0, n, batch_size) for _ in range(8)]
    exs = [{k: v[s] for k, v in toks.items()} for s in sel]
    k = iter(range(10**9))
    mask_bps = _rate(lambda: data.masker(exs[next(k) % 8], np.random.default_rng(next(k))), batches, cpu,
                     "masking_cpu_ms_per_batch")
    out = {"dataset": data.key, "batch_size": batch_size, "enc_len": spec.enc_len, "dec_len": spec.dec_len,
           "setup_s": setup_s, "raw_read_examples_per_s": raw_eps, "masking_batches_per_s": mask_bps}
    if data.stream is not None:  # the synthetic stream: what one new scene costs (render + tokenise), not cached

        k = min(batches * batch_size, 512)
        far = 10**7 // data.stream.chunk  # a chunk no run reads
        _rate(lambda: render_scene(data.stream.seed, far * data.stream.chunk + next(idx) % 10**6, data.image_size),
              k, cpu, "stream_render_cpu_ms_per_example")
        t, c = time.perf_counter(), time.process_time()
        data.stream.build(far, k)
        cpu["stream_cpu_ms_per_example"] = 1000 * (time.process_time() - c) / k
        out["stream_examples_per_s"] = k / max(time.perf_counter() - t, 1e-9)
    for threads in (0, 1):
        it = data.iterator("train", batch_size, seed=0, shard_index=0, shard_count=1, num_threads=threads)
        next(it)  # warm-up (on the synthetic stream: builds or loads its first chunk)
        bps = _rate(lambda it=it: next(it), batches, cpu, f"iterator_t{threads}_cpu_ms_per_batch")
        out[f"iterator_t{threads}_batches_per_s"] = bps
        out[f"iterator_t{threads}_examples_per_s"] = bps * batch_size
        out[f"iterator_t{threads}_tokens_per_s"] = bps * batch_size * (spec.enc_len + spec.dec_len)
    out.update(cpu)
    return out
