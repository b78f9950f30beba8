"""Accelerator peak table and compute units (pure Python; no JAX at import).

Each entry gives the *dense* peak FLOP/s per precision (no 2:4 structured sparsity; NVIDIA's datasheets
print the sparse figure for Ampere/Hopper tensor cores, which is twice the dense one) and the memory per
device. Precisions: ``fp32`` (CUDA cores, no tensor cores), ``tf32`` (tensor cores, fp32 inputs),
``fp16`` and ``bf16`` (tensor cores, fp32 accumulate). ``None`` means the device has no such mode.

The ``cpu`` entry is not a datasheet figure: its fp32 peak is measured on the spot by a short float32
matrix-multiply benchmark (numpy) and cached in ``$XDG_CACHE_HOME/medscale/cpu_peak.json`` (default
``~/.cache/medscale``), keyed by CPU model and core count, so the measurement runs once per machine.

Systems: ``dgx-1`` is 8 x V100 SXM2 (32 GB) (NVIDIA DGX-1 with Tesla V100 datasheet); :func:`resolve`
returns the per-device key and the default device count.

Units: ``PF_DAY`` = 1e15 FLOP/s for one day = 1e15 x 86,400 FLOPs (Kaplan et al. 2020, Sec. 1.3).
"""

from __future__ import annotations

import json
import os
import time

from medscale import rundir
from medscale.errors import UserError

PF_DAY = 1e15 * 86_400
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
T = 1e12
GB = 1e9

# Sources (NVIDIA product datasheets; dense figures):
#  [V100]  NVIDIA Tesla V100 GPU datasheet (2018/2020): V100 SXM2 fp32 15.7 TF, tensor 125 TF;
#          V100 PCIe fp32 14 TF, tensor 112 TF; 16 or 32 GB HBM2. No TF32 or BF16 on Volta.
#  [A100]  NVIDIA A100 Tensor Core GPU datasheet (2021): fp32 19.5 TF, TF32 156 TF (312 sparse),
#          BF16/FP16 312 TF (624 sparse); 40 GB HBM2 or 80 GB HBM2e (SXM figures; PCIe has the same peaks).
#  [H100]  NVIDIA H100 Tensor Core GPU datasheet (2023), SXM5 column: fp32 67 TF, TF32 989 TF sparse
#          (494.7 dense), BF16/FP16 1,979 TF sparse (989.4 dense); 80 GB HBM3.
#          PCIe column: fp32 51 TF, TF32 756 sparse (378 dense), BF16/FP16 1,513 sparse (756 dense); 80 GB.
#  [H200]  NVIDIA H200 Tensor Core GPU datasheet (2024), SXM column: same GH100 compute as H100 SXM
#          (fp32 67, TF32 989 sparse, BF16/FP16 1,979 sparse); 141 GB HBM3e.
HARDWARE: dict[str, dict] = {
    "v100-sxm2-16gb": {"fp32": 15.7 * T, "tf32": None, "fp16": 125 * T, "bf16": None,
                       "memory": 16 * GB, "source": "NVIDIA Tesla V100 datasheet, SXM2"},
    "v100-sxm2-32gb": {"fp32": 15.7 * T, "tf32": None, "fp16": 125 * T, "bf16": None,
                       "memory": 32 * GB, "source": "NVIDIA Tesla V100 datasheet, SXM2"},
    "v100-pcie-16gb": {"fp32": 14 * T, "tf32": None, "fp16": 112 * T, "bf16": None,
                       "memory": 16 * GB, "source": "NVIDIA Tesla V100 datasheet, PCIe"},
    "v100-pcie-32gb": {"fp32": 14 * T, "tf32": None, "fp16": 112 * T, "bf16": None,
                       "memory": 32 * GB, "source": "NVIDIA Tesla V100 datasheet, PCIe"},
    "a100-40gb": {"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T, "bf16": 312 * T,
                  "memory": 40 * GB, "source": "NVIDIA A100 datasheet (dense)"},
    "a100-80gb": {"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T, "bf16": 312 * T,
                  "memory": 80 * GB, "source": "NVIDIA A100 datasheet (dense)"},
    "h100-sxm": {"fp32": 67 * T, "tf32": 494.7 * T, "fp16": 989.4 * T, "bf16": 989.4 * T,
                 "memory": 80 * GB, "source": "NVIDIA H100 datasheet, SXM5 (dense = sparse / 2)"},
    "h100-pcie": {"fp32": 51 * T, "tf32": 378 * T, "fp16": 756 * T, "bf16": 756 * T,
                  "memory": 80 * GB, "source": "NVIDIA H100 datasheet, PCIe (dense = sparse / 2)"},
    "h200": {"fp32": 67 * T, "tf32": 494.7 * T, "fp16": 989.4 * T, "bf16": 989.4 * T,
             "memory": 141 * GB, "source": "NVIDIA H200 datasheet, SXM (dense = sparse / 2)"},
    "cpu": {"fp32": "measured", "tf32": None, "fp16": None, "bf16": None,
            "memory": "measured", "source": "measured: float32 matmul benchmark on this machine"},
}

