"""The check ``hf-svdq compress`` runs after saving: dense and compressed answers side by side, whether
the compressed answers keep the dense answers' key words, perplexity ratio on a short held-out passage,
and the loop detector's verdict.

Cheap by design (three short answers, ~1k tokens of text) so that the first command a user runs shows
whether the compressed model still talks sense; ``hf-svdq eval`` is the thorough version.

The prompts are picked per model by the dense model's confidence in its first answer token: a prompt
whose first token is a near tie (SmolLM2 on "What is the capital of France?": "The" -1.88 vs "L" -1.97
nats) lets any perturbation, compression or a different CPU's rounding, change the whole answer, which
says nothing about the compression's quality.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.source import HELDOUT_TEXT
from .metrics import EvalSettings, _prompt_inputs, generation_health, perplexity_and_agreement, tokenize_text

CANDIDATE_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "How many legs does a spider have?",
    "At what temperature does water boil, in degrees Celsius?",
    "Which ocean is the largest on Earth?",
)
"""Short factual questions; the check answers the :data:`N_PROMPTS` the dense model is surest of."""
N_PROMPTS = 3
_STOPWORDS = frozenset(str.split(
    "a an the is are was were be been of in on at to for and or but with by from as it its this that these those "
    "there their they he she his her we you your i my me our what which who whom how when where why do does did "
    "can could would should will may might also very about into than then so such not no yes"))


@dataclass
class PromptCheck:
    """One prompt's answers; ``margin``: the dense model's first-token log-probability lead (nats)."""

    prompt: str
    margin: float
    dense_answer: str
    answer: str
    key_words: list[str]
    missing: list[str]
    loops: bool
    loop_unit: str | None
    dense_loops: bool

    @property
    def content_kept(self) -> bool:
        """At least half of the dense answer's key words are in the compressed answer."""
        return 2 * len(self.missing) <= len(self.key_words)


@dataclass
class QuickCheck:
    """What :func:`quick_check` measured; ``healthy`` is the one-word verdict."""

    answers: list[PromptCheck]
    heldout_text: str
    heldout_tokens: int
    perplexity: float
    dense_perplexity: float
    max_ppl_ratio: float
    prompts_picked: bool = True

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.dense_perplexity

    @property
    def new_loops(self) -> int:
        return sum(a.loops and not a.dense_loops for a in self.answers)

    @property
    def content_kept(self) -> int:
        return sum(a.content_kept for a in self.answers)

    @property
    def healthy(self) -> bool:
        """No loop the dense model does not have, the key words kept in most answers, and perplexity within
        ``max_ppl_ratio`` of dense."""
        return (self.new_loops == 0 and 2 * self.content_kept > len(self.answers)
                and self.perplexity_ratio <= self.max_ppl_ratio)

    def to_dict(self) -> dict[str, Any]:
        answers = [{**asdict(a), "content_kept": a.content_kept} for a in self.answers]
        return {**asdict(self), "answers": answers, "perplexity_ratio": self.perplexity_ratio,
                "content_kept": self.content_kept, "healthy": self.healthy}


