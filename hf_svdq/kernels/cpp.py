"""The compiled decode kernels (``csrc/svdq_cpu.cpp``): built on first use, cached, or absent.

Compiled once per machine and torch version with :func:`torch.utils.cpp_extension.load` (g++ and ninja;
the sources ship in the wheel, so ``pip install`` needs no compiler) into ``HF_SVDQ_KERNEL_CACHE`` (default:
``~/.cache/hf_svdq/kernels``); later processes load the cached library in milliseconds. Compiling on first
use rather than at install keeps the wheel pure Python and lets one build serve every x86-64 CPU: the
library carries AVX2, AVX-VNNI and AVX-512 VNNI variants and picks one at run time from the CPU's
features (never ``-march=native``). A failed build (no compiler, no ninja, an old compiler) is logged once
with the reason and the numba kernels run instead.

``HF_SVDQ_ISA`` (``avx512vnni``, ``avxvnni``, ``avx2``, ``scalar``) caps the instruction set, so tests
exercise every variant this CPU can run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("hf_svdq")
SOURCES = Path(__file__).resolve().parent / "csrc"
CACHE_ENV = "HF_SVDQ_KERNEL_CACHE"
DISABLE_ENV = "HF_SVDQ_COMPILED"
"""``HF_SVDQ_COMPILED=0`` disables the compiled kernels, as on a machine without a compiler (CI runs the kernel
tests both ways)."""
ISA_ENV = "HF_SVDQ_ISA"
ISAS = {"scalar": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3}
"""Instruction-set variants in the library, by the number the C++ side uses."""


def cache_dir() -> Path:
    """One folder per torch version and source contents, so a changed source never meets a stale build."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_svdq" / "kernels"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCES.glob("*.[ch]*")))).hexdigest()[:12]
    return Path(root) / f"torch-{torch.__version__.replace('+', '-')}-{digest}"


@functools.lru_cache(maxsize=1)
def load() -> tuple[ModuleType | None, str]:
    """The compiled module (None when it cannot be built) and a sentence saying what happened."""
    from torch.utils import cpp_extension

    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        return None, f"the compiled kernels are disabled ({DISABLE_ENV}=0)"
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("hf_svdq_cpu*.so")):
        logger.info("hf_svdq: building the compiled decode kernels once into %s (about 25 s of one core)", folder)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name="hf_svdq_cpu",
            sources=[str(SOURCES / "svdq_cpu.cpp")],
            extra_include_paths=[str(SOURCES)],
            extra_cflags=["-O3", "-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - any build or load failure means "use the numba kernels"
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return None, f"the compiled kernels could not be built in {folder} ({type(err).__name__}: {reason[:300]})"
    seconds = time.perf_counter() - start
    return module, f"compiled kernels from {folder} ({seconds:.1f} s to build or load)"


def isa(module: ModuleType) -> int:
    """The instruction set to run: the best this CPU supports, at most ``HF_SVDQ_ISA``."""
    raw = os.environ.get(ISA_ENV, "").strip().lower()
    if not raw:
        return int(module.best_isa())
    if raw not in ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {sorted(ISAS)}, got {raw!r}")
    return next(n for n in range(ISAS[raw], -1, -1) if module.supports(n))


def isa_name(number: int) -> str:
    return {v: k for k, v in ISAS.items()}[number]
