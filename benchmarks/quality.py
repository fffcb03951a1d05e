"""Quality at equal bits: every hf_svdq mode against plain quantization, on SmolLM2-135M-Instruct.

Calibrates on sensesensibility.txt, evaluates perplexity on prideprejudice.txt (and emma.txt),
KL / top-1 against the dense model on the same tokens, greedy generations through the loop detector.

    python benchmarks/quality.py [--calib-samples 64] [--eval-tokens 8192] [--prompts 5] [--max-new-tokens 32]
                                 [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.evaluation.metrics import EvalSettings, generation_health, perplexity_and_agreement, tokenize_text
from hf_svdq.format.inspect import checkpoint_report

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def variants(calibration: CalibrationConfig) -> dict[str, dict[str, Any] | None]:
    """name -> SVDQuantConfig kwargs (None = the dense model)."""
    cal = {"calibration": calibration}
    residual = {"residual_bits": 4, "group_size": 64, "refine_steps": 1, **cal}
    # ordered by what the targets need first, so a cut-short run still answers them
    return {
        "dense": None,
        "INT8 RTN per-row": {"rank": 0, "residual_bits": 8, "group_size": None},
        "INT4 RTN g64": {"rank": 0, "residual_bits": 4, "group_size": 64},
        "INT4 GPTQ g64 + whitened LR, 5.0 bpw, refine 1": {"target_bits_per_weight": 5.0, **residual},
        "INT4 GPTQ g64 + whitened LR, 6.5 bpw, refine 1": {"target_bits_per_weight": 6.5, **residual},
        # at 4.5 bits a rank floor of 8 alone costs 4.6 bits: let the allocator start from 0
        "INT4 GPTQ g64 + whitened LR, 4.5 bpw, refine 1": {"target_bits_per_weight": 4.5, "rank_floor": 0, **residual},
        "whitened SVD -20% params": {"target_param_ratio": 0.8, **cal},
        "whitened SVD -10% params": {"target_param_ratio": 0.9, **cal},
        "whitened SVD -40% params": {"target_param_ratio": 0.6, **cal},
        "plain SVD r64 (seeds)": {"rank": 64},
        "plain SVD r128 (seeds)": {"rank": 128},
        "plain SVD r256 (seeds)": {"rank": 256},
        "plain SVD r128 attn only (seeds' surgical)": {"rank": 128, "skip": ["*.mlp.*"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-dir", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=5, help="how many of the default prompts to generate from")
    parser.add_argument("--no-sequential", action="store_true", help="calibrate every layer on dense activations")
    parser.add_argument("--only", nargs="*", help="run only these variant names (dense is always run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = CalibrationConfig(
        file=str(args.text_dir / "sensesensibility.txt"), n_samples=args.calib_samples, seq_len=args.calib_seq_len,
        sequential=not args.no_sequential,
    )
    settings = EvalSettings(window=512, stride=512, max_tokens=args.eval_tokens, max_new_tokens=args.max_new_tokens)
    pride = tokenize_text(tokenizer, (args.text_dir / "prideprejudice.txt").read_text(), args.eval_tokens)
    emma = tokenize_text(tokenizer, (args.text_dir / "emma.txt").read_text(), args.eval_tokens)
    dense = AutoModelForCausalLM.from_pretrained(path)
    rows = []
    table = variants(calibration)
    names = [n for n in table if n == "dense" or not args.only or n in args.only]
    for name in names:
        kwargs = table[name]
        start = time.perf_counter()
        model = dense if kwargs is None else AutoModelForCausalLM.from_pretrained(
            path, quantization_config=SVDQuantConfig(**kwargs)
        )
        seconds = time.perf_counter() - start
        row = measure(name, model, dense, tokenizer, pride, emma, settings, args.prompts, seconds)
        rows.append(row)
        print(_format_row(row), flush=True)
        if args.json:  # written after every row, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps({"rows": rows, "settings": {k: str(v) for k, v in vars(args).items()}}, indent=2))
        if model is not dense:
            del model
    dense_emma = rows[0]["ppl_emma"]
    print()
    print(_markdown(rows, dense_emma, args, calibration))


def measure(name: str, model: Any, dense: Any, tokenizer: Any, pride: torch.Tensor, emma: torch.Tensor,
            settings: EvalSettings, prompts: int, seconds: float) -> dict[str, Any]:
    """One table row: bytes and bits of the saved checkpoint, perplexities, KL/top-1 vs dense, loops."""
    is_dense = model is dense
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        report = checkpoint_report(tmp)
    quality = perplexity_and_agreement(model, pride, settings, None if is_dense else dense, progress=False)
    emma_ppl = perplexity_and_agreement(model, emma, settings, None, progress=False)["perplexity"]
    health = generation_health(model, tokenizer, settings_prompts()[:prompts], settings.max_new_tokens, progress=False)
    return {
        "variant": name,
        "bits_per_weight": report.bits_per_weight_compressed() if not is_dense else 32.0,
        "checkpoint_bytes": report.total_bytes,
        "ppl_pride": quality["perplexity"],
        "ppl_ratio": quality.get("perplexity_ratio", 1.0),
        "ppl_emma": emma_ppl,
        "kl": quality.get("kl", 0.0),
        "top1": quality.get("top1_agreement", 1.0),
        "loops": health["loops"],
        "prompts": len(health["samples"]),
        "seconds": seconds if not is_dense else 0.0,
        "ranks": None if is_dense else _rank_summary(model.config.quantization_config.ranks),
        "samples": [s["text"] for s in health["samples"]],
    }


def settings_prompts() -> tuple[str, ...]:
    from hf_svdq.evaluation.metrics import DEFAULT_PROMPTS

    return DEFAULT_PROMPTS


def _rank_summary(ranks: dict[str, int] | None) -> str:
    if not ranks:
        return "-"
    values = sorted(ranks.values())
    return f"{len(values)} layers, rank {values[0]}..{values[-1]} (median {values[len(values) // 2]})"


def _format_row(row: dict[str, Any]) -> str:
    return (f"{row['variant']:<42} bpw {row['bits_per_weight']:5.2f}  ppl {row['ppl_pride']:9.2f} (x{row['ppl_ratio']:.3f})  "
            f"emma {row['ppl_emma']:9.2f}  KL {row['kl']:.4f}  top1 {row['top1']:.3f}  loops {row['loops']}/{row['prompts']}  "
            f"{row['seconds']:.0f}s")


def _markdown(rows: list[dict[str, Any]], dense_emma: float, args: argparse.Namespace, calibration: CalibrationConfig) -> str:
    lines = [
        (f"Calibration: {calibration.n_samples} x {calibration.seq_len} tokens of sensesensibility.txt "
        f"({'sequential' if calibration.sequential else 'dense activations'}); eval: first {args.eval_tokens} tokens, "
        "window 512, stride 512."),
        "",
        "| variant | bits/weight (compressed layers) | checkpoint MB | PPL pride | x dense | PPL emma | x dense | KL | top-1 | loops | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['bits_per_weight']:.2f} | {r['checkpoint_bytes'] / 1e6:.0f} | {r['ppl_pride']:.2f} | "
            f"{r['ppl_ratio']:.3f} | {r['ppl_emma']:.2f} | {r['ppl_emma'] / dense_emma:.3f} | {r['kl']:.4f} | "
            f"{r['top1']:.3f} | {r['loops']}/{r['prompts']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
