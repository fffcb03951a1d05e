"""Benchmark on SmolLM2-135M-Instruct: quantize-on-load vs plain load, checkpoint bytes, decode speed.

Every variant runs in its own child process (clean peak-memory readings); the parent prints one
table of medians and ratios against the dense baseline measured in the same run.

    python benchmarks/load_and_decode.py [--repeats 3] [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "dense": None,
    # plain SVD at full rank on k/v/down: only INT8 rounding is lost (the real-model test's safe policy)
    "safe (k,v,down full)": {"*.k_proj": 192, "*.v_proj": 192, "*.down_proj": 576},
    # the seeds' uniform style: every attention+MLP linear at rank 128 (plain SVD: quality is garbage)
    "uniform rank 128": 128,
}


def child(variant: str, out: Path, tokens: int) -> dict:
    sys.path.insert(0, str(HERE))
    import _memory as mem
    import torch
    from transformers import AutoModelForCausalLM

    import hf_svdq
    from hf_svdq.real_model import smollm2_checkpoint

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    path = smollm2_checkpoint()
    rank = VARIANTS[variant]
    baseline, baseline_anon = mem.rss(), mem.anon_rss()
    mem.reset_peak()
    start = time.perf_counter()
    with mem.AnonPeak() as anon:
        if rank is None:
            model = AutoModelForCausalLM.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_svdq.SVDQuantConfig(rank=rank))
    load_s = time.perf_counter() - start
    result = {
        "load_s": load_s,
        "peak_rss": mem.peak_rss(),
        "peak_rss_over_baseline": mem.peak_rss() - baseline,
        "peak_anon_over_baseline": anon.peak - baseline_anon,
    }
    model.save_pretrained(out)
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    ids = torch.tensor([[1, 504, 3458, 282, 2115, 314]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    result["decode_tok_s"] = tokens / (time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.out, args.tokens)))
        return

    from hf_svdq.real_model import smollm2_checkpoint

    dense_file_bytes = sum(f.stat().st_size for f in smollm2_checkpoint().glob("*.safetensors"))
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, variant in enumerate(VARIANTS):  # interleaved, so machine noise hits all variants alike
                out = Path(tmp) / f"{i}-{repeat}"
                cmd = [sys.executable, __file__, "--child", variant, "--out", str(out), "--tokens", str(args.tokens)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                runs[variant].append(json.loads(line))
    table = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    dense = table["dense"]
    print(f"SmolLM2-135M-Instruct, float32, CPU threads={os.environ.get('BENCH_THREADS', '1')}, "
          f"medians of {args.repeats}; dense checkpoint {dense_file_bytes / 1e6:.0f} MB")
    header = (f"{'variant':<26} {'load s':>7} {'x dense':>8} {'peak RSS MB':>12} {'/ckpt':>6} {'load RSS+ MB':>13} "
              f"{'/ckpt':>6} {'anon+ MB':>9} {'ckpt MB':>8} {'x dense':>8} {'tok/s':>6} {'x dense':>8}")
    print(header)
    for variant, row in table.items():
        print(
            f"{variant:<26} {row['load_s']:>7.2f} {row['load_s'] / dense['load_s']:>8.2f} "
            f"{row['peak_rss'] / 1e6:>12.0f} {row['peak_rss'] / dense_file_bytes:>6.2f} "
            f"{row['peak_rss_over_baseline'] / 1e6:>13.0f} {row['peak_rss_over_baseline'] / dense_file_bytes:>6.2f} "
            f"{row['peak_anon_over_baseline'] / 1e6:>9.0f} {row['checkpoint_bytes'] / 1e6:>8.0f} "
            f"{row['checkpoint_bytes'] / dense['checkpoint_bytes']:>8.3f} {row['decode_tok_s']:>6.1f} "
            f"{row['decode_tok_s'] / dense['decode_tok_s']:>8.2f}"
        )
    print("peak RSS: whole process (incl. ~250 MB of Python/torch/transformers); load RSS+: peak minus the RSS just "
          "before from_pretrained (incl. mmapped checkpoint pages); anon+: anonymous memory only, sampled every 2 ms")
    if args.json:
        args.json.write_text(json.dumps({"dense_file_bytes": dense_file_bytes, "medians": table, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
