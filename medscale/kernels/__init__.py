"""Native CPU kernels called from JAX through the XLA FFI, built on first use with the system C++ compiler.

- ``attention_cpu.cc``: the ``dense`` attention's forward and backward for float32 on XLA:CPU (see its header
  and docs/model.md, "Speed"); :func:`attention_targets`.
- ``matmul_cpu.cc``: float32 matmuls by OpenBLAS's sgemm (the ``scipy-openblas32`` wheel, a dependency), in
  single-threaded blocks on XLA's thread pool; :func:`matmul_target`.

They reach the model only through ``cpu.py`` (``CpuOps``, the CPU implementation of the model's hooks), which
``medscale.train.step`` chooses when it builds the step; ``malloc.py`` tunes glibc's allocator for XLA:CPU and
is applied with that choice.

Each shared library is compiled once per source, compiler flags, JAX version and CPU (``-march=native``:
AVX-512 where the CPU has it, else AVX2 with FMA) into ``kernels/`` of medscale's cache directory
(``$XDG_CACHE_HOME/medscale``, default ``~/.cache/medscale``) and registered with ``jax.ffi``. Without a C++
compiler, on a CPU with neither instruction set (attention), without OpenBLAS (matmul), or with
``MEDSCALE_CPU_KERNELS=0`` (all kernels; ``MEDSCALE_CPU_MATMUL=0``: the matmul only), the target functions
return ``None`` and the step is built without that kernel; the reason is in :func:`unavailable_reason`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from medscale.hardware import cache_dir, cpuinfo_field

HERE = Path(__file__).parent
SOURCE = HERE / "attention_cpu.cc"
MATMUL_SOURCE = HERE / "matmul_cpu.cc"
HEADERS = (HERE / "parallel.h",)
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
FORWARD, BACKWARD = "medscale_attention_cpu_fwd", "medscale_attention_cpu_bwd"
MATMUL = "medscale_matmul_cpu"

_lock = threading.Lock()
_state: dict = {}  # kernel name -> {"lib": CDLL} or {"error": str}


def _cache_dir() -> Path:
    return Path(cache_dir()) / "kernels"


def _cpu_flags() -> str:
    return cpuinfo_field("flags") or ""


def _jax():
    """JAX, imported on first use rather than with this package: the CLI loads ``medscale.kernels.malloc``
    before it knows whether a command needs JAX (``medscale budget`` starts without it)."""
    import jax

    return jax


def simd_supported() -> bool:
    """Whether this CPU has an instruction set the attention kernel is written for: AVX-512F, or AVX2 with
    FMA."""
    have = set(_cpu_flags().split())
    return platform.machine() in ("x86_64", "AMD64") and ("avx512f" in have or {"avx2", "fma"} <= have)


def _build(source: Path = SOURCE, extra: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` if this (source, headers, flags, JAX, CPU) has no library yet; return its path."""
    jax = _jax()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++) on PATH")
    flags = [*FLAGS, f"-I{HERE}", f"-I{jax.ffi.include_dir()}", *extra]
    text = "\0".join([source.read_text(), *(h.read_text() for h in HEADERS)])
    key = hashlib.sha256("\0".join([text, " ".join(flags), jax.__version__, cxx, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        proc = subprocess.run([cxx, str(source), "-o", str(part), *flags], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(part, out)  # atomic: concurrent builders each publish a complete file
    return out


def _openblas() -> tuple[str, ...]:
    """Compiler flags that include and link the scipy-openblas32 wheel's OpenBLAS."""
    try:
        import scipy_openblas32 as ob
    except ImportError:
        raise RuntimeError("scipy-openblas32 is not installed (pip install scipy-openblas32)") from None
    lib = ob.get_lib_dir()
    return (f"-I{ob.get_include_dir()}", f"-L{lib}", f"-l{ob.get_library()}", f"-Wl,-rpath,{lib}")


def _load_attention() -> ctypes.CDLL:
    jax = _jax()
    if not simd_supported():
        raise RuntimeError("the kernel needs an x86-64 CPU with AVX-512 or AVX2 and FMA")
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.MedscaleAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(lib.MedscaleAttentionBackward), platform="cpu")
    return lib


def _load_matmul() -> ctypes.CDLL:
    jax = _jax()
    if os.environ.get("MEDSCALE_CPU_MATMUL", "1") == "0":
        raise RuntimeError("disabled by MEDSCALE_CPU_MATMUL=0")
    lib = ctypes.cdll.LoadLibrary(str(_build(MATMUL_SOURCE, _openblas())))
    lib.MedscaleMatmulInit()  # OpenBLAS single-threaded: the blocks run on XLA's pool
    jax.ffi.register_ffi_target(MATMUL, jax.ffi.pycapsule(lib.MedscaleMatmul), platform="cpu")
    return lib


_LOADERS = {"attention": _load_attention, "matmul": _load_matmul}


def _ready(kernel: str) -> bool:
    with _lock:
        st = _state.get(kernel)
        if st is None:
            try:
                if os.environ.get("MEDSCALE_CPU_KERNELS", "1") == "0":
                    raise RuntimeError("disabled by MEDSCALE_CPU_KERNELS=0")
                st = {"lib": _LOADERS[kernel]()}
            except Exception as e:  # noqa: BLE001 - any failure leaves the XLA implementation in charge
                st = {"error": f"{type(e).__name__}: {e}"}
            _state[kernel] = st
        return "lib" in st


def attention_targets() -> tuple[str, str] | None:
    """The registered (forward, backward) FFI target names, building the library on first call; ``None``
    when the kernel cannot be used here (see :func:`unavailable_reason`)."""
    return (FORWARD, BACKWARD) if _ready("attention") else None


def matmul_target() -> str | None:
    """The registered FFI target of the OpenBLAS matmul, building it on first call; ``None`` when it cannot
    be used here (see :func:`unavailable_reason`)."""
    return MATMUL if _ready("matmul") else None


def unavailable_reason(kernel: str = "attention") -> str | None:
    _ready(kernel)
    return _state[kernel].get("error")
