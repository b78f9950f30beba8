"""Native CPU kernels called from JAX through the XLA FFI, built on first use with the system C++ compiler.

``attention_cpu.cc``: the ``dense`` attention's forward and backward for float32 on XLA:CPU (see its header
and docs/model.md, "Speed"). The shared library is compiled once per source, compiler flags, JAX version and
CPU (``-march=native``) into ``kernels/`` of medscale's cache directory (``$XDG_CACHE_HOME/medscale``, default
``~/.cache/medscale``) and registered with ``jax.ffi``. Without a C++ compiler, without AVX-512, or with ``MEDSCALE_CPU_KERNELS=0``,
:func:`attention_targets` returns ``None`` and the model uses its XLA implementation instead; the reason is
in :func:`unavailable_reason`.
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

import jax

SOURCE = Path(__file__).with_name("attention_cpu.cc")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
FORWARD, BACKWARD = "medscale_attention_cpu_fwd", "medscale_attention_cpu_bwd"

_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    from medscale.hardware import cache_dir

    return Path(cache_dir()) / "kernels"


def _cpu_flags() -> str:
    from medscale.hardware import cpuinfo_field

    return cpuinfo_field("flags") or ""


def _build() -> Path:
    """Compile the library if this (source, flags, JAX, CPU) has none yet; return its path."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++) on PATH")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), jax.__version__, cxx,
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"attention_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        proc = subprocess.run([cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(part)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(part, out)  # atomic: concurrent builders each publish a complete file
    return out


def _load() -> None:
    if os.environ.get("MEDSCALE_CPU_KERNELS", "1") == "0":
        raise RuntimeError("disabled by MEDSCALE_CPU_KERNELS=0")
    if platform.machine() not in ("x86_64", "AMD64") or "avx512f" not in _cpu_flags().split():
        raise RuntimeError("the kernel needs an x86-64 CPU with AVX-512")
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.MedscaleAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(lib.MedscaleAttentionBackward), platform="cpu")
    _state["lib"] = lib


def attention_targets() -> tuple[str, str] | None:
    """The registered (forward, backward) FFI target names, building the library on first call; ``None``
    when the kernel cannot be used here (see :func:`unavailable_reason`)."""
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                _load()
            except Exception as e:  # any failure leaves the XLA implementation in charge
                _state["error"] = f"{type(e).__name__}: {e}"
        return (FORWARD, BACKWARD) if "lib" in _state else None


def unavailable_reason() -> str | None:
    attention_targets()
    return _state.get("error")
