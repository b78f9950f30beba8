"""glibc malloc tuning for XLA:CPU.

XLA:CPU allocates its large buffers (logits, activations: tens of MB) with malloc each step; with glibc's
defaults those come from fresh mmap()s, so every step pays page faults and zeroing on them: an 8M-element
elementwise op measured 3-5x slower than with the buffers kept in the heap (``docs/model.md``). Raising
the mmap and trim thresholds keeps freed memory for reuse. XLA:CPU also allocates from its worker threads,
and glibc gives each thread its own arena, whose memory is returned to the kernel (and faulted in again, about
230,000 minor faults per ``bench step`` step) whatever the main arena's thresholds: one arena
(``M_ARENA_MAX=1``) removes those faults. The one arena is never trimmed and grows in steps of 2 GiB
(``M_TOP_PAD``): a step's temporary buffer (820 MB for ``bench step``'s default shape) is freed asynchronously,
after the step's outputs are ready, so the next step sometimes allocates a second one before the first is
back; with a bounded trim threshold the heap then grew and was trimmed again every few steps, and each regrowth
cost about 220,000 page faults (0.3-1.7 s of system time) in that step. Now the heap reaches its steady size
in the first steps and stays there (its peak is held until the process ends).

An arena is bound to a thread at its first malloc, so the one-arena setting must be made before JAX starts
its thread pools. Applied when the step is built (``train.step.choose_ops``, with the CPU backend), it is too
late: measured at ``bench step``'s shape (5 steps after 3 warm-up, ``getrusage``; glibc's ``malloc_info``),
16 arenas, about 204,000 minor faults and 0.56-0.62 s of system time per step, against 1 arena, 41,000-82,000
faults and 0.10-0.17 s when applied first thing. So the CLI calls :func:`tune_malloc_for_cpu` before any
command runs; it applies the tuning only where JAX is going to run on the CPU (:func:`cpu_backend_expected`,
judged without starting JAX), and the step's build applies it again (the thresholds still take effect then,
for a library caller). Applied once, on Linux/glibc; ``MEDSCALE_MALLOPT=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_done = False


def tune_malloc() -> bool:
    global _done
    if _done or os.environ.get("MEDSCALE_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # trim threshold -1 is SIZE_MAX for glibc (never trim); top pad: the most mallopt's int allows
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
              and libc.mallopt(_M_TOP_PAD, 2**31 - 1) == 1 and libc.mallopt(_M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):
        return False
    _done = True
    log.debug("mallopt applied: %s", ok)
    return ok


def cpu_backend_expected() -> bool:
    """Whether JAX will run on its CPU backend, judged without starting it: the first of ``JAX_PLATFORMS``
    where that is set, else whether no accelerator plugin is installed (``jax_plugins`` entry points or
    namespace packages, which is how JAX finds its GPU plugins, or ``libtpu``)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins  # the namespace package of JAX's PJRT plugins (not JAX itself)
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))


def tune_malloc_for_cpu() -> bool:
    """:func:`tune_malloc` where JAX is going to run on the CPU; call it before JAX starts (the CLI does)."""
    return cpu_backend_expected() and tune_malloc()
