"""Memory of loading a mixture-of-experts model with quantize-on-load, against a dense load.

Builds the random Mixtral of ``moe_decode.py`` (default 8 experts, hidden 1024, expert width 2816, 4 blocks;
1.35 GB float32), saves it, then in a fresh child process each: a dense ``from_pretrained``, and one with
``SVDQuantConfig(rank=...)`` (pure low rank: every expert stack is factorized as transformers' loader hands
it over, merged from the per-expert checkpoint tensors). Each child reports the anonymous memory the load
added at its peak (sampled every 2 ms; the checkpoint's mmapped pages are not anonymous) and after it.
The largest expert stack is printed beside them: quantize-on-load should add about one stack (plus its
per-expert tensors as the loader collects them), not the model.

    python benchmarks/moe_memory.py [--rank 64] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import emit
from moe_decode import build, cpu


def child(folder: str, rank: int) -> None:
    import torch
    from _memory import AnonPeak, anon_rss
    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQuantConfig

    torch.set_num_threads(1)
    config = SVDQuantConfig(rank=rank) if rank else None
    kwargs = {"quantization_config": config} if config is not None else {}
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

    before = anon_rss()
    with AnonPeak() as peak:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    after = anon_rss()
    print(json.dumps({"added_peak": peak.peak - before, "added_after": after - before,
                      "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "moe-memory.jsonl")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(f"# CPU: {cpu()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dense"
        build(folder, args.experts, args.hidden, args.width, args.layers, 2)
        checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        stack = args.experts * 2 * args.width * args.hidden * 4  # the gate_up stack, float32
        rows = {}
        for name, rank in (("dense", 0), (f"quantize-on-load rank {args.rank}", args.rank)):
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(rank)], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            rows[name] = json.loads(out)
        for name, row in rows.items():
            emit({"benchmark": "moe_memory", "cpu": cpu(), "load": name, "checkpoint_bytes": checkpoint,
                  "largest_stack_bytes": stack, **row, "peak_over_checkpoint": row["added_peak"] / checkpoint,
                  "peak_over_stack": row["added_peak"] / stack}, args.results)


if __name__ == "__main__":
    main()
