"""Give freed heap memory back to the OS between layers, and keep large temporaries off the heap
(glibc only; no-ops elsewhere).

Each factorization allocates and frees several weight-sized temporaries; glibc keeps them in the
heap, so without a trim the process's resident memory after quantize-on-load varied run to run by
up to 300 MB on SmolLM2 (measured: anonymous RSS +155..+425 MB, +88 MB with a trim per layer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc's; musl has neither)
        return libc
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3
HEAP_LIMIT = 16 << 20
"""Allocations of at least this many bytes get their own mapping, returned to the OS when freed.

glibc raises its mmap threshold each time a large mapped block is freed (up to 32 MiB), after which
weight-sized temporaries of a compression land on the heap and fragment it. Measured on a random
24-block Llama (hidden 1024, MLP 4096; ``benchmarks/peak_by_block.py``), recommended mode: peak RSS
1.31-1.59 GB over 5 runs (4 and 24 blocks) with glibc's default, 1.07-1.27 GB over 4 with a fixed 16 MiB
threshold, no slower (1 MiB: 1.00 GB but 30% slower: every temporary's pages are faulted in anew)."""


@functools.lru_cache(maxsize=1)
def bound_heap() -> bool:
    """Fix glibc's mmap threshold at :data:`HEAP_LIMIT` for this process (once; True when it took).
    Called when a compression starts; the setting stays (it only ever returns memory sooner)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT))


def release_free_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
