"""Does the peak memory of a streamed compression grow with the number of blocks? Where does it go?

Compresses a random model of ``benchmarks/scale.py``'s shapes (same cache) with
:func:`hf_svdq.streaming.compress_checkpoint` in a fresh process per run, and records:

* after each block is written and dropped: RSS, anonymous and file-backed RSS, the glibc heap's RSS;
* the peak (sampled every second), split by mapping (anonymous mappings, heap, checkpoint files, libraries);
* ``VmHWM`` at the end (the kernel's own peak: what ``ru_maxrss`` reports).

Run it with two block counts, and repeat each (the peak varies from run to run with the allocator's state):

    python benchmarks/peak_by_block.py --shape mid --blocks 4 --repeat 2
    python benchmarks/peak_by_block.py --shape mid --blocks 24

One JSON row per run, appended to ``benchmarks/results/peak-by-block.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_CHILD = r"""
import collections, json, sys, threading, time
from pathlib import Path
from _memory import _status as status
from hf_svdq import SVDQuantConfig
from hf_svdq.streaming import compress_checkpoint
from hf_svdq.streaming import reader

def mappings():
    sizes, name = collections.Counter(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
            name = parts[5] if len(parts) > 5 else "[anonymous]"
            name = "checkpoint files" if name.endswith(".safetensors") else name
            name = "libraries" if ".so" in name else name
        elif parts and parts[0] == "Rss:":
            sizes[name] += int(parts[1]) * 1024
    return dict(sizes.most_common(6))

peak, blocks, done = {"rss": 0}, [], threading.Event()

def sample():
    while not done.is_set():
        now = status()
        if now["VmRSS"] > peak["rss"]:
            peak.update(rss=now["VmRSS"], anon=now["RssAnon"], file=now["RssFile"], mappings=mappings())
        time.sleep(1.0)

close = reader.DiskBlocks.close

def traced(self, index, block, compressed):
    close(self, index, block, compressed)
    now = status()
    blocks.append({"block": index, "rss": now["VmRSS"], "anon": now["RssAnon"], "file": now["RssFile"],
                   "heap": mappings().get("[heap]", 0), "hwm": now["VmHWM"]})

reader.DiskBlocks.close = traced
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
compress_checkpoint(sys.argv[1], sys.argv[2], eval(sys.argv[3]), progress=False, overwrite=True)
wall = time.perf_counter() - start
done.set()
print("RESULT " + json.dumps({"wall_s": wall, "hwm": status()["VmHWM"], "sampled_peak": peak, "blocks": blocks}))
"""


def main() -> None:
    import tempfile

    from moe_decode import cpu as cpu_name
    from scale import MODES, SHAPES, build

    from hf_svdq.real_model import cache_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--mode", choices=sorted(MODES), default="recommended")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "peak-by-block.jsonl")
    args = parser.parse_args()
    root = cache_root() / "scale"
    folder = build(args.shape, args.blocks, root)
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    gb = 1e9
    print("| shape | blocks | run | wall | peak (VmHWM) | at the sampled peak: anon / file | heap after first / last block |")
    print("|---|---|---|---|---|---|---|")
    peaks = []
    for run_number in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            run = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(Path(scratch) / "out"), MODES[args.mode]],
                                 env=env, stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
        last_pass = result["blocks"][-n:]
        peaks.append(result["hwm"])
        sampled = result["sampled_peak"]
        print(f"| {args.shape} | {n} | {run_number + 1} | {result['wall_s'] / 60:.1f} min | {result['hwm'] / gb:.2f} GB | "
              f"{sampled['anon'] / gb:.2f} / {sampled['file'] / gb:.2f} GB | "
              f"{last_pass[0]['heap'] / gb:.2f} / {last_pass[-1]['heap'] / gb:.2f} GB |")
        row = {"benchmark": "peak-by-block", "cpu": cpu_name(), "shape": args.shape, "blocks": n, "mode": args.mode,
               "run": run_number + 1, **result}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    if len(peaks) > 1:
        print(f"peak over {len(peaks)} runs: median {statistics.median(peaks) / gb:.2f} GB, "
              f"range {min(peaks) / gb:.2f}-{max(peaks) / gb:.2f} GB")


if __name__ == "__main__":
    main()
