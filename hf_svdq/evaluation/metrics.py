"""Model-level evaluation: perplexity, agreement with a reference model, generation health, speed, size.

``evaluate(model, tokenizer, text, reference=...)`` returns a JSON-ready dict; ``format_evaluation``
renders it as a table. Used by ``hf-svdq eval`` and the benchmarks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..nn.layers import COMPRESSED_LAYERS
from .degeneration import degeneration_report

DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences what a computer does.",
    "Tell me a story about a dragon who lost its fire.",
    "What is the meaning of life?",
)


@dataclass(frozen=True)
class EvalSettings:
    """Window and stride of the perplexity pass, token cap, and generation settings."""

    window: int = 512
    stride: int = 512
    max_tokens: int | None = 8192
    max_new_tokens: int = 64
    speed_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("window", "stride", "max_new_tokens", "speed_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {self.max_tokens}")


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None) -> torch.Tensor:
    """``[1, n]`` token ids of ``text`` (truncated to ``max_tokens``); ValueError when too short."""
    if not text.strip():
        raise ValueError("evaluation text is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError(f"evaluation text has {ids.shape[1]} token(s); need at least 2")
    return ids


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)``: each window scores only the tokens the previous one did not."""
    spans, previous_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + window, n_tokens)
        scored = end - max(previous_end, begin + 1)  # a scored token needs one token of context
        if scored > 0:
            spans.append((begin, end, scored))
        previous_end = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def perplexity_and_agreement(
    model: nn.Module, ids: torch.Tensor, settings: EvalSettings, reference: nn.Module | None = None, progress: bool = True
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``ids``; with ``reference``: its perplexity, KL(ref || model), logit
    cosine, MSE and top-1 agreement, all over the same scored tokens."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    ref_nll, kl, cosine, mse, agree = 0.0, 0.0, 0.0, 0.0, 0
    for begin, end, scored in tqdm(_windows(ids.shape[1], settings.window, settings.stride), desc="perplexity", disable=not progress):
        chunk = ids[:, begin:end].to(device)
        logits = model(chunk).logits[0, -scored - 1 : -1].double()
        targets = chunk[0, -scored:]
        logp = F.log_softmax(logits, -1)
        nll += float(-logp.gather(1, targets[:, None]).sum())
        count += scored
        if reference is not None:
            ref_logits = reference(chunk).logits[0, -scored - 1 : -1].double()
            ref_logp = F.log_softmax(ref_logits, -1)
            ref_nll += float(-ref_logp.gather(1, targets[:, None]).sum())
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            cosine += float(F.cosine_similarity(logits, ref_logits, dim=-1).sum())
            mse += float((logits - ref_logits).pow(2).mean(-1).sum())
            agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
    result: dict[str, Any] = {"tokens": count, "perplexity": math.exp(nll / count)}
    if reference is not None:
        ref_ppl = math.exp(ref_nll / count)
        result.update(
            reference_perplexity=ref_ppl,
            perplexity_ratio=result["perplexity"] / ref_ppl,
            kl=kl / count,
            logit_cosine=cosine / count,
            logit_mse=mse / count,
            top1_agreement=agree / count,
        )
    return result


def _prompt_inputs(tokenizer: Any, prompt: str) -> dict[str, torch.Tensor]:
    if getattr(tokenizer, "chat_template", None):
        return dict(tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ))
    return dict(tokenizer(prompt, return_tensors="pt"))


@torch.no_grad()
def generation_health(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, progress: bool = True) -> dict[str, Any]:
    """Greedy generations and their degeneration measures; ``loops`` counts looping outputs."""
    device = next(model.parameters()).device
    samples = []
    for prompt in tqdm(prompts, desc="generation", disable=not progress):
        inputs = {k: v.to(device) for k, v in _prompt_inputs(tokenizer, prompt).items()}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[operator]
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "text": text, **degeneration_report(text)})
    n = max(len(samples), 1)
    return {
        "loops": sum(s["loop"] for s in samples),
        "mean_repeated_3gram_rate": sum(s["repeated_3gram_rate"] for s in samples) / n,
        "mean_distinct_2": sum(s["distinct_2"] for s in samples) / n,
        "samples": samples,
    }


