"""glibc malloc settings for gapcache's processes (no torch, no numpy import): :func:`tune_malloc`.

Usage::

    from gapcache.malloc import tune_malloc
    tune_malloc()        # True when set here and exported to child processes
"""

from __future__ import annotations

import os
import sys

#: glibc malloc settings of a gapcache process and its children (bytes): blocks below MMAP_THRESHOLD come from the
#: heap and up to TRIM_THRESHOLD of freed heap is kept for the next ones
MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 64 << 20
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}


def tune_malloc() -> bool:
    """Keep glibc from handing every freed block of a few MB back to the kernel (and faulting it in again, page by
    page, on the next allocation): ``mallopt`` here, and the same settings in the environment for the processes
    started after this (the analysis workers).  Called by ``run_analysis`` and ``Extraction.load``.

    The analysis allocates such blocks by the thousand (a padded group of token rows, a decoded shard layer):
    ``benchmarks/bench_analysis_phases.py STORE --metrics geometry`` on the demo store, best of 3 side by side:
    geometry 4.35 s against 5.78 s with glibc's own settings, the process's system CPU 1.35 s against 4.26 s (the
    whole analysis: 2.7 s against 3.7 s).  A CPU forward pass does too (every layer's activations): the bench
    model of ``benchmarks/bench_extract.py`` (hidden 512, 8 layers, batch 8 x 285 tokens), 10 batches on one
    thread, three alternating runs: bare forwards 12.5-12.7 s against 14.6-15.1 s, system CPU 0.0 s against
    2.4-2.5 s; with the hooks of Extraction.forward 12.6-13.0 s against 15.1-16.3 s.

    Costs at most TRIM_THRESHOLD of freed memory kept per malloc arena.  Skipped (False) off glibc, when the
    environment sets either variable already (the user's choice stands), or with ``GAPCACHE_MALLOC=default``
    (glibc's own)."""
    import ctypes
    import ctypes.util

    if (any(k in os.environ for k in _MALLOC_ENV) or os.environ.get("GAPCACHE_MALLOC") == "default"
            or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return False
    os.environ.update({k: str(v) for k, v in _MALLOC_ENV.items()})  # workers start with them (glibc reads them then)
    return True
