"""An ``hf-svdq analyze`` policy against uniform compression at the same bytes, on SmolLM2-135M-Instruct.

Rows (same calibration as the policy's analysis when it was calibrated; same eval as benchmarks/quality.py):
dense; the policy; one rank for every analysed layer, the largest whose bytes do not exceed the policy's;
the spectral budget (``target_bits_per_weight``/``target_param_ratio`` allocation by truncation loss)
at the policy's bytes. "bits/weight (analysed)" counts every analysed layer, dense ones included.

    python benchmarks/policy_vs_uniform.py --policy OUT/policy.json [OUT2/policy.json ...] [--eval-tokens 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from quality import DEFAULT_TEXT, _format_row, measure
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.compression.decisions import LinearSpec, layer_bytes
from hf_svdq.evaluation.metrics import EvalSettings, tokenize_text
from hf_svdq.format.policy_file import load_policy
from hf_svdq.nn.layers import COMPRESSED_LAYERS


def analysed_bytes(model: Any, names: list[str]) -> int:
    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, COMPRESSED_LAYERS):
            total += module.storage_bytes()
        else:
            total += module.weight.numel() * module.weight.element_size()
    return total


def uniform_rank(specs: list[LinearSpec], budget: int, config: SVDQuantConfig, element_bytes: int) -> int:
    """Largest single rank whose stored bytes (dense where rank r does not pay) fit ``budget``."""
    def cost(r: int) -> int:
        total = 0
        for s in specs:
            dense = s.out_features * s.in_features * element_bytes
            total += min(layer_bytes(s, r, config.residual_bits, config.group_size, element_bytes), dense)
        return total
    best = 1
    for r in range(1, max(min(s.out_features, s.in_features) for s in specs) + 1):
        if cost(r) <= budget:
            best = r
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", type=Path, nargs="+", required=True,
                        help="policy.json file(s) of the same model and setting; baselines use the first one's bytes")
    parser.add_argument("--text-dir", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    docs = [load_policy(p) for p in args.policy]
    doc = docs[0]
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = None
    if doc["setting"].get("calibrated"):
        calibration = CalibrationConfig(file=str(args.text_dir / "sensesensibility.txt"), n_samples=args.calib_samples,
                                        seq_len=args.calib_seq_len)
    settings = EvalSettings(window=512, stride=512, max_tokens=args.eval_tokens, max_new_tokens=args.max_new_tokens)
    pride = tokenize_text(tokenizer, (args.text_dir / "prideprejudice.txt").read_text(), args.eval_tokens)
    emma = tokenize_text(tokenizer, (args.text_dir / "emma.txt").read_text(), args.eval_tokens)
    dense = AutoModelForCausalLM.from_pretrained(path)
    analysed = sorted(doc["classes"])
    element_bytes = next(dense.parameters()).element_size()
    specs = []
    for name in analysed:
        w = dense.get_submodule(name).weight
        specs.append(LinearSpec(name, w.shape[0], w.shape[1], False))
    numbers = sum(s.out_features * s.in_features for s in specs)
    budget = int(doc["predicted"]["bytes"])
    setting = {k: v for k, v in doc["setting"].items() if k in ("residual_bits", "group_size", "residual_method", "damp")
               and v is not None}
    if not calibration and setting.get("residual_method") == "gptq":
        setting["residual_method"] = "rtn"
    base = SVDQuantConfig(rank=8, **setting, calibration=calibration)
    r = uniform_rank(specs, budget, base, element_bytes)
    skip = [n for n in doc["dense"] if n not in analysed]  # never-analysed layers stay out of every row
    configs: dict[str, SVDQuantConfig | None] = {
        "dense": None,
        **{f"policy, pillars {d['criterion'].get('pillars', 'dense')} ({p.parent.name})": SVDQuantConfig.from_policy(d, calibration)
           for d, p in zip(docs, args.policy)},
        f"uniform rank {r}": SVDQuantConfig(rank=r, skip=skip, **setting, calibration=calibration),
        "spectral budget": SVDQuantConfig(target_bits_per_weight=8 * budget / numbers, rank_floor=8, skip=skip, **setting,
                                          calibration=calibration),
    }
    rows = []
    for name, config in configs.items():
        start = time.perf_counter()
        model = dense if config is None else AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
        seconds = time.perf_counter() - start
        row = measure(name, model, dense, tokenizer, pride, emma, settings, args.prompts, seconds)
        row["analysed_bytes"] = analysed_bytes(model, analysed)
        row["bits_per_weight_analysed"] = 8 * row["analysed_bytes"] / numbers
        rows.append(row)
        print(_format_row(row), f"analysed {row['bits_per_weight_analysed']:.2f} bpw", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "policies": [str(p) for p in args.policy]}, indent=2))
    dense_emma = rows[0]["ppl_emma"]
    print("\n| variant | bits/weight (analysed layers) | checkpoint MB | PPL pride | x dense | PPL emma | x dense | KL | top-1 | loops |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['bits_per_weight_analysed']:.2f} | {row['checkpoint_bytes'] / 1e6:.1f} | "
              f"{row['ppl_pride']:.2f} | {row['ppl_ratio']:.3f} | {row['ppl_emma']:.2f} | {row['ppl_emma'] / dense_emma:.3f} | "
              f"{row['kl']:.4f} | {row['top1']:.3f} | {row['loops']}/{row['prompts']} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
