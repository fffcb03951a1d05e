"""Give freed heap memory back to the OS between layers (glibc only; a no-op elsewhere).

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
def _malloc_trim() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
