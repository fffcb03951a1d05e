"""Decode speed of the GGUF export in llama.cpp, next to hf_svdq and dense transformers, in one run.

Compresses SmolLM2-135M-Instruct as INT4 g64 + rank-24 correction (data-free), exports it
(``model.gguf`` + ``lora.gguf``), and times greedy decoding of ``--new-tokens`` tokens after a short
prompt, ``--repeats`` times interleaved, at ``--threads`` threads:

* dense transformers (float32 ``generate``), the baseline;
* hf_svdq (the compressed model, ``generate``);
* llama.cpp (llama-cpp-python) on the base + LoRA adapter, and on the base alone (the LoRA's cost).

Prints one JSON line per engine with median tokens/s and the ratio to dense. Needs the
``[serve-test]`` extra.

    python benchmarks/serving.py [--threads 2] [--repeats 3] [--new-tokens 64] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import emit  # benchmarks/ is on sys.path when a script runs
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint
from hf_svdq.publishing.gguf_export import export_gguf

PROMPT = "The capital of France is"


def _hf_rate(model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def _llama_rate(llm, prompt: list[int], new_tokens: int) -> float:
    llm.reset()
    start = time.perf_counter()
    count = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        count += 1
        if count == new_tokens:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, quantization_config=SVDQuantConfig(rank=24, residual_bits=4, group_size=64)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(Path(tmp) / "ckpt")
        result = export_gguf(Path(tmp) / "ckpt", Path(tmp) / "gguf", tokenizer=path, progress=False)
        common = {"n_ctx": 512, "n_threads": args.threads, "n_threads_batch": args.threads, "verbose": False}
        with_lora = llama_cpp.Llama(model_path=str(result.base), lora_path=str(result.adapter), **common)
        base_only = llama_cpp.Llama(model_path=str(result.base), **common)
        engines = {
            "dense transformers": lambda: _hf_rate(dense, ids, args.new_tokens),
            "hf_svdq": lambda: _hf_rate(ours, ids, args.new_tokens),
            "llama.cpp base + LoRA": lambda: _llama_rate(with_lora, ids[0].tolist(), args.new_tokens),
            "llama.cpp base only": lambda: _llama_rate(base_only, ids[0].tolist(), args.new_tokens),
        }
        for run in engines.values():  # warm-up (numba compile, caches)
            run()
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, run in engines.items():
                rates[name].append(run())
    baseline = statistics.median(rates["dense transformers"])
    for name, values in rates.items():
        row = {"engine": name, "threads": args.threads, "new_tokens": args.new_tokens,
               "tokens_per_s": round(statistics.median(values), 2), "x_dense": round(statistics.median(values) / baseline, 2),
               "runs": [round(v, 2) for v in values]}
        emit(row, args.json)


if __name__ == "__main__":
    main()
