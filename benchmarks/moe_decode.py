"""Decode speed of a mixture-of-experts model, dense vs compressed, paired in one process.

Builds a random Mixtral-shaped MoE (default: 8 experts, hidden 1024, expert width 2816, top-2, 4 blocks,
SmolLM2's vocabulary size), saves it, compresses it data-free (INT4 g64 + rank-24 INT8 correction on
attention and every expert stack), then times greedy ``generate`` of ``--tokens`` new tokens for the
dense float32 model and the compressed one in alternation inside one process (``--repeats`` rounds),
at each thread count. Prints the CPU, one JSON row per setting (medians and the paired ratio), and
appends the rows to ``benchmarks/results/moe-decode.jsonl``.

    python benchmarks/moe_decode.py [--experts 8] [--hidden 1024] [--layers 4] [--tokens 32] [--repeats 3]

A random model says nothing about quality; this measures speed and bytes only. At batch 1 the
compressed experts module reads only the routed experts' codes (per-expert views of the stacked
tensors, the same fused kernels as a compressed Linear).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import emit


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    return f"{model} ({', '.join(isa)})"


def build(folder: Path, experts: int, hidden: int, width: int, layers: int, top_k: int) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=4, num_local_experts=experts,
                           num_experts_per_tok=top_k, max_position_embeddings=512, tie_word_embeddings=True)
    model = MixtralForCausalLM(config)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(folder)


def timed(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2816, help="expert intermediate size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--results", type=Path, default=HERE / "results" / "moe-decode.jsonl")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQuantConfig

    print(f"# CPU: {cpu()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, packed_dir = Path(tmp) / "dense", Path(tmp) / "svdq"
        build(dense_dir, args.experts, args.hidden, args.width, args.layers, args.top_k)
        start = time.perf_counter()
        config = SVDQuantConfig(rank=24, residual_bits=4, group_size=64)
        AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config).save_pretrained(packed_dir)
        compress_s = time.perf_counter() - start
        sizes = {n: sum(f.stat().st_size for f in d.glob("*.safetensors")) for n, d in (("dense", dense_dir), ("svdq", packed_dir))}
        dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
        packed = AutoModelForCausalLM.from_pretrained(packed_dir).eval()
        ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
        for threads in args.threads:
            torch.set_num_threads(threads)
            timed(dense, ids, 4), timed(packed, ids, 4)  # warm-up (kernels compiled, caches filled)
            rates: dict[str, list[float]] = {"dense": [], "svdq": []}
            for _ in range(args.repeats):
                rates["dense"].append(timed(dense, ids, args.tokens))
                rates["svdq"].append(timed(packed, ids, args.tokens))
            ratios = [c / d for c, d in zip(rates["svdq"], rates["dense"])]
            emit({"benchmark": "moe_decode", "cpu": cpu(), "threads": threads, "experts": args.experts, "top_k": args.top_k,
                  "hidden": args.hidden, "expert_width": args.width, "layers": args.layers, "tokens": args.tokens,
                  "dense_tok_s": statistics.median(rates["dense"]), "svdq_tok_s": statistics.median(rates["svdq"]),
                  "paired_ratio_median": statistics.median(ratios), "paired_ratios": ratios,
                  "checkpoint_bytes": sizes, "compress_s": compress_s}, args.results)


if __name__ == "__main__":
    main()
