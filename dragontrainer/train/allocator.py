"""The C allocator, set up once per process before training.

glibc's malloc hands every block above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB)
straight to the kernel and gives freed heap tops back above its trim threshold. A training step on the
CPU allocates and frees the same large activations and gradients every step (a 256×48×32×32 float
activation is 50 MB), so each one is a fresh mmap, zero-filled page by page on first touch and unmapped
again: millions of minor page faults and seconds of system time per epoch. Raising both thresholds once
keeps those blocks in the heap and reuses them. Measured in README ("Throughput").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the reused heap (the default peaks at 32 MiB)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: free heap tops are kept up to 2 GiB
OPT_OUT = "DRAGONTRAINER_MALLOC"  # =system: leave the allocator as the process found it
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_configured: bool | None = None


def configure_allocator(libc: ctypes.CDLL | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True when they were set.

    A no-op, never an error, where it does not apply: not Linux/glibc, a libc without `mallopt`, the
    user's own MALLOC_* / GLIBC_TUNABLES settings, or DRAGONTRAINER_MALLOC=system."""
    global _configured
    if _configured is not None and libc is None:
        return _configured
    done = False
    if os.environ.get(OPT_OUT, "").lower() != "system" and not any(os.environ.get(k) for k in USER_SETTINGS):
        done = _set_thresholds(libc)
    if libc is None:
        _configured = done
    return done


def _set_thresholds(libc: ctypes.CDLL | None) -> bool:
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(None)  # the process's own symbols: the libc malloc actually runs in
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or getattr(libc, "gnu_get_libc_version", None) is None:  # not glibc (musl, macOS)
        return False
    with contextlib.suppress(AttributeError, TypeError):  # a ctypes function: `int mallopt(int, int)`
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    try:
        # mallopt returns 1 on success; an older glibc refusing a value keeps its default
        mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        trim_set = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError, ctypes.ArgumentError, TypeError, ValueError):
        return False
    return mmap_set and trim_set