# name -> (device key, default device count)
SYSTEMS = {"dgx-1": ("v100-sxm2-32gb", 8), "dgx1": ("v100-sxm2-32gb", 8)}


def known_names() -> list[str]:
    return list(HARDWARE) + list(SYSTEMS)


def resolve(name: str) -> tuple[str, int]:
    """``(device key, default device count)`` for a device or system name; unknown -> UserError."""
    key = str(name).strip().lower()
    if key in SYSTEMS:
        return SYSTEMS[key]
    if key in HARDWARE:
        return key, 1
    raise UserError(f"unknown hardware {name!r}; known: {', '.join(known_names())}")


def supported_precisions(name: str) -> list[str]:
    key, _ = resolve(name)
    return [p for p in PRECISIONS if HARDWARE[key][p] is not None]


def default_precision(name: str) -> str:
    """The fastest 16-bit tensor-core precision the device has (bf16, else fp16), else fp32."""
    ok = supported_precisions(name)
    for p in ("bf16", "fp16", "fp32"):
        if p in ok:
            return p
    return ok[0]


# The one mapping between a run's compute dtype (``model.dtype``) and the peaks of the table.
# dtype -> the peaks that can apply, best first (the first one the device has is the one it runs at):
# ``float32`` runs on TF32 tensor cores where the device has them (JAX's default matmul precision computes float32
# dots in TF32 on Ampere and later GPUs; docs.jax.dev "Matmul precision"), else on the CUDA cores. ``bfloat16``
# and ``float16`` run only on tensor cores of their own format: a V100 has fp16 tensor cores and no bf16 ones,
# and XLA emulates bfloat16 there at float32 speed or worse, so a bfloat16 run on it has no honest peak.
DTYPE_PRECISIONS = {"float32": ("tf32", "fp32"), "bfloat16": ("bf16",), "float16": ("fp16",)}
# peak -> the compute dtype a run needs to reach it (what ``medscale budget`` and the report assume)
PRECISION_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NO_BF16 = ("{key} has no bfloat16 tensor cores (XLA would emulate bfloat16 at float32 speed or worse); "
           "use {fix}")


def precision_for_dtype(name: str, dtype: str) -> str:
    """The peak that applies to a training run's compute dtype on ``name`` (:data:`DTYPE_PRECISIONS`).

    ``float32`` -> ``tf32`` where the device has it, else ``fp32``; ``bfloat16`` -> ``bf16``; ``float16`` ->
    ``fp16``. ``bfloat16`` on a device without bf16 tensor cores (V100) is a UserError naming float16.
    The ``cpu`` entry charges every dtype against its measured float32 peak: XLA's CPU backend converts
    bfloat16 and float16 dot operands to float32 and multiplies in float32 (the compiled HLO shows a float32
    ``dot`` fed by ``convert``s), so the float32 matmul rate is the ceiling a 16-bit run on the CPU can reach."""
    key, _ = resolve(name)
    d = str(dtype).lower()
    if d not in DTYPE_PRECISIONS:
        raise UserError(f"unknown compute dtype {dtype!r}; use one of {', '.join(DTYPE_PRECISIONS)}")
    if HARDWARE[key]["fp32"] == "measured":
        return "fp32"
    ok = supported_precisions(key)
    for p in DTYPE_PRECISIONS[d]:
        if p in ok:
            return p
    if d == "bfloat16" and "fp16" in ok:
        raise UserError(NO_BF16.format(key=key, fix="model.dtype=float16 (dynamic loss scaling) or float32"))
    raise UserError(f"{key} has no peak for {d}; it has {', '.join(ok)}")


