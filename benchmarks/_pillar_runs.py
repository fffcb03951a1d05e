"""Models, prompts, batched generation and scoring for ``benchmarks/pillar_monitor.py``."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TEXT = HERE.parent.parent / "shared" / "data" / "text"
PROMPTS = HERE / "pillar_prompts.txt"
POLICY = HERE / "results" / "analysis-smollm2-policy" / "policy.json"

_CAL = {"file": str(TEXT / "sensesensibility.txt"), "n_samples": 32, "seq_len": 256}
MODELS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "whitened SVD -20% params": {"target_param_ratio": 0.8, "calibration": _CAL},
    "whitened SVD -40% params": {"target_param_ratio": 0.6, "calibration": _CAL},
    "plain SVD r128 attn only": {"rank": 128, "skip": ["*.mlp.*"]},
}
"""The models of the issue: the dense one and three that loop (the seeds' plain-SVD attention-only
policy is the quality table's "seeds' surgical" row)."""


def prompts() -> list[str]:
    lines = PROMPTS.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def load(name: str) -> Any:
    """The model by name; compressed ones are written once into the hf_svdq cache and loaded from there."""
    from load_and_decode import cached
    from transformers import AutoModelForCausalLM

    from hf_svdq.real_model import smollm2_checkpoint

    kwargs = MODELS[name]
    path = smollm2_checkpoint() if kwargs is None else cached(name, kwargs)[0]
    return AutoModelForCausalLM.from_pretrained(path).eval()


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from hf_svdq.real_model import smollm2_checkpoint

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def batch_inputs(tok: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    return dict(tok(chats, return_tensors="pt", padding=True, add_special_tokens=False))


@torch.no_grad()
def generate(model: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
    """Greedy, batched; returns the generated ids ``[batch, new]`` (padding after a row's end)."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def trim(ids: torch.Tensor, eos: set[int]) -> list[list[int]]:
    rows = []
    for row in ids.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


@torch.no_grad()
def dense_nll(dense: Any, inputs: dict[str, torch.Tensor], generated: list[list[int]]) -> list[tuple[float, int]]:
    """Per row: summed negative log-likelihood of the generated tokens under the dense model, and their count."""
    rows = []
    for r, gen in enumerate(generated):
        if not gen:
            rows.append((0.0, 0))
            continue
        prompt = inputs["input_ids"][r][inputs["attention_mask"][r].bool()]
        ids = torch.cat([prompt, torch.tensor(gen)])[None]
        logp = torch.log_softmax(dense(ids).logits[0, prompt.shape[0] - 1 : -1].double(), -1)
        rows.append((float(-logp.gather(1, torch.tensor(gen)[:, None]).sum()), len(gen)))
    return rows


def text_measures(tok: Any, generated: list[list[int]]) -> list[dict[str, Any]]:
    from hf_svdq.evaluation.degeneration import degeneration_report

    return [degeneration_report(tok.decode(g, skip_special_tokens=True)) for g in generated]


def summarize(measures: list[dict[str, Any]], nll_rows: list[tuple[float, int]]) -> dict[str, Any]:
    """Loops per prompt and distinct-2 (text loop detector, units), and the dense model's perplexity of
    all generated tokens together."""
    n = max(len(measures), 1)
    nll, count = sum(r[0] for r in nll_rows), sum(r[1] for r in nll_rows)
    return {
        "loops_per_prompt": sum(m["loop"] for m in measures) / n,
        "distinct_2": sum(m["distinct_2"] for m in measures) / n,
        "dense_ppl": math.exp(nll / count) if count else float("nan"),
        "tokens": count,
    }
