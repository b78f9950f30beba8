"""What longer encoder sequences cost with each attention implementation and remat.

Per cell (attention x encoder length x remat) it builds the real training step (``medscale.train.step.build``:
model forward, loss, backward, AdamW update) and compiles it ahead of time from abstract shapes, then reads
``compiled.memory_analysis()``:

    peak_bytes = argument + output - alias + temp

(arguments: the train state and the batch; outputs: the new state and metrics; ``alias``: output bytes that
reuse donated argument buffers, counted once; temp: XLA's scratch for activations, residuals and gradients).
A cell ``fits`` when ``peak_bytes <= --memory-limit`` (default: the device's memory; on CPU the machine's
RAM). Cells that fit are run: one warm-up step, then ``--steps`` timed steps (median ``step_s``; the cells of
one length are timed interleaved, step by step, so they share the machine's load), giving
``tokens_per_s`` (encoder + decoder tokens) and ``mfu`` (``medscale.accounting.step_flops`` model FLOPs per
second over the hardware peak of ``medscale.hardware``). Cells that do not fit are never run.

The benchmark model is small (d_model 256, 2+2 layers, 4 heads, batch 2 by default) with an encoder that is
full (no padding, so no implementation can skip masked blocks): image tokens of a ``g x g`` grid,
``g = ceil(sqrt(length))``.
"""

from __future__ import annotations

import math
import os
import sys

from medscale import accounting, rundir
from medscale import hardware as hw
from medscale.bench.step import compiled_memory
from medscale.errors import UserError
from medscale.hardware import measure_cpu_flops
from medscale.model.attention import IMPLEMENTATIONS, attention_options
from medscale.spec import ModelSpec, default_modalities
from medscale.train.batches import random_batch
from medscale.train.step import OptConfig, abstract_batch, build

ROW_KEYS = ("attention", "length", "remat", "peak_bytes", "step_s", "tokens_per_s", "mfu", "fits")


# ---------------------------------------------------------------------------------------------- parsing


