"""Which default calibration source is better: the bundled text or text sampled from the model?

Compresses SmolLM2-135M-Instruct in the recommended mode (INT4 GPTQ g64 + whitened correction, 5.0 bits
per weight) calibrated on each source, and prints one JSON line per run: perplexity ratios to dense on
the first 4096 tokens of prideprejudice.txt and emma.txt (neither is calibration text), KL on pride,
and load + compress seconds.

    python benchmarks/calibration_source.py austen:32:1 model:32:1      # source:n_samples:refine_steps

A source is a dataset name (austen, model) or a file name in ../shared/data/text.
Results of the run behind the README: benchmarks/results/calibration-source.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint
from hf_svdq.calibration.source import DATASETS, CalibrationConfig
from hf_svdq.evaluation.metrics import EvalSettings, perplexity_and_agreement, tokenize_text

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def main(specs: list[str]) -> None:
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = EvalSettings(window=512, stride=512, max_tokens=4096, max_new_tokens=8)
    pride = tokenize_text(tokenizer, (TEXT / "prideprejudice.txt").read_text(), 4096)
    emma = tokenize_text(tokenizer, (TEXT / "emma.txt").read_text(), 4096)
    dense = AutoModelForCausalLM.from_pretrained(path)
    dense_pride = perplexity_and_agreement(dense, pride, settings, progress=False)["perplexity"]
    dense_emma = perplexity_and_agreement(dense, emma, settings, progress=False)["perplexity"]
    for spec in specs:
        name, n_samples, refine = spec.split(":")
        source = {"dataset": name} if name in DATASETS else {"file": str(TEXT / name)}
        calibration = CalibrationConfig(**source, n_samples=int(n_samples), seq_len=256)  # type: ignore[arg-type]
        start = time.perf_counter()
        config = SVDQuantConfig(target_bits_per_weight=5.0, residual_bits=4, group_size=64, refine_steps=int(refine),
                                calibration=calibration)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
        seconds = time.perf_counter() - start
        measured = perplexity_and_agreement(model, pride, settings, dense, progress=False)
        emma_ppl = perplexity_and_agreement(model, emma, settings, progress=False)["perplexity"]
        print(json.dumps({"spec": spec, "sec": round(seconds, 1), "pride_ratio": round(measured["perplexity"] / dense_pride, 4),
                          "emma_ratio": round(emma_ppl / dense_emma, 4), "kl": round(measured["kl"], 4)}), flush=True)
        del model


if __name__ == "__main__":
    main(sys.argv[1:] or ["austen:32:1", "model:32:1"])