def check_compute_dtype(hardware: str | None, dtype: str) -> tuple[str, str]:
    """``(table key, precision)`` a run computing in ``dtype`` on ``hardware`` is charged against; ``"auto"`` (or
    None) reads the JAX devices in use. A dtype the device cannot run honestly (bfloat16 on a V100) or an
    unknown device kind is a UserError: training calls this before it writes anything."""
    auto = hardware in ("auto", None, "")
    key = hardware_for_jax_devices() if auto else resolve(hardware)[0]
    return key, precision_for_dtype(key, dtype)


def dtype_for_precision(name: str, precision: str) -> tuple[str, str]:
    """``(model.dtype, statement)``: the compute dtype a run on ``name`` needs to reach the ``precision`` peak, and a
    one-line statement of that assumption (``medscale budget`` and the report print it)."""
    key, _ = resolve(name)
    prec = str(precision).lower()
    if prec not in PRECISION_DTYPES:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    dtype = PRECISION_DTYPES[prec]
    if prec == "fp16":
        note = "float16 mixed precision (model.dtype=float16, dynamic loss scaling)"
        if HARDWARE[key]["bf16"] is None:
            note += f"; bfloat16 has no tensor cores on {key}"
    elif prec == "bf16":
        note = "bfloat16 compute (model.dtype=bfloat16)"
    elif prec == "tf32":
        note = "float32 (model.dtype=float32; XLA computes its matmuls on TF32 tensor cores)"
    else:
        note = "float32 (model.dtype=float32)"
        if HARDWARE[key]["tf32"] is not None:
            note += " at the CUDA-core peak (JAX's default matmul precision would use the TF32 tensor cores)"
        elif HARDWARE[key]["fp16"] is not None:
            note += ", no tensor cores"
    return dtype, note


def peak_flops(name: str, precision: str = "fp32") -> float:
    """Dense peak FLOP/s of one device of ``name`` at ``precision`` (``cpu``: measured, fp32 only). A precision the
    device lacks is a UserError naming the ones it has (bf16 on a V100: names fp16 and model.dtype=float16)."""
    key, _ = resolve(name)
    prec = str(precision).lower()
    if prec not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    value = HARDWARE[key][prec]
    if value is None:
        ok = supported_precisions(key)
        if prec == "bf16" and "fp16" in ok:
            raise UserError(NO_BF16.format(key=key, fix="fp16 (model.dtype=float16, dynamic loss scaling) or fp32"))
        raise UserError(f"{key} has no {prec} peak; use one of {', '.join(ok)}")
    if value == "measured":
        return cpu_peak_flops()
    return float(value)


def memory_bytes(name: str) -> float:
    key, _ = resolve(name)
    value = HARDWARE[key]["memory"]
    if value == "measured":
        try:
            return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return float("nan")
    return float(value)


# ---------------------------------------------------------------- CPU: measured peak


def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line whose key starts with ``name`` (``None`` if absent)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    model = cpuinfo_field("model name")
    if model is not None:
        return model
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "medscale")


def cpu_cache_key() -> str:
    return f"{_cpu_model()} | {_cpu_cores()} cores"


def measure_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an ``n x n`` float32 matmul (2 n^3 FLOPs) with numpy's BLAS."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up (thread pool start, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9)


def cpu_peak_flops(refresh: bool = False) -> float:
    """fp32 peak of this CPU: the cached measurement for this CPU model and core count, else measured now."""
    path = os.path.join(cache_dir(), "cpu_peak.json")
    key = cpu_cache_key()
    cache: dict = {}
    try:
        with open(path) as fh:
            cache = json.load(fh)
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("fp32"), (int, float)) \
            and entry["fp32"] > 0:
        return float(entry["fp32"])
    value = measure_cpu_flops()
    _store_cpu_peak(path, cache, key, value)
    return value


