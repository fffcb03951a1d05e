"""Plain-SVD policies on SmolLM2-135M-Instruct vs dense: per-token logit cosine and top-1 agreement.

Evaluation text: 256 tokens of ../shared/data/text/prideprejudice.txt (no calibration involved).

    python benchmarks/logit_agreement.py [--text-dir ../shared/data/text] [--tokens 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint

POLICIES = {
    "k,v full rank (192)": {"*.k_proj": 192, "*.v_proj": 192},
    "k,v,down full rank (safe)": {"*.k_proj": 192, "*.v_proj": 192, "*.down_proj": 576},
    "k,v rank 160": {"*.k_proj": 160, "*.v_proj": 160},
    "v rank 96": {"*.v_proj": 96},
    "all linears rank 128": 128,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "text")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = (args.text_dir / "prideprejudice.txt").read_text()[5000:20000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(path)(ids).logits.double()[0]
    print(f"{'policy':<28} {'cos mean':>9} {'cos min':>8} {'top-1':>6}")
    for name, rank in POLICIES.items():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SVDQuantConfig(rank=rank))
        with torch.no_grad():
            logits = model(ids).logits.double()[0]
        cosine = torch.nn.functional.cosine_similarity(logits, dense, dim=-1)
        top1 = (logits.argmax(-1) == dense.argmax(-1)).double().mean()
        print(f"{name:<28} {cosine.mean():>9.4f} {cosine.min():>8.4f} {top1:>6.3f}")


if __name__ == "__main__":
    main()