@torch.no_grad()
def first_token_margin(model: nn.Module, tokenizer: Any, prompt: str) -> float:
    """How far (log-probability, nats) the model's most likely first answer token leads the second."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in _prompt_inputs(tokenizer, prompt).items()}
    if inputs["input_ids"].shape[-1] == 0:  # a tokenizer that encodes the prompt to nothing: no margin to measure
        return 0.0
    logits = model(**inputs).logits[0, -1].float()
    top = torch.log_softmax(logits, -1).topk(2).values
    return float(top[0] - top[1])


def pick_prompts(dense: nn.Module, tokenizer: Any, candidates: Sequence[str] = CANDIDATE_PROMPTS,
                 n: int = N_PROMPTS) -> list[tuple[str, float]]:
    """The ``n`` candidates with the largest first-token margins under ``dense``, with their margins."""
    if not 1 <= n <= len(candidates):
        raise ValueError(f"n must be between 1 and {len(candidates)}, got {n}")
    scored = [(prompt, first_token_margin(dense, tokenizer, prompt)) for prompt in candidates]
    return sorted(scored, key=lambda item: -item[1])[:n]


def key_words(answer: str, prompt: str) -> list[str]:
    """The dense answer's content words: in its first sentence, not in the prompt, its names (capitalized
    words after the first), else its numbers, else its three longest words (at least 5 letters)."""
    sentence = re.split(r"(?<=[.!?])\s|\n", answer.strip(), maxsplit=1)[0]
    asked = {w.lower() for w in re.findall(r"[\w']+", prompt)}
    words = [w.strip("'") for w in re.findall(r"[\w']+", sentence)]
    fresh = [w for w in words if w.lower() not in asked and w.lower() not in _STOPWORDS]
    names = [w for i, w in enumerate(words) if i > 0 and w[:1].isupper() and w in fresh]
    numbers = [w for w in fresh if w[:1].isdigit()]
    chosen = names or numbers or sorted((w for w in fresh if len(w) >= 5), key=len, reverse=True)[:3]
    return list(dict.fromkeys(chosen))


def _missing(answer: str, keys: list[str]) -> list[str]:
    present = {w.lower() for w in re.findall(r"[\w']+", answer)}
    return [k for k in keys if k.lower() not in present]


def quick_check(
    model: nn.Module, dense: nn.Module, tokenizer: Any, prompts: Sequence[str] | None = None, max_new_tokens: int = 40,
    heldout: str | Path = HELDOUT_TEXT, heldout_tokens: int = 1024, max_ppl_ratio: float = 1.10,
) -> QuickCheck:
    """Greedy answers of both models to ``prompts`` (default: the :data:`N_PROMPTS` of
    :data:`CANDIDATE_PROMPTS` the dense model is surest of) and their perplexity on ``heldout_tokens``
    tokens of ``heldout`` (a text file; default: a chapter of *Emma* shipped with hf_svdq, never calibration
    text)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    picked = [(p, first_token_margin(dense, tokenizer, p)) for p in prompts] if prompts else pick_prompts(dense, tokenizer)
    settings = EvalSettings(window=512, stride=512, max_tokens=heldout_tokens, max_new_tokens=max_new_tokens)
    ids = tokenize_text(tokenizer, Path(heldout).read_text(encoding="utf-8"), heldout_tokens)
    measured = perplexity_and_agreement(model, ids, settings, dense, progress=False)
    texts = [p for p, _ in picked]
    dense_samples, samples = (generation_health(m, tokenizer, texts, max_new_tokens, progress=False)["samples"]
                              for m in (dense, model))
    answers = []
    for (prompt, margin), dense_sample, sample in zip(picked, dense_samples, samples):
        keys = key_words(dense_sample["text"], prompt)
        answers.append(PromptCheck(
            prompt=prompt, margin=margin, dense_answer=dense_sample["text"], answer=sample["text"], key_words=keys,
            missing=_missing(sample["text"], keys), loops=bool(sample["loop"]), loop_unit=sample["loop_unit"],
            dense_loops=bool(dense_sample["loop"])))
    return QuickCheck(
        answers=answers, heldout_text=Path(heldout).name, heldout_tokens=int(measured["tokens"]),
        perplexity=float(measured["perplexity"]), dense_perplexity=float(measured["reference_perplexity"]),
        max_ppl_ratio=max_ppl_ratio, prompts_picked=not prompts,
    )


def format_quick_check(check: QuickCheck, width: int | None = None) -> str:
    """The check as text: per prompt the two answers in columns and the key words, then the verdict."""
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    column = max((width - 3) // 2, 20)
    lines = []
    for a in check.answers:
        left = textwrap.wrap(a.dense_answer, column) or [""]
        right = textwrap.wrap(a.answer, column) or [""]
        lines += [f"prompt: {a.prompt}  (dense first-token margin {a.margin:.2f} nats)",
                  f"{'dense':<{column}} | compressed", f"{'-' * column}-+-{'-' * column}"]
        for i in range(max(len(left), len(right))):
            lines.append(f"{left[i] if i < len(left) else '':<{column}} | {right[i] if i < len(right) else ''}")
        kept = "kept" if a.content_kept else "LOST"
        lines.append(f"key words {a.key_words}: {kept}" + (f" (missing {a.missing})" if a.missing else ""))
        if a.loops:
            lines.append(f"loop detector: LOOPS ({a.loop_unit!r} repeated)" + (" (the dense answer loops too)" if a.dense_loops else ""))
        lines.append("")
    lines += [
        f"answers: key words kept in {check.content_kept} of {len(check.answers)}; new loops: {check.new_loops}",
        (f"perplexity on {check.heldout_tokens} held-out tokens ({check.heldout_text}): {check.perplexity:.2f} vs dense "
         f"{check.dense_perplexity:.2f} = {check.perplexity_ratio:.3f}x"),
        (f"verdict: {'healthy' if check.healthy else 'DEGRADED'} (no new loop, key words kept in most answers, "
         f"perplexity <= {check.max_ppl_ratio:.2f}x dense)"),
    ]
    return "\n".join(lines)
