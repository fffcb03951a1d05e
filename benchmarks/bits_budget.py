"""Quality at a bits-per-weight budget: uniform INT4 + correction against mixed INT4/INT8 (``bit_choices``).

For each run ``BPW:CHOICES:GROUP[:METHOD]`` (e.g. ``6.5:4,8:64``; CHOICES ``4`` = today's uniform INT4 base;
BPW ``rN`` = a fixed rank N, ``r0`` = plain group quantization, no correction, the baselines: ``r0:4:64:rtn``,
``r0:4:128:gptq``, ``r24:4:64:gptq,refine``; GROUP
``row`` = one group per row)
compresses SmolLM2-135M-Instruct (GPTQ, whitened correction, one refinement step, calibrated on the
bundled text, 32 x 256 tokens), saves it, reads the bits per weight back from the files, and prints one
JSON line (``left_dense_by_group_size``: layers whose width the group size does not divide, kept dense and
not counted in the bits; a row with any is not a comparison at equal bits): perplexity ratios to dense on the first 4096 tokens of prideprejudice.txt and emma.txt,
KL and top-1 on pride, how many layers got 8 bits, and load + compress seconds.

    python benchmarks/bits_budget.py 6.5:4,8:64 5.0:4,8:64 4.5:4,8:64 4.25:4,8:64 [--json out.jsonl]
    python benchmarks/bits_budget.py policy:analysis/policy.json   # a plan from `hf-svdq analyze --bit-choices`
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _results import emit  # benchmarks/ is on sys.path when a script runs
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.evaluation.metrics import EvalSettings, perplexity_and_agreement, tokenize_text
from hf_svdq.format.inspect import checkpoint_report

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="BPW:CHOICES:GROUP, e.g. 6.5:4,8:64")
    parser.add_argument("--json", type=Path, help="append one JSON line per run here")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = EvalSettings(window=512, stride=512, max_tokens=args.eval_tokens, max_new_tokens=8)
    pride = tokenize_text(tokenizer, (TEXT / "prideprejudice.txt").read_text(), args.eval_tokens)
    emma = tokenize_text(tokenizer, (TEXT / "emma.txt").read_text(), args.eval_tokens)
    dense = AutoModelForCausalLM.from_pretrained(path)
    dense_emma = perplexity_and_agreement(dense, emma, settings, progress=False)["perplexity"]
    for run in args.runs:
        if run.startswith("policy:"):  # a policy.json from `hf-svdq analyze --bit-choices`, compressed as it says
            config = SVDQuantConfig.from_policy(run[len("policy:"):], calibration=CalibrationConfig(dataset="austen", n_samples=32))
            _measure(run, config, path, pride, emma, settings, dense, dense_emma, args.json)
            continue
        bpw, choices, group, *method = run.split(":")
        bits = [int(b) for b in choices.split(",")]
        calibration = CalibrationConfig(dataset="austen", n_samples=32)
        group_size = None if group == "row" else int(group)
        if bpw.startswith("r"):  # a fixed rank: r0 = plain group quantization; METHOD may add ",refine"
            methods = method[0].split(",") if method else ["gptq"]
            rtn = methods[0] == "rtn"
            config = SVDQuantConfig(rank=int(bpw[1:]), residual_bits=bits[0], group_size=group_size, residual_method=methods[0],
                                    refine_steps=int("refine" in methods), calibration=None if rtn else calibration)
        else:
            config = SVDQuantConfig(
                target_bits_per_weight=float(bpw), residual_bits=4, group_size=group_size, refine_steps=1, rank_floor=0,
                bit_choices=bits if len(bits) > 1 else None, calibration=calibration,
            )
        _measure(run, config, path, pride, emma, settings, dense, dense_emma, args.json)


def _measure(run, config, path, pride, emma, settings, dense, dense_emma, json_path) -> None:
    """Compress with ``config``, save, read the bits back and print (and append) one JSON row."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        report = checkpoint_report(tmp)
    measured = perplexity_and_agreement(model, pride, settings, dense, progress=False)
    emma_ratio = perplexity_and_agreement(model, emma, settings, progress=False)["perplexity"] / dense_emma
    dense_layers = [n for n, why in (model.config.quantization_config.dense or {}).items() if "does not divide" in why]
    row = {"run": run, "bits_per_weight": round(report.bits_per_weight_compressed(), 3),
           "left_dense_by_group_size": len(dense_layers),
           "pride_ratio": round(measured["perplexity_ratio"], 4), "emma_ratio": round(emma_ratio, 4),
           "kl": round(measured["kl"], 4), "top1": round(measured["top1_agreement"], 3),
           "int8_layers": len(model.config.quantization_config.layer_bits or {}), "seconds": round(seconds, 1),
           "predicted_ratio": (model.config.quantization_config.prediction or {}).get("perplexity_ratio")}
    emit(row, json_path)
    del model


if __name__ == "__main__":
    main()
