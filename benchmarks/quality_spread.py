"""How precisely a perplexity ratio is measured, and how much it moves with equivalent numerics.

Compresses SmolLM2-135M-Instruct with ``SVDQuantConfig.recommended()`` (optionally at another ``--damp``
or thread count) and scores it, and the dense model, token by token on held-out text (never calibration
text): the first 32768 tokens of *Pride and Prejudice* and of *Emma* (windows of 512), and the 1022
tokens of ``emma_heldout.txt`` that the after-compress check scores. Each row gives the ratio to dense
with its standard error (from the spread of per-window mean log-loss differences), so two rows can be
told apart from noise; per-token losses are kept (``--keep``) for paired comparisons between commits:

    python benchmarks/quality_spread.py                    # this checkout, 2 threads
    python benchmarks/quality_spread.py --threads 1        # the same at another thread count
    python benchmarks/quality_spread.py --damp 0.01        # another Gram damping
    python benchmarks/quality_spread.py --compare A.npz B.npz   # paired: B against A

One JSON row per run, appended to ``benchmarks/results/quality-spread.jsonl``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import emit
from moe_decode import cpu

TEXTS = {"pride": "prideprejudice.txt", "emma": "emma.txt"}
WINDOW = 512


def token_losses(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """Per-token negative log-likelihood of ``ids`` (1-D) in non-overlapping windows of :data:`WINDOW`."""
    losses = []
    with torch.no_grad():
        for begin in range(0, ids.numel() - 1, WINDOW):
            window = ids[begin:begin + WINDOW + 1]
            logits = model(window[None, :-1]).logits[0].float()
            losses.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none"))
    return torch.cat(losses).numpy()


def ratio_and_error(compressed: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``exp(mean difference)`` and its standard error, from the means of runs of :data:`WINDOW` tokens
    (neighbouring tokens' losses are correlated, windows much less); a text shorter than two windows is cut
    in two halves (the 1022-token check)."""
    diff = compressed - reference
    run = WINDOW if diff.size >= 2 * WINDOW else diff.size // 2
    windows = diff[: diff.size // run * run].reshape(-1, run).mean(1)
    ratio = float(np.exp(diff.mean()))
    return ratio, ratio * float(windows.std(ddof=1) / np.sqrt(windows.size))


def score(model: torch.nn.Module, tokenizer: object, text_dir: Path, tokens: int) -> dict[str, np.ndarray]:
    from hf_svdq.calibration.source import HELDOUT_TEXT
    from hf_svdq.evaluation.metrics import tokenize_text

    out = {name: token_losses(model, tokenize_text(tokenizer, (text_dir / file).read_text(encoding="utf-8"), tokens)[0])
           for name, file in TEXTS.items()}
    out["emma_heldout"] = token_losses(model, tokenize_text(tokenizer, HELDOUT_TEXT.read_text(encoding="utf-8"), 1024)[0])
    return out


def _damp(model: torch.nn.Module) -> float:
    config = model.config.quantization_config
    return float(config["damp"] if isinstance(config, dict) else config.damp)


def compare(first: Path, second: Path) -> None:
    a, b = np.load(first), np.load(second)
    for name in a.files:
        ratio, error = ratio_and_error(b[name], a[name])
        print(f"{name}: {second.name} / {first.name} = {ratio:.4f} +- {error:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--damp", type=float, default=None, help="the config's damp (default: the recommended mode's)")
    parser.add_argument("--tokens", type=int, default=32768, help="held-out tokens per novel")
    parser.add_argument("--text-dir", type=Path, default=HERE.parent.parent / "shared" / "data" / "text")
    parser.add_argument("--keep", type=Path, default=None, help="save per-token losses here (.npz)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "quality-spread.jsonl")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_svdq import SVDQuantConfig
    from hf_svdq.real_model import smollm2_checkpoint

    source = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = score(AutoModelForCausalLM.from_pretrained(source).eval(), tokenizer, args.text_dir, args.tokens)
    extra = {} if args.damp is None else {"damp": args.damp}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=SVDQuantConfig.recommended(**extra)).eval()
    seconds = time.perf_counter() - start
    losses = score(model, tokenizer, args.text_dir, args.tokens)
    if args.keep:
        np.savez(args.keep, **losses)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=HERE).stdout.strip()
    row: dict[str, object] = {"benchmark": "quality_spread", "commit": commit, "cpu": cpu(), "threads": args.threads,
                              "damp": _damp(model), "compress_s": round(seconds, 1)}
    for name in losses:
        ratio, error = ratio_and_error(losses[name], dense[name])
        row[name] = {"tokens": int(losses[name].size), "ratio": round(ratio, 4), "stderr": round(error, 4)}
    emit(row, args.results)


if __name__ == "__main__":
    main()