def record_cpu_peak(value: float) -> float:
    """Keep the best fp32 FLOP/s seen on this CPU: a matmul measured while other work shared the cores reads
    low, so a later, higher measurement (e.g. ``medscale bench step``'s) replaces the cached one. Returns the
    cached peak afterwards."""
    path = os.path.join(cache_dir(), "cpu_peak.json")
    key = cpu_cache_key()
    old = cpu_peak_flops()
    if value > old:
        try:
            with open(path) as fh:
                cache = json.load(fh)
        except (OSError, ValueError):
            cache = {}
        _store_cpu_peak(path, cache if isinstance(cache, dict) else {}, key, value)
        return float(value)
    return old


def _store_cpu_peak(path: str, cache: dict, key: str, value: float) -> None:
    cache[key] = {"fp32": value, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "method": "numpy float32 1024x1024 matmul, best of 5 (best measurement kept)"}
    try:
        rundir.write_json(path, cache, sort_keys=False)
    except OSError:  # a read-only home: the measurement still stands for this call
        pass


# ---------------------------------------------------------------- JAX devices -> table key


def hardware_for_device_kind(kind: str) -> str:
    """Table key for a JAX ``device.device_kind`` string (e.g. 'NVIDIA H100 80GB HBM3',
    'Tesla V100-SXM2-32GB', 'cpu'); unknown -> UserError that says how to name it."""
    k = str(kind).lower().replace("_", "-")
    if k == "cpu" or k.startswith("cpu"):
        return "cpu"
    if "h200" in k:
        return "h200"
    if "h100" in k:
        return "h100-pcie" if "pcie" in k else "h100-sxm"
    if "a100" in k:
        return "a100-80gb" if "80gb" in k.replace(" ", "") else "a100-40gb"
    if "v100" in k:
        form = "pcie" if "pcie" in k else "sxm2"
        mem = "32gb" if "32gb" in k.replace(" ", "") else "16gb"
        return f"v100-{form}-{mem}"
    raise UserError(f"unknown device kind {kind!r}: set the config's hardware to one of "
                    f"{', '.join(HARDWARE)}")


def hardware_for_jax_devices(devices=None) -> str:
    """Table key for the devices in use (default ``jax.devices()``); all must be of one kind."""
    if devices is None:
        import jax

        devices = jax.devices()
    kinds = {getattr(d, "device_kind", d) for d in devices}
    if not kinds:
        raise UserError("no devices")
    if len(kinds) > 1:
        raise UserError(f"devices of several kinds {sorted(kinds)}: set the config's hardware explicitly")
    return hardware_for_device_kind(next(iter(kinds)))


def device_peak(hardware: str | None, dtype: str, required: bool = False) -> tuple[str, float | None]:
    """(table key, peak FLOP/s of one device computing in ``dtype``, :func:`precision_for_dtype`) for a hardware
    name, or for the JAX devices in use when it is ``"auto"`` (on CPU: the measured fp32 peak, for every dtype).
    For ``"auto"``, a dtype the device has no peak for (bfloat16 on a V100) gives None (MFU is then null) unless
    ``required``; for a named hardware it is a UserError."""
    auto = hardware in ("auto", None, "")
    name = hardware_for_jax_devices() if auto else resolve(hardware)[0]
    try:
        return name, float(peak_flops(name, precision_for_dtype(name, dtype)))
    except UserError:
        if required or not auto:
            raise
        return name, None


def system_peak(hardware: str, precision: str | None = None) -> tuple[str, int, str, float]:
    """(device key, its default device count, precision, peak FLOP/s per device) of a device or system name
    (``medscale budget``, the report's budget); ``precision`` defaults to the device's best
    (:func:`default_precision`)."""
    device, default_count = resolve(hardware)
    precision = precision or default_precision(device)
    return device, default_count, precision, peak_flops(device, precision)