def parse_lengths(text: str) -> list[int]:
    """``"256,512,...,4096"`` -> [256, 512, 1024, 2048, 4096]; plain lists are kept as given."""

    items = [t.strip() for t in str(text).split(",") if t.strip()]
    out: list[int] = []
    for idx, item in enumerate(items):
        if item in ("...", "…"):
            if len(out) < 2 or idx + 1 >= len(items):
                raise UserError(f"--lengths {text!r}: '...' needs two lengths before it and one after")
            a, b = out[-2], out[-1]
            if b <= a or b % a:
                raise UserError(f"--lengths {text!r}: '...' continues an integer ratio; {b}/{a} is not one")
            end = _int_length(items[idx + 1], text)
            x = b * (b // a)
            while x < end:
                out.append(x)
                x *= b // a
            if x != end:
                raise UserError(f"--lengths {text!r}: {end} is not reached by the ratio {b // a} from {b}")
            continue
        out.append(_int_length(item, text))
    if not out:
        raise UserError("--lengths is empty; give e.g. 256,512,...,4096")
    return list(dict.fromkeys(out))


def _int_length(item: str, text: str) -> int:
    try:
        value = int(item)
    except ValueError:
        raise UserError(f"--lengths {text!r}: {item!r} is not an integer") from None
    if value <= 0:
        raise UserError(f"--lengths {text!r}: lengths must be positive")
    return value


def parse_bytes(text) -> int:
    """``8GiB``, ``500MB``, ``5e9`` -> bytes."""

    units = {"kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "kb": 1e3, "mb": 1e6, "gb": 1e9,
             "tb": 1e12, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "b": 1}
    s = str(text).strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            s, mult = s[: -len(unit)].strip(), units[unit]
            break
    else:
        mult = 1
    try:
        value = float(s) * mult
    except ValueError:
        raise UserError(f"--memory-limit {text!r}: write bytes like 8GiB, 500MB or 5e9") from None
    if not value > 0:
        raise UserError(f"--memory-limit {text!r} must be positive")
    return int(value)


def parse_choices(text: str, known, flag: str) -> list[str]:
    items = [t.strip().replace("-", "_") for t in str(text).split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise UserError(f"{flag} {text!r}: choose from {', '.join(known)}")
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------- library


def bench_spec(length: int, *, d_model: int, enc_layers: int, dec_layers: int, heads: int, d_ff: int,
               vocab: int, dec_len: int):
    """ModelSpec with a ``g x g`` image grid holding ``length`` encoder tokens (g = ceil(sqrt(length)))."""

    if vocab < 16:
        raise UserError("--vocab must be at least 16")
    g = math.isqrt(length - 1) + 1
    image = seg = vocab // 8
    text = (vocab - image - seg) // 2
    seg += vocab - image - seg - 2 * text
    mods = default_modalities(text_vocab=text, image_vocab=image, seg_vocab=seg, grid=(g, g),
                              caption_tokens=64, box_tokens=32)
    return ModelSpec(d_model=d_model, enc_layers=enc_layers, dec_layers=dec_layers, num_heads=heads, d_ff=d_ff,
                     modalities=mods, enc_len=length, dec_len=dec_len, name="bench-seqlen")


def bench_batch(spec, batch_size: int, seed: int = 0) -> dict:
    """A contract batch whose encoder is full of image tokens (positions 0..L-1 of the grid, no padding);
    the decoder as ``medscale.train.batches.random_batch`` makes it (image target, then a causal sequence)."""
    import numpy as np

    batch = random_batch(spec, batch_size, seed)
    rng = np.random.default_rng(seed + 1)
    L = spec.enc_len
    image = next(i for i, m in enumerate(spec.modalities) if m.kind == "image")
    batch["enc_modality"] = np.full((batch_size, L), image, np.int32)
    batch["enc_pos"] = np.broadcast_to(np.arange(L, dtype=np.int32), (batch_size, L)).copy()
    batch["enc_valid"] = np.ones((batch_size, L), bool)
    batch["enc_tokens"] = rng.integers(0, spec.modalities[image].vocab_size, (batch_size, L)).astype(np.int32)
    return batch


def device_memory_bytes() -> tuple[int, str]:
    """(bytes, where the figure comes from) for the first device."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "machine RAM"


def peak_flops(hardware: str, dtype: str) -> tuple[str, float]:
    """(hardware name, peak FLOP/s of one device) from ``medscale.hardware``; a UserError when unknown."""
    return hw.device_peak(hardware, dtype, required=True)


def compile_cell(spec, batch_size: int, *, attention: str, remat: str, dtype: str, memory_limit: int,
                 options: dict) -> tuple[dict, object, object]:
    """Build and AOT-compile one cell's train step; returns (row with memory and FLOPs, compiled, program)."""
    import time

    row = {"attention": attention, "length": spec.enc_len, "remat": remat}
    with attention_options(**options):
        prog = build(spec, OptConfig(total_steps=1000, warmup_steps=10), dtype=dtype, remat=remat,
                     attention=attention, attention_block=options.get("block"),
                     attention_window=options.get("window"))
        t = time.perf_counter()
        try:
            lowered = prog.step.lower(prog.abstract_state, abstract_batch(prog, batch_size))
        except ValueError as exc:
            if "site_implementation" not in str(exc):
                raise
            raise UserError("this model passes attention 'local' to its cross-attention; it must choose each "
                            "call site's implementation with medscale.model.attention.site_implementation "
                            "(local for the encoder only)") from None
        compiled = lowered.compile()
        row["compile_s"] = time.perf_counter() - t
    mem = compiled_memory(compiled)
    row["peak_bytes"] = mem["peak"]
    row.update({"argument_bytes": mem["arguments"], "output_bytes": mem["outputs"], "alias_bytes": mem["aliased"],
                "temp_bytes": mem["temporaries"]})
    row["fits"] = row["peak_bytes"] <= memory_limit
    window = options.get("window") if attention == "local" else None
    flops = accounting.step_flops(spec, batch_size, remat=remat, attention=attention, window=window)
    row["model_flops"] = float(flops["model_flops"])
    row["hardware_flops"] = float(flops["hardware_flops"])
    row["step_s"] = row["tokens_per_s"] = row["mfu"] = None
    return row, compiled, prog


def time_cells(cells, batch_size: int, steps: int, peak: float | None) -> None:
    """Time the compiled steps of ``cells`` [(row, compiled, prog, spec)], filling each row's step figures.

    Steps are interleaved (one warm-up each, then ``steps`` rounds of one step per cell), so that the cells
    compared share the machine's conditions (a shared CPU's load drifts over minutes). On CPU the matmul peak
    is also measured just before and after the timing (``peak_now``, the best of the two): ``mfu_vs_peak_now``
    is the MFU against what this process could get from the (possibly shared) CPU at the time.
    """
    import statistics
    import time

    import jax

    if not cells:
        return
    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu:
        peak_now = measure_cpu_flops()
    live = []
    for row, compiled, prog, spec in cells:
        state = prog.init(0)
        batch = prog.put_batch(bench_batch(spec, batch_size))
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        live.append([row, compiled, state, batch, []])
    for _ in range(steps):
        for cell in live:
            row, compiled, state, batch, times = cell
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
            cell[2] = state
            row["loss"] = float(metrics["loss"])
    if on_cpu:
        peak_now = max(peak_now, measure_cpu_flops())
    n = jax.device_count()
    for row, _, _, _, times in live:
        row["step_s"] = statistics.median(times)
        row["step_s_all"] = times
        row["tokens_per_s"] = batch_size * (row["length"] + row["dec_len"]) / row["step_s"]
        model_flops_per_s = row["model_flops"] / row["step_s"]
        if peak:
            row["mfu"] = model_flops_per_s / (peak * n)
        if on_cpu:
            row["peak_now"] = peak_now
            row["mfu_vs_peak_now"] = model_flops_per_s / (peak_now * n)


def bench_seqlen(lengths, attentions, remats, *, batch_size=2, d_model=256, enc_layers=2, dec_layers=2,
                 heads=4, d_ff=None, vocab=4096, dec_len=64, dtype="float32", block=512, block_q=None,
                 window=128, steps=3, memory_limit=None, hardware="auto", progress=False) -> tuple[list, dict]:
    """All cells; returns (rows, info). ``memory_limit`` None: :func:`device_memory_bytes`.

    Per length: every (attention, remat) cell is compiled ahead of time; those that fit are then timed
    together, interleaved (:func:`time_cells`).
    """
    import gc

    from tqdm import tqdm

    for name, value in (("--batch", batch_size), ("--steps", steps), ("--block", block), ("--window", window)):
        if value is None or value < 1:
            raise UserError(f"{name} must be a positive integer")
    if block_q is not None and block_q < 1:
        raise UserError("--block-q must be a positive integer")
    unknown = [a for a in attentions if a not in IMPLEMENTATIONS]
    if unknown:
        raise UserError(f"--attention {unknown[0]!r} unknown; known: {', '.join(IMPLEMENTATIONS)}")
    d_ff = d_ff or 4 * d_model
    limit, source = (memory_limit, "--memory-limit") if memory_limit else device_memory_bytes()
    hw_name, peak = peak_flops(hardware, dtype)
    options = {"block": block, "block_q": block_q, "window": window}
    rows = []
    bar = tqdm(total=len(lengths) * len(attentions) * len(remats), desc="seqlen cells", disable=not progress,
               file=sys.stderr)
    for L in lengths:
        spec = bench_spec(L, d_model=d_model, enc_layers=enc_layers, dec_layers=dec_layers, heads=heads,
                          d_ff=d_ff, vocab=vocab, dec_len=dec_len)
        group = []
        for remat in remats:
            for attention in attentions:
                row, compiled, prog = compile_cell(spec, batch_size, attention=attention, remat=remat,
                                                   dtype=dtype, memory_limit=limit, options=options)
                row["dec_len"] = dec_len
                rows.append(row)
                if row["fits"]:
                    group.append((row, compiled, prog, spec))
                bar.update(1)
        time_cells(group, batch_size, steps, peak)
        del group
        gc.collect()
    bar.close()
    info = {"memory_limit": limit, "memory_limit_source": source, "hardware": hw_name, "peak_flops": peak,
            "batch": batch_size, "d_model": d_model, "enc_layers": enc_layers, "dec_layers": dec_layers,
            "heads": heads, "d_ff": d_ff, "vocab": vocab, "dec_len": dec_len, "dtype": dtype,
            "block": block, "block_q": block_q or block, "window": window, "steps": steps}
    return rows, info


def format_table(rows, info) -> str:
    head = (f"{'attention':<10} {'remat':<9} {'length':>6} {'peak MiB':>9} {'fits':>4} {'step s':>8} "
            f"{'tokens/s':>9} {'MFU':>6} {'MFU now':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        step = f"{r['step_s']:.3f}" if r["step_s"] is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        now = f"{100 * r['mfu_vs_peak_now']:.1f}%" if r.get("mfu_vs_peak_now") is not None else "-"
        lines.append(f"{r['attention']:<10} {r['remat']:<9} {r['length']:>6} {r['peak_bytes'] / 2**20:>9.1f} "
                     f"{'yes' if r['fits'] else 'no':>4} {step:>8} {tps:>9} {mfu:>6} {now:>7}")
    lines.append(f"MFU: model FLOPs/s over the {info['hardware']} peak of medscale.hardware "
                 f"({info['peak_flops'] / 1e9:.1f} GFLOP/s per device)"
                 + ("; MFU now: over the CPU matmul peak measured around the timing" if any(
                     r.get("peak_now") for r in rows) else ""))
    lines.append(f"memory limit {info['memory_limit'] / 2**30:.2f} GiB ({info['memory_limit_source']}); "
                 f"hardware {info['hardware']}; model d_model {info['d_model']}, layers "
                 f"{info['enc_layers']}+{info['dec_layers']}, heads {info['heads']}, batch {info['batch']}, "
                 f"decoder length {info['dec_len']}, {info['dtype']}; block {info['block']}, "
                 f"block_q {info['block_q']}, window {info['window']}")
    return "\n".join(lines)


def plot(rows, info, path: str) -> None:
    """Two panels: compiled peak memory and step time against encoder length, one line per (attention, remat)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in dict.fromkeys((r["attention"], r["remat"]) for r in rows):
        sel = sorted((r for r in rows if (r["attention"], r["remat"]) == key), key=lambda r: r["length"])
        label = key[0] if key[1] == "none" else f"{key[0]} / remat {key[1]}"
        line, = ax_mem.plot([r["length"] for r in sel], [r["peak_bytes"] / 2**30 for r in sel], "o-", label=label)
        ran = [r for r in sel if r["step_s"] is not None]
        if ran:
            ax_time.plot([r["length"] for r in ran], [r["step_s"] for r in ran], "o-", color=line.get_color(),
                         label=label)
    ax_mem.axhline(info["memory_limit"] / 2**30, color="grey", ls="--", lw=1, label="memory limit")
    timed = any(r["step_s"] for r in rows)
    if not timed:
        ax_time.text(0.5, 0.5, "no cell fits the memory limit", ha="center", transform=ax_time.transAxes)
    for ax, title in ((ax_mem, "compiled peak memory (GiB)"), (ax_time, "train step (s, median)")):
        if ax is ax_mem or timed:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xlabel("encoder length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=8)
    fig.suptitle(f"medscale bench seqlen: d_model {info['d_model']}, {info['enc_layers']}+{info['dec_layers']} "
                 f"layers, batch {info['batch']}, {info['hardware']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    rundir.write_bytes(path, buf.getvalue())