@torch.no_grad()
def decode_speed(model: nn.Module, tokens: int, prompt_ids: torch.Tensor | None = None) -> float:
    """Greedy decode tokens per second at batch 1 (after a short warm-up)."""
    device = next(model.parameters()).device
    ids = (prompt_ids if prompt_ids is not None else torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).to(device)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # type: ignore[operator]
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)  # type: ignore[operator]
    return tokens / (time.perf_counter() - start)


def model_size(model: nn.Module) -> dict[str, Any]:
    """Bytes held by the model (unique storages) and bits per weight, over compressed layers and overall."""
    seen, total, dense_params = set(), 0, 0
    compressed_bytes, compressed_weights = 0, 0
    owned_by_svdq: set[int] = set()
    for module in model.modules():
        if isinstance(module, COMPRESSED_LAYERS):
            compressed_bytes += module.storage_bytes()
            compressed_weights += module.out_features * module.in_features
            dense_params += module.out_features * module.in_features
            owned_by_svdq.update(id(p) for p in module.parameters(recurse=False) if p is not module.bias)
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
        if id(tensor) not in owned_by_svdq and tensor.is_floating_point():
            dense_params += tensor.numel()
    return {
        "bytes": total,
        "compressed_layers": sum(isinstance(m, COMPRESSED_LAYERS) for m in model.modules()),
        "bits_per_weight_compressed_layers": 8.0 * compressed_bytes / compressed_weights if compressed_weights else None,
        "bits_per_weight_overall": 8.0 * total / dense_params if dense_params else None,
    }


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    reference: nn.Module | None = None,
    settings: EvalSettings | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    progress: bool = True,
) -> dict[str, Any]:
    """Everything above in one JSON-ready dict."""
    settings = settings or EvalSettings()
    ids = tokenize_text(tokenizer, text, settings.max_tokens)
    result: dict[str, Any] = {"quality": perplexity_and_agreement(model, ids, settings, reference, progress)}
    result["generation"] = generation_health(model, tokenizer, prompts, settings.max_new_tokens, progress)
    result["speed"] = {"decode_tokens_per_s": decode_speed(model, settings.speed_tokens)}
    if reference is not None:
        result["speed"]["reference_decode_tokens_per_s"] = decode_speed(reference, settings.speed_tokens)
    result["size"] = model_size(model)
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """A readable summary table of :func:`evaluate`'s result."""
    q, g, s, z = result["quality"], result["generation"], result["speed"], result["size"]
    rows = [("tokens scored", f"{q['tokens']}"), ("perplexity", f"{q['perplexity']:.3f}")]
    if "reference_perplexity" in q:
        rows += [
            ("reference perplexity", f"{q['reference_perplexity']:.3f}"),
            ("perplexity ratio", f"{q['perplexity_ratio']:.4f}"),
            ("KL(ref || model) / token", f"{q['kl']:.5f}"),
            ("logit cosine", f"{q['logit_cosine']:.5f}"),
            ("logit MSE", f"{q['logit_mse']:.5f}"),
            ("top-1 agreement", f"{q['top1_agreement']:.4f}"),
        ]
    rows += [
        ("generations looping", f"{g['loops']} of {len(g['samples'])}"),
        ("repeated 3-gram rate", f"{g['mean_repeated_3gram_rate']:.3f}"),
        ("distinct-2", f"{g['mean_distinct_2']:.3f}"),
        ("decode tokens/s", f"{s['decode_tokens_per_s']:.1f}"),
    ]
    if "reference_decode_tokens_per_s" in s:
        rows.append(("reference decode tokens/s", f"{s['reference_decode_tokens_per_s']:.1f}"))
    bpw_c = z["bits_per_weight_compressed_layers"]
    rows += [
        ("model bytes", f"{z['bytes']:,}"),
        ("bits/weight compressed layers", "-" if bpw_c is None else f"{bpw_c:.2f}"),
        ("bits/weight overall", f"{z['bits_per_weight_overall']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for sample in g["samples"]:
        flag = " [LOOP]" if sample["loop"] else ""
        lines.append(f"> {sample['prompt']}\n  {sample['text'].strip()[:200]!r}{flag}")
    return "\n".join(lines)
