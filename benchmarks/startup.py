"""What the autoload hook (``hf_svdq_autoload.pth``) adds to every interpreter start.

Runs ``python -c pass`` N times with the hook on and N times with ``HF_SVDQ_NO_AUTOLOAD=1``,
interleaved, and prints the medians and their difference in milliseconds (target: < 5 ms), plus
the modules the hook leaves imported. Also checks the hook still registers when transformers'
quantizers are imported.

    python benchmarks/startup.py [--runs 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _start(env: dict[str, str]) -> float:
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    on = {k: v for k, v in os.environ.items() if k != "HF_SVDQ_NO_AUTOLOAD"}
    off = {**on, "HF_SVDQ_NO_AUTOLOAD": "1"}
    for _ in range(3):  # warm the file cache and .pyc files
        _start(on), _start(off)
    with_hook, without = [], []
    for _ in range(args.runs):
        with_hook.append(_start(on))
        without.append(_start(off))
    probe = "import sys; print(sorted(m for m in sys.modules if m.startswith('hf_svdq')))"
    loaded = subprocess.run([sys.executable, "-c", probe], env=on, check=True, capture_output=True, text=True).stdout.strip()
    check = "import transformers.quantizers.auto as a; print('svdq' in a.AUTO_QUANTIZER_MAPPING)"
    registered = subprocess.run([sys.executable, "-c", check], env=on, check=True, capture_output=True, text=True).stdout.strip()
    median_on, median_off = statistics.median(with_hook) * 1e3, statistics.median(without) * 1e3
    print(json.dumps({"runs": args.runs, "median_ms_with_hook": round(median_on, 2), "median_ms_opted_out": round(median_off, 2),
                      "added_ms": round(median_on - median_off, 2), "modules_loaded": loaded,
                      "registers_with_transformers": registered == "True"}))


if __name__ == "__main__":
    main()
