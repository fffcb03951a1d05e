"""Quality on real weights for mixture-of-experts: SmolLM2-135M-Instruct sparsely upcycled into a Mixtral.

We have no real MoE checkpoint offline, so :func:`hf_svdq.real_moe.smollm2_moe_checkpoint` builds one: a
``MixtralForCausalLM`` with SmolLM2's attention, norms and embeddings, 8 experts per block, each a copy of
SmolLM2's MLP plus independent Gaussian noise of ``--noise`` (default 1%) of each weight row's standard
deviation, a random router (normal, std 0.02, seeded), top-2 with renormalised weights (Mixtral's
routing), cached in the hf_svdq cache (``@smollm2-moe`` in the CLI).

Then, on the held-out chapter of *Emma* the after-compress check uses (never calibration text):

* ``dense``: perplexity of SmolLM2 and of the upcycled MoE;
* ``smollm2``: SmolLM2 compressed with ``SVDQuantConfig.recommended()`` (5.0 bits per weight), ratio to dense;
* ``moe``: the MoE compressed the same way (experts included in the 5.0 bits), ratio to its own dense model,
  coverage, experts that fell back to data-free, loop verdict, time;
* ``moe-datafree-experts``: the same with per-expert calibration switched off (every expert takes the
  data-free path; attention stays calibrated), the comparison per-expert calibration must win.

    python benchmarks/upcycled_moe.py [--only dense,smollm2,moe,moe-datafree-experts] [--tokens 1024]

One JSON row per measurement, appended to ``benchmarks/results/moe-upcycle.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import emit
from moe_decode import cpu


def perplexity(model: torch.nn.Module, tokenizer: object, tokens: int) -> float:
    from hf_svdq.calibration.source import HELDOUT_TEXT
    from hf_svdq.evaluation.metrics import EvalSettings, perplexity_and_agreement, tokenize_text

    ids = tokenize_text(tokenizer, Path(HELDOUT_TEXT).read_text(encoding="utf-8"), tokens)
    return float(perplexity_and_agreement(model, ids, EvalSettings(window=512, stride=512, max_tokens=tokens))["perplexity"])


def compressed_row(name: str, source: Path, tokens: int, results: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_svdq import SVDQuantConfig
    from hf_svdq.evaluation.check import quick_check
    from hf_svdq.format.inspect import checkpoint_report

    tokenizer = AutoTokenizer.from_pretrained(source)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=SVDQuantConfig.recommended()).eval()
    seconds = time.perf_counter() - start
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    check = quick_check(model, dense, tokenizer, "What is the capital of France?", 64, heldout_tokens=tokens)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        report = checkpoint_report(tmp)
    qc = model.config.quantization_config
    coverage = qc["coverage"] if isinstance(qc, dict) else qc.coverage
    emit({"benchmark": "upcycled_moe", "row": name, "source": source.name, "cpu": cpu(), "heldout_tokens": tokens,
          "perplexity": check.perplexity, "dense_perplexity": check.dense_perplexity, "ratio": check.perplexity_ratio,
          "loop": check.answers[0].loops, "healthy": check.healthy, "answer": check.answers[0].answer[:120],
          "bits_per_weight_compressed": report.bits_per_weight_compressed(),
          "coverage_share": coverage.get("share_of_non_embedding") if coverage else None,
          "experts_data_free": (coverage or {}).get("experts_calibrated_data_free"), "load_and_compress_s": seconds},
         results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="dense,smollm2,moe,moe-datafree-experts")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--min-tokens-per-input", type=float, default=None,
                        help="the per-expert calibration threshold for the moe row (default: the library's, 1.0)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "moe-upcycle.jsonl")
    args = parser.parse_args()
    only = set(args.only.split(","))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_svdq.real_model import smollm2_checkpoint
    from hf_svdq.real_moe import smollm2_moe_checkpoint

    smol, moe = smollm2_checkpoint(), smollm2_moe_checkpoint(noise=args.noise)
    print(f"# CPU: {cpu()}", flush=True)
    if "dense" in only:
        tokenizer = AutoTokenizer.from_pretrained(smol)
        ppl = {n: perplexity(AutoModelForCausalLM.from_pretrained(p).eval(), tokenizer, args.tokens)
               for n, p in (("smollm2", smol), ("moe", moe))}
        emit({"benchmark": "upcycled_moe", "row": "dense", "noise": args.noise, "smollm2_perplexity": ppl["smollm2"],
              "moe_perplexity": ppl["moe"], "ratio": ppl["moe"] / ppl["smollm2"], "heldout_tokens": args.tokens}, args.results)
    if "smollm2" in only:
        compressed_row("smollm2 recommended 5.0 bpw", smol, args.tokens, args.results)
    if "moe" in only:
        from hf_svdq.compression import experts

        name = "moe recommended 5.0 bpw"
        if args.min_tokens_per_input is not None:
            experts.MIN_TOKENS_PER_INPUT = args.min_tokens_per_input
            name += f", experts calibrated from {args.min_tokens_per_input:g} tokens per input column"
        compressed_row(name, moe, args.tokens, args.results)
        experts.MIN_TOKENS_PER_INPUT = 1.0
    if "moe-datafree-experts" in only:
        from hf_svdq.compression import experts

        experts.MIN_TOKENS_PER_INPUT = float("inf")  # every expert takes the data-free path
        compressed_row("moe recommended 5.0 bpw, experts data-free", moe, args.tokens, args.results)


if __name__ == "__main__":
    main()
