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
in the first steps and stays there (its peak is held until the process ends). An arena is bound to a thread
at its first malloc, so this must run before JAX starts its thread pools: ``medscale``'s CLI calls it first
thing, and ``train.step.build`` calls it again (the thresholds still apply when JAX already runs). Applied once,
on Linux/glibc; ``MEDSCALE_MALLOPT=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
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
