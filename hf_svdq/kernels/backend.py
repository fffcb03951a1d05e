"""Which forward kernels run: compiled integer kernels, the fused numba kernels, or the pure-PyTorch reference.

``HF_SVDQ_KERNELS`` (read once, at the first compressed forward) chooses:

* ``auto`` (default): the compiled kernels where they build and the CPU has AVX2 (:data:`AUTO_COMPILED`),
  else the numba kernels when numba imports and the CPU has AVX2 and FMA, else the reference. On a CPU
  without AVX2 everything still runs, through the reference.
* ``cpp``: the compiled C++ kernels (:mod:`hf_svdq.kernels.cpp`: int8 activations, integer dot products,
  PyTorch's thread pool); an error if they cannot be built.
* ``numba``: the numba kernels whatever the CPU (an error if numba is missing).
* ``reference``: always the pure-PyTorch reference (:mod:`hf_svdq.kernels.reference`).

The fused kernels serve inputs of at most ``HF_SVDQ_DECODE_ROWS`` rows (batch x sequence; default
:data:`DEFAULT_DECODE_ROWS`); larger float32 inputs (prefill) are dequantized by numba and multiplied by
PyTorch, other dtypes take the reference. Layers the compiled kernels cannot take (an input width or
group size that is not a multiple of 32) take the numba kernels. One INFO line on the ``hf_svdq`` logger
says which is active and why.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType

import torch

from . import cpp
from .cpp import isa_name

logger = logging.getLogger("hf_svdq")

BACKEND_ENV = "HF_SVDQ_KERNELS"
ROWS_ENV = "HF_SVDQ_DECODE_ROWS"
BACKENDS = ("auto", "reference", "numba", "cpp")
AUTO_COMPILED = True
"""Whether ``auto`` picks the compiled kernels (where they build and the CPU has AVX2). Their int8
activations per block of 32 keep SmolLM2 INT4 g64 + r24's perplexity over 1,024 held-out tokens within
0.5% of the reference path (``tests/test_real_kernels.py``; measured +0.25%)."""
DEFAULT_DECODE_ROWS = 4
"""Largest input (rows = batch x sequence) given to the fused residual kernels. Measured on a 1536x576
layer, 1 thread: fused INT4 0.5-0.8 ms at 4 rows, ~1.0 ms at 8, against ~0.9 and ~1.2 ms for numba
dequantize + GEMM; INT8 already ties at 4 rows."""
LOW_RANK_FUSED_ROWS = 1
"""Low-rank layers use the fused kernel for single rows only: above, PyTorch's two thin GEMMs win."""
PARALLEL_MIN_WEIGHTS = 1 << 16
"""Layers with fewer weights than this run on one thread (a parallel launch costs more than it saves)."""


@dataclass(frozen=True)
class Backend:
    """The chosen kernels: ``module`` is :mod:`hf_svdq.kernels.numba_cpu` or ``None``; ``compiled`` the
    compiled extension (:mod:`hf_svdq.kernels.cpp`) or ``None``, run with instruction set ``isa``."""

    name: str
    module: ModuleType | None
    max_rows: int
    reason: str
    compiled: ModuleType | None = None
    isa: int = 0


def _cpu_has_avx2_fma() -> bool:
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return bool(features.get("avx2")) and bool(features.get("fma"))


def _max_rows() -> int:
    raw = os.environ.get(ROWS_ENV)
    if raw is None:
        return DEFAULT_DECODE_ROWS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{ROWS_ENV} must be a non-negative integer, got {raw!r}")
    return value


