"""What healing buys: whitened pure low rank (-20% parameters) on SmolLM2-135M-Instruct, before and after
distilling its factors against the dense model on the calibration text (``hf_svdq.compression.healing``).

Calibration and healing tokens: the bundled text (``"austen"``, Sense and Sensibility), 32 x 256 tokens
(or ``--heal-samples``); evaluation: first 4096 tokens of prideprejudice.txt and emma.txt; greedy answers
to the default prompts through the loop detector. Prints one JSON line per healing length.

    python benchmarks/healing.py --steps 0 100 200 [--lr 1e-4] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _results import emit  # benchmarks/ is on sys.path when a script runs
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.compression.healing import heal
from hf_svdq.evaluation.metrics import (
    DEFAULT_PROMPTS,
    EvalSettings,
    generation_health,
    perplexity_and_agreement,
    tokenize_text,
)

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100, 200], help="cumulative healing lengths to report")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heal-samples", type=int, default=32)
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = EvalSettings(window=512, stride=512, max_tokens=4096, max_new_tokens=32)
    pride = tokenize_text(tokenizer, (TEXT / "prideprejudice.txt").read_text(), 4096)
    emma = tokenize_text(tokenizer, (TEXT / "emma.txt").read_text(), 4096)
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    dense_emma = perplexity_and_agreement(dense, emma, settings, progress=False)["perplexity"]
    calibration = CalibrationConfig(dataset="austen", n_samples=32)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=SVDQuantConfig(target_param_ratio=args.param_ratio, calibration=calibration)).eval()
    compress_seconds = time.perf_counter() - start
    ids = CalibrationConfig(dataset="austen", n_samples=args.heal_samples).token_ids(tokenizer)
    done, heal_seconds = 0, 0.0
    for steps in sorted(args.steps):
        if steps > done:
            result = heal(model, dense, ids, steps=steps - done, lr=args.lr, batch_size=args.batch_size, seed=done)
            heal_seconds += result.seconds
            done = steps
        model.eval()
        measured = perplexity_and_agreement(model, pride, settings, dense, progress=False)
        emma_ratio = perplexity_and_agreement(model, emma, settings, progress=False)["perplexity"] / dense_emma
        health = generation_health(model, tokenizer, DEFAULT_PROMPTS, settings.max_new_tokens, progress=False)
        row = {"steps": steps, "lr": args.lr, "batch_size": args.batch_size, "heal_tokens": int(ids.numel()),
               "pride_ratio": round(measured["perplexity_ratio"], 4), "emma_ratio": round(emma_ratio, 4),
               "kl": round(measured["kl"], 4), "top1": round(measured["top1_agreement"], 3),
               "loops": f"{health['loops']}/{len(DEFAULT_PROMPTS)}", "compress_s": round(compress_seconds, 1),
               "heal_s": round(heal_seconds, 1), "answers": [s["text"][:80] for s in health["samples"][:2]]}
        emit(row, args.json)


if __name__ == "__main__":
    main()
