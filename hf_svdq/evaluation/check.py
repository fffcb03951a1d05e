"""The check ``hf-svdq compress`` runs after saving: dense and compressed answers side by side,
perplexity ratio on a short held-out passage, and the loop detector's verdict.

Cheap by design (one prompt, ~1k tokens of text) so that the first command a user runs shows
whether the compressed model still talks sense; ``hf-svdq eval`` is the thorough version.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..calibration.source import HELDOUT_TEXT
from .metrics import EvalSettings, generation_health, perplexity_and_agreement, tokenize_text

DEFAULT_PROMPT = "What is the capital of France?"


@dataclass
class QuickCheck:
    """What :func:`quick_check` measured; ``healthy`` is the one-word verdict."""

    prompt: str
    dense_answer: str
    answer: str
    loops: bool
    loop_unit: str | None
    dense_loops: bool
    heldout_text: str
    heldout_tokens: int
    perplexity: float
    dense_perplexity: float
    max_ppl_ratio: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.dense_perplexity

    @property
    def healthy(self) -> bool:
        """No loop the dense model does not have, and perplexity within ``max_ppl_ratio`` of dense."""
        return (not self.loops or self.dense_loops) and self.perplexity_ratio <= self.max_ppl_ratio

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio, "healthy": self.healthy}


def quick_check(
    model: nn.Module, dense: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 40,
    heldout: str | Path = HELDOUT_TEXT, heldout_tokens: int = 1024, max_ppl_ratio: float = 1.10,
) -> QuickCheck:
    """Greedy answers of both models to ``prompt`` and their perplexity on ``heldout_tokens`` tokens of
    ``heldout`` (a text file; default: a chapter of *Emma* shipped with hf_svdq, never calibration text)."""
    settings = EvalSettings(window=512, stride=512, max_tokens=heldout_tokens, max_new_tokens=max_new_tokens)
    ids = tokenize_text(tokenizer, Path(heldout).read_text(encoding="utf-8"), heldout_tokens)
    measured = perplexity_and_agreement(model, ids, settings, dense, progress=False)
    # each sample already carries its degeneration measures (loop, loop_unit, ...)
    dense_sample, sample = (generation_health(m, tokenizer, [prompt], max_new_tokens, progress=False)["samples"][0]
                            for m in (dense, model))
    return QuickCheck(
        prompt=prompt, dense_answer=dense_sample["text"], answer=sample["text"], loops=bool(sample["loop"]),
        loop_unit=sample["loop_unit"], dense_loops=bool(dense_sample["loop"]), heldout_text=Path(heldout).name,
        heldout_tokens=int(measured["tokens"]), perplexity=float(measured["perplexity"]),
        dense_perplexity=float(measured["reference_perplexity"]), max_ppl_ratio=max_ppl_ratio,
    )


def format_quick_check(check: QuickCheck, width: int | None = None) -> str:
    """The check as text: the two answers in columns, then one line per measure and the verdict."""
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    column = max((width - 3) // 2, 20)
    left = textwrap.wrap(check.dense_answer, column) or [""]
    right = textwrap.wrap(check.answer, column) or [""]
    lines = [f"prompt: {check.prompt}", f"{'dense':<{column}} | compressed", f"{'-' * column}-+-{'-' * column}"]
    for i in range(max(len(left), len(right))):
        lines.append(f"{left[i] if i < len(left) else '':<{column}} | {right[i] if i < len(right) else ''}")
    loop = f"LOOPS ({check.loop_unit!r} repeated)" if check.loops else "no loop"
    lines += [
        f"loop detector: {loop}" + (" (the dense answer loops too)" if check.loops and check.dense_loops else ""),
        (f"perplexity on {check.heldout_tokens} held-out tokens ({check.heldout_text}): {check.perplexity:.2f} vs dense "
         f"{check.dense_perplexity:.2f} = {check.perplexity_ratio:.3f}x"),
        f"verdict: {'healthy' if check.healthy else 'DEGRADED'} (no new loop, perplexity <= {check.max_ppl_ratio:.2f}x dense)",
    ]
    return "\n".join(lines)
