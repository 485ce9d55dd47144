"""The C allocator of the process that runs the model: freed memory kept for the next step.

A step of the model on the CPU allocates and frees the same few-megabyte tensors again and again
(a layer's gathered keys and values, its attention's inputs). glibc's malloc serves blocks above
its mmap threshold with a fresh mapping and returns them to the kernel when freed, and it gives
back the free top of a heap above its trim threshold: the next step then takes a page fault for
every page it touches again. Its own remedy, raising the thresholds as it sees large blocks freed,
did not help in the server's model process (measured on llama-35m, 32 streams, `--attention varlen`:
115 tokens/s there against 195 for the same steps in a benchmark's process; 207 with the
thresholds set). `keep_freed_memory` sets both thresholds once, so freed blocks stay in the
process: its resident size stays at its high-water mark instead of shrinking between steps,
which a server that holds a KV cache sized for its peak does anyway.

It leaves the allocator alone where it is not glibc's, or where the operator chose its settings
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES` with malloc tunables, or a
preloaded allocator such as jemalloc or tcmalloc).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes an int: the largest, so that no block the model frees goes back to the kernel.
KEEP = 2**31 - 1

_lock = threading.Lock()
_decided: str | None = None  # what the first call did


def operator_choice(environ: Mapping[str, str] = os.environ) -> str | None:
    """What in the environment already chose the allocator's settings, or None."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name in environ:
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> str:
    """Set glibc malloc's mmap and trim thresholds for this process, once; says what it did."""
    global _decided
    with _lock:
        if _decided is None:
            _decided = _apply()
            log.debug("allocator: %s", _decided)
        return _decided


def state() -> str | None:
    """What `keep_freed_memory` did in this process, or None before it was called."""
    return _decided


def _apply() -> str:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "left alone: not glibc"
    if (chosen := operator_choice()) is not None:
        return f"left alone: {chosen} is set"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "left alone: mallopt not found"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, KEEP) and mallopt(M_TRIM_THRESHOLD, KEEP)):
        return "left alone: mallopt refused the thresholds"
    return "freed memory kept (mmap and trim thresholds set)"
