"""The compiled kernels alone on one token's worth of SmolLM2-135M layers: out of cache (as in decode) and in cache.

One token of SmolLM2-135M-Instruct INT4 g64 + r24 is 210 residual-layer calls (30 blocks of q, k, v, o
576x576 / 192x576, gate, up 1536x576, down 576x1536) reading 65 MB of codes, scales and factors. This builds
those layers with random codes (the speed does not depend on the values), calls the compiled kernel
(``forward``) on a 1-row input for each in turn, and reports the median ms per token and GB/s:

* **stream**: every layer its own weights, 65 MB in all, more than the last-level cache, as in decode;
* **cached**: the 7 layers of one block called 30 times (their 1.8 MB stay in cache): the compute alone.

Their difference is what memory costs beyond the compute. Per instruction set this CPU runs, 1 and 2 threads.
The kernel's signature is the one of every release since the compiled kernels came, so the same script
measures an older commit's kernels (``git stash; git checkout REV``).

    python benchmarks/kernel_stream.py [--repeats 15] [--isa avx512vnni,avx2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
"""(out, in) of one SmolLM2 block's q, k, v, o, gate, up, down."""


def layer(out_f: int, in_f: int, generator: torch.Generator, group: int = 64, rank: int = 24) -> tuple:
    """Arguments of one INT4 g64 + r24 ``forward`` call (after the input), random codes."""
    codes = torch.randint(0, 256, (out_f, in_f // group, group // 2), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(out_f, in_f // group, generator=generator) * 0.01).half()
    zero = torch.randint(0, 16, (out_f, in_f // group), dtype=torch.uint8, generator=generator)
    u = torch.randint(-127, 128, (out_f, rank), dtype=torch.int8, generator=generator)
    vh = torch.randint(-127, 128, (rank, in_f), dtype=torch.int8, generator=generator)
    return (codes, scale, zero, 4, group, out_f, u, torch.rand(out_f, generator=generator), vh,
            torch.rand(rank, generator=generator), None)


def token_ms(module, calls: list[tuple], isa: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    from hf_svdq.kernels.backend import PARALLEL_MIN_WEIGHTS

    def token() -> None:
        for x, args in calls:
            module.forward(x, *args, isa, PARALLEL_MIN_WEIGHTS)

    for _ in range(3):
        token()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        token()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    from _results import emit
    from moe_decode import cpu

    from hf_svdq.kernels import cpp

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--isa", default="avx512vnni,avxvnni,avx2")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "kernel-stream.jsonl")
    args = parser.parse_args()
    module, note = cpp.load()
    if module is None:
        raise SystemExit(note)
    print(f"CPU: {cpu()}; {note}", flush=True)
    generator = torch.Generator().manual_seed(0)
    streamed = [(torch.randn(1, 1, i), layer(o, i, generator)) for _ in range(30) for o, i in SHAPES]
    block = streamed[: len(SHAPES)]
    cached = block * 30
    nbytes = sum(sum(t.numel() * t.element_size() for t in a if isinstance(t, torch.Tensor)) for _, a in streamed)
    isas = [name for name in args.isa.split(",") if module.supports(cpp.ISAS[name])]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name in isas:
            stream = token_ms(module, streamed, cpp.ISAS[name], args.repeats)
            compute = token_ms(module, cached, cpp.ISAS[name], args.repeats)
            emit({"benchmark": "kernel-stream", "cpu": cpu(), "threads": threads, "isa": name, "MB per token": nbytes / 1e6,
                  "stream ms": stream, "cached ms": compute, "stream GB/s": nbytes / stream / 1e6}, args.results)


if __name__ == "__main__":
    main()
