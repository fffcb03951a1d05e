"""Module-name patterns: globs (``"*.mlp.*"``) and regular expressions (``"re:..."``).

Patterns are matched against full module names (``model.layers.4.self_attn.k_proj``). A glob
matches the whole name, with ``*`` crossing dots. A ``re:`` pattern uses :func:`re.fullmatch`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class Pattern:
    """One compiled module-name pattern; ``text`` is what the user wrote."""

    text: str
    regex: re.Pattern[str]

    def matches(self, name: str) -> bool:
        return self.regex.fullmatch(name) is not None


def compile_pattern(text: object, field: str) -> Pattern:
    """Compile a glob or ``re:`` pattern, raising ``ValueError`` naming ``field`` on bad input."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{field}: a pattern must be a non-empty string, got {text!r}")
    if text.startswith(REGEX_PREFIX):
        body = text[len(REGEX_PREFIX) :]
        try:
            return Pattern(text, re.compile(body))
        except re.error as err:
            raise ValueError(f"{field}: invalid regular expression {text!r}: {err}") from None
    return Pattern(text, re.compile(fnmatch.translate(text)))


def compile_patterns(texts: Iterable[object], field: str) -> list[Pattern]:
    return [compile_pattern(t, field) for t in texts]


def first_match(patterns: Sequence[Pattern], name: str) -> Pattern | None:
    """The first pattern (in the user's order) that matches ``name``, or ``None``."""
    for pattern in patterns:
        if pattern.matches(name):
            return pattern
    return None


def unmatched(patterns: Sequence[Pattern], names: Iterable[str]) -> list[str]:
    """Texts of the patterns that match none of ``names``."""
    names = list(names)
    return [p.text for p in patterns if not any(p.matches(n) for n in names)]
