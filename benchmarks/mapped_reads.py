"""Does reading a checkpoint block by block leave its pages resident? RSS (anonymous / file-backed) while
the blocks of a sharded checkpoint are read one after another, every page touched, each block dropped.

    python benchmarks/mapped_reads.py [FOLDER] [--copy none|outside|all]

FOLDER defaults to the 1B-shaped checkpoint ``benchmarks/scale.py`` builds. ``--copy outside`` clones the
tensors outside the blocks (embeddings, head), ``all`` every tensor read (what was tried and reverted).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from safetensors import safe_open


def rss_mb() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith(("RssAnon", "RssFile")))
    return {k: int(v.split()[0]) // 1024 for k, v in fields.items()}


def main() -> None:
    from hf_svdq.real_model import cache_root

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=cache_root() / "scale" / "random-llama-1b-16blocks")
    parser.add_argument("--copy", choices=["none", "outside", "all"], default="none")
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    weight_map = json.loads((args.folder / "model.safetensors.index.json").read_text())["weight_map"]

    def read(names: list[str]) -> dict:
        out = {}
        for name in names:
            with safe_open(str(args.folder / weight_map[name]), "pt") as handle:
                out[name] = handle.get_tensor(name)
        return out

    outside = read([k for k in weight_map if not k.startswith("model.layers.")])
    if args.copy != "none":
        outside = {k: v.clone() for k, v in outside.items()}
    print("outside tensors read", rss_mb())
    for i in range(args.blocks):
        block = read([k for k in weight_map if k.startswith(f"model.layers.{i}.")])
        if args.copy == "all":
            block = {k: v.clone() for k, v in block.items()}
        sum(float(v.float().sum()) for v in block.values())  # touch every page
        del block
        gc.collect()
        print(f"after block {i}", rss_mb())


if __name__ == "__main__":
    main()
