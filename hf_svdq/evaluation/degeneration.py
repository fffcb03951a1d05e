"""Degeneration measures of generated text: loops, repeated n-grams, distinct-n.

Pure functions over "units" (words and punctuation marks, :func:`units`), so they are testable on
crafted strings and independent of any tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

_UNIT = re.compile(r"\w+|[^\w\s]")


def units(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: ``"Hi, hi!"`` -> ``["hi", ",", "hi", "!"]``."""
    return [u.lower() for u in _UNIT.findall(text)]


@dataclass(frozen=True)
class Loop:
    """The text ends in ``repeats`` (possibly fractional) back-to-back copies of ``unit``."""

    period: int
    repeats: float
    unit: tuple[Any, ...]


def detect_loop(seq: Sequence[Hashable], max_period: int = 20, min_repeats: float = 2.5, min_span: int = 6) -> Loop | None:
    """The shortest period ``p`` such that the last ``span >= max(min_span, min_repeats * p)`` units
    are periodic with period ``p``; ``None`` when the text does not end in a loop.

    ``",,,,,,"`` is period 1 (6 repeats); ``"the meaning of life is the meaning of life is the
    meaning of life"`` is period 5 (2.8 repeats); two copies of a sentence are not a loop. Works on
    any sequence of comparable items (text units, token ids).
    """
    n = len(seq)
    for period in range(1, min(max_period, n // 2) + 1):
        # walk back from the end while seq[i] == seq[i + period]
        i = n - period - 1
        while i >= 0 and seq[i] == seq[i + period]:
            i -= 1
        span = n - (i + 1)  # units that are periodic, counting the final copy
        if span >= max(min_span, min_repeats * period):
            start = i + 1
            return Loop(period, span / period, tuple(seq[start : start + period]))
    return None


def ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seq: Sequence[str], n: int = 2) -> float:
    """Unique n-grams over all n-grams (1.0 = no repetition); 1.0 for texts shorter than n."""
    grams = ngrams(seq, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_rate(seq: Sequence[str], n: int = 3) -> float:
    """Fraction of n-grams that already occurred earlier in the text (0.0 = none)."""
    grams = ngrams(seq, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def degeneration_report(text: str) -> dict[str, object]:
    """All measures for one generated text."""
    seq = units(text)
    loop = detect_loop(seq)
    return {
        "units": len(seq),
        "loop": loop is not None,
        "loop_period": loop.period if loop else None,
        "loop_repeats": round(loop.repeats, 2) if loop else None,
        "loop_unit": " ".join(loop.unit) if loop else None,
        "repeated_3gram_rate": repeated_ngram_rate(seq, 3),
        "distinct_1": distinct_n(seq, 1),
        "distinct_2": distinct_n(seq, 2),
    }
