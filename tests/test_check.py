"""The after-compress check's parts: prompt picking by first-token margin, key words, the verdict."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_svdq.evaluation.check import PromptCheck, QuickCheck, key_words, pick_prompts


class _Tokenizer:
    chat_template = None

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[len(text) % 7] * 3])}


class _Model(nn.Module):
    """Logits whose top-two gap is the prompt's length modulo 7 (the stub tokenizer's id)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        logits = torch.zeros(1, input_ids.shape[1], 5)
        logits[0, -1, 0] = float(input_ids[0, 0])
        return SimpleNamespace(logits=logits)


def test_prompts_are_picked_by_the_dense_first_token_margin():
    prompts = ["a" * 3, "b" * 6, "c" * 1, "d" * 5]  # margins 3, 6, 1, 5 nats (before the softmax's shift)
    picked = pick_prompts(_Model(), _Tokenizer(), prompts, n=2)
    assert [p for p, _ in picked] == ["b" * 6, "d" * 5]
    assert picked[0][1] == pytest.approx(6.0) and picked[1][1] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="n must be between 1 and 4"):
        pick_prompts(_Model(), _Tokenizer(), prompts, n=5)


@pytest.mark.parametrize(("answer", "prompt", "expected"), [
    ("The capital of France is Paris. It is a city of love.", "What is the capital of France?", ["Paris"]),
    ("Jupiter is the largest planet in our solar system.", "What is the largest planet in the solar system?",
     ["Jupiter"]),
    ("A spider has 8 legs.", "How many legs does a spider have?", ["8"]),
    ("The largest ocean is the Pacific Ocean, 149.7 million km2.", "Which ocean is the largest?", ["Pacific"]),
    ("William Shakespeare wrote Romeo and Juliet.", "Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("water boils at one hundred degrees", "At what temperature does water boil?", ["hundred", "degrees", "boils"]),
])
def test_key_words_are_the_answers_names_and_numbers_not_the_prompts(answer, prompt, expected):
    assert key_words(answer, prompt) == expected


def _answer(answer: str, keys: list[str], loops: bool = False) -> PromptCheck:
    missing = [k for k in keys if k.lower() not in answer.lower().split()]
    return PromptCheck("q", 3.0, "dense", answer, keys, missing, loops, "x" if loops else None, False)


def test_the_verdict_needs_the_key_words_in_most_answers():
    paris, lost = _answer("it is paris", ["Paris"]), _answer("l'allered is the capital", ["Paris"])
    assert paris.content_kept and not lost.content_kept
    check = QuickCheck([paris, paris, lost], "emma.txt", 1024, 10.2, 10.0, 1.10)
    assert check.content_kept == 2 and check.healthy
    assert not QuickCheck([paris, lost, lost], "emma.txt", 1024, 10.2, 10.0, 1.10).healthy
    assert not QuickCheck([paris, paris, _answer("it is paris", ["Paris"], loops=True)], "emma.txt", 1024, 10.2, 10.0,
                          1.10).healthy  # a new loop
    assert not QuickCheck([paris] * 3, "emma.txt", 1024, 11.2, 10.0, 1.10).healthy  # perplexity
    assert QuickCheck([paris] * 3, "emma.txt", 1024, 10.2, 10.0, 1.10).to_dict()["answers"][0]["content_kept"]