@functools.lru_cache(maxsize=1)
def active() -> Backend:
    """The backend of this process (chosen once; :func:`reset` forgets it, for tests)."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {choice!r}")
    rows = _max_rows()
    backend = _choose(choice, rows)
    if backend.compiled is not None:
        logger.info("hf_svdq kernels: compiled integer kernels (%s) for inputs of <= %d rows, numba or reference above "
                    "(%s; %s=numba or =reference to choose another)", isa_name(backend.isa), rows, backend.reason, BACKEND_ENV)
    elif backend.module is None:
        logger.info("hf_svdq kernels: pure-PyTorch reference (%s)", backend.reason)
    else:
        logger.info(
            "hf_svdq kernels: numba fused CPU kernels for inputs of <= %d rows, reference above (%s; %s=reference "
            "forces the reference)", rows, backend.reason, BACKEND_ENV,
        )
    return backend


def _choose(choice: str, rows: int) -> Backend:
    if choice == "reference":
        return Backend("reference", None, 0, f"{BACKEND_ENV}=reference")
    compiled, note = None, ""
    if choice == "cpp" or (choice == "auto" and AUTO_COMPILED):
        compiled, note = cpp.load()
        if compiled is None and choice == "cpp":
            raise ImportError(f"{BACKEND_ENV}=cpp but {note}")
        if compiled is not None and choice == "auto" and cpp.isa(compiled) < cpp.ISAS["avx2"]:
            compiled, note = None, "the compiled kernels need AVX2 to pay"
    numba_module, numba_note = _numba(choice)
    if compiled is not None:
        return Backend("cpp", numba_module, rows, note, compiled, cpp.isa(compiled))
    if numba_module is None:
        return Backend("reference", None, 0, "; ".join(n for n in (note, numba_note) if n))
    reason = f"{note}; {numba_note}" if note else numba_note
    return Backend("numba", numba_module, rows, reason)


def _numba(choice: str) -> tuple[ModuleType | None, str]:
    """The numba kernels (also what the compiled backend uses for prefill) and a note."""
    try:
        import numba

        from . import numba_cpu as kernels_numba
    except ImportError as err:
        if choice == "numba":
            raise ImportError(f"{BACKEND_ENV}=numba but numba cannot be imported: {err}") from err
        return None, f"numba unavailable: {err}"
    if choice == "auto" and not _cpu_has_avx2_fma():
        return None, "this CPU lacks AVX2/FMA; the fused kernels would not pay"
    return kernels_numba, f"numba {numba.__version__}, {BACKEND_ENV}={choice}"


def reset() -> None:
    """Forget the chosen backend so the next forward reads the environment again."""
    active.cache_clear()


_parallel_lock = threading.Lock()
_parallel_is_thread_safe: bool | None = None


def threads_for(weights: int) -> int:
    """Threads for a layer of ``weights`` weights: torch's intra-op count, 1 for small layers."""
    threads = torch.get_num_threads()
    if threads <= 1 or weights < PARALLEL_MIN_WEIGHTS:
        return 1
    import numba

    threads = min(threads, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(threads)
    return threads


SPIN_COUNT = "1000000"
"""``GOMP_SPINCOUNT`` given to numba's OpenMP runtime only (see :func:`run_parallel`)."""


def run_parallel(kernel, *args):  # type: ignore[no-untyped-def]
    """Launch a numba ``parallel=True`` kernel; serialized when numba's threading layer is not
    thread-safe (``workqueue``), so two Python threads generating at once stay correct.

    numba's OpenMP runtime is a second one beside PyTorch's, and its workers go to sleep between
    SmolLM2-sized layers, so waking them cost as much as the split saved. The first launch (which
    loads that runtime) therefore sees ``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT` unless the user set it
    or ``OMP_WAIT_POLICY``; PyTorch's runtime read its environment at ``import torch`` and is not
    affected. Measured at 2 threads (INT4 g64 + r24 SmolLM2, medians of 5): 48.7 -> 43.2 ms/token."""
    if _parallel_is_thread_safe:
        return kernel(*args)
    with _parallel_lock:
        if _parallel_is_thread_safe is None:
            return _first_launch(kernel, *args)
        return kernel(*args)


def _first_launch(kernel, *args):  # type: ignore[no-untyped-def]
    global _parallel_is_thread_safe
    import numba

    set_spin = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    if set_spin:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        result = kernel(*args)
    finally:
        if set_spin:
            os.environ.pop("GOMP_SPINCOUNT", None)
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet: decide at the next launch
        return result
    _parallel_is_thread_safe = layer in ("omp", "tbb")
    return result
