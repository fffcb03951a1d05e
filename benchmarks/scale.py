"""Compression at the sizes people compress: time and peak memory on random models of real shapes.

Builds (once, cached beside the hf_svdq cache) bf16 Llama checkpoints with random weights (normal,
std 0.02; norms 1) of real dimensions and SmolLM2's tokenizer (vocab 49152, untied head):

* ``1b``: Llama-3.2-1B's blocks (hidden 2048, MLP 8192, 32 heads, 8 KV heads, 16 blocks): 1.17B parameters;
* ``mid``: a quick shape for memory checks (hidden 1024, MLP 4096, 16 heads, 4 KV heads, 24 blocks);
* ``8b``: Llama-3.1-8B's blocks (hidden 4096, MLP 14336, 32 heads, 8 KV heads, 32 blocks); ``--blocks N``
  builds it with N blocks only (peak memory must not grow with N; ``benchmarks/peak_by_block.py``
  shows where it goes).

Each row compresses one with :func:`hf_svdq.streaming.compress_checkpoint` (what ``hf-svdq compress``
runs) in a fresh process, under cProfile, and reports wall time, seconds per billion parameters, peak
RSS (the process's ``ru_maxrss``), peak / checkpoint size, and where the time went. A random model says
nothing about quality: only time and memory are measured here.

    python benchmarks/scale.py --shape 1b --modes recommended,data-free
    python benchmarks/scale.py --shape 8b --blocks 2 --modes recommended

One JSON row per run, appended to ``benchmarks/results/scale.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {
    "mid": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "num_key_value_heads": 4},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}

MODES = {
    "recommended": "SVDQuantConfig.recommended()",
    "data-free": "SVDQuantConfig(target_bits_per_weight=5.0, residual_bits=4, group_size=64)",
    "mixed-data-free": "SVDQuantConfig(target_bits_per_weight=5.0, residual_bits=4, group_size=64, bit_choices=[4, 8])",
    "calibrated-rank": "SVDQuantConfig(rank=256, calibration=CalibrationConfig.coerce_source('default', n_samples=32, seq_len=256))",
}

PROFILED = {
    "GPTQ": "quantize_gptq", "Cholesky of the damped Gram": "hessian_root", "its triangular inverse (GPTQ)": "upper_inverse",
    "low-rank step": "whitened_low_rank", "its eigendecompositions": "leading_singular", "spectra (eigenvalues)": "singular_values",
    "budget spectra": "layer_curve", "round-to-nearest": "quantize_rtn", "Gram accumulation": "_accumulate",
    "block forwards": "run_block", "reading weights": "read", "writing blocks": "save_block",
    "refit of left factors": "refit_left",
}


def build(shape: str, blocks: int | None, root: Path) -> Path:
    """The random checkpoint of ``shape`` (with ``blocks`` blocks), built once into ``root``."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from hf_svdq.real_model import smollm2_checkpoint
    from hf_svdq.streaming.reader import skeleton

    dims = dict(SHAPES[shape])
    if blocks is not None:
        dims["num_hidden_layers"] = blocks
    folder = root / f"random-llama-{shape}-{dims['num_hidden_layers']}blocks"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = tf.LlamaConfig(vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=8192,
                            rope_theta=500000.0, dtype="bfloat16", **dims)
    model = skeleton(config, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.state_dict().items():
        parts = name.split(".")
        shard = f"block{int(parts[2]):03d}" if name.startswith("model.layers.") else "rest"
        value = (torch.ones(param.shape) if param.dim() == 1
                 else torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        shards.setdefault(shard, {})[name] = value
    weight_map = {}
    for number, (shard, tensors) in enumerate(sorted(shards.items()), start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    source = smollm2_checkpoint()
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copyfile(file, folder / file.name)
    (folder / "done").write_text("ok\n")
    return folder


_CHILD = r"""
import cProfile, json, pstats, resource, sys, time
from hf_svdq import CalibrationConfig, SVDQuantConfig
from hf_svdq.streaming import compress_checkpoint
source, out, mode, profiled = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
config = eval(mode)
profile = cProfile.Profile()
start = time.perf_counter()
profile.enable()
done = compress_checkpoint(source, out, config, progress=True, overwrite=True)
profile.disable()
wall = time.perf_counter() - start
stats = pstats.Stats(profile).stats
split = {}
for label, function in profiled.items():
    split[label] = round(sum(v[3] for k, v in stats.items() if k[2] == function), 1)
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                               "expected_peak": done.estimate.total, "split_s": split}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--modes", default="recommended")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--root", type=Path, default=None, help="where the random checkpoints are cached")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "scale.jsonl")
    args = parser.parse_args()

    from moe_decode import cpu as cpu_name

    from hf_svdq.real_model import cache_root

    root = args.root or cache_root() / "scale"
    folder = build(args.shape, args.blocks, root)
    checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    h, m, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    params = n * (2 * h * h + 2 * h * kv + 3 * h * m + 2 * h) + 2 * config["vocab_size"] * h + h
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print("| shape | blocks | parameters | mode | wall | s / B params | peak RSS | peak / checkpoint | expected peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            out = Path(scratch) / "out"
            run = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), MODES[mode], json.dumps(PROFILED)],
                                 env=env, stdout=subprocess.PIPE, text=True, check=True)
        line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        row = {"benchmark": "scale", "cpu": cpu_name(), "threads": args.threads or os.cpu_count(), "shape": args.shape,
               "blocks": n, "parameters": params, "mode": mode, "config": MODES[mode], "checkpoint_bytes": checkpoint,
               **result, "s_per_billion": result["wall_s"] / (params / 1e9),
               "peak_over_checkpoint": result["peak_rss"] / checkpoint}
        print(f"| {args.shape} | {n} | {params / 1e9:.2f}B | {mode} | {result['wall_s'] / 60:.1f} min | "
              f"{row['s_per_billion']:.0f} | {result['peak_rss'] / 1e9:.2f} GB | {row['peak_over_checkpoint']:.2f}x | "
              f"{result['expected_peak'] / 1e9:.2f} GB |")
        print("   time split (s): " + ", ".join(f"{k} {v}" for k, v in result["split_s"].items()))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
