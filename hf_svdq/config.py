"""``SVDQuantConfig``: what to compress and how, as a transformers quantization config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import FORMAT_VERSION, QUANT_METHOD
from .patterns import Pattern, compile_pattern, compile_patterns


def _check_rank(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive int, got {value!r}")
    return value


class SVDQuantConfig(QuantizationConfigMixin):
    """Low-rank (truncated SVD) compression of Linear layers with INT8 factors.

    Args:
        rank: One rank for every compressed layer, or a mapping ``{pattern: rank}`` (first matching
            pattern wins; a layer matching no pattern stays dense). Patterns are globs over full module
            names (``"model.layers.0.*"``) or regexes prefixed with ``"re:"``. A rank above a layer's
            ``min(out, in)`` is clamped to it.
        skip: Module-name patterns kept dense. The output head, embeddings and anything tied to them
            are always kept dense as well.
        ranks: Resolved ``{module name: rank}``. Filled in when a model is compressed and saved with it,
            so a reload builds exact shapes; passing it yourself (e.g. from a policy) makes it
            authoritative and ``rank``/``skip`` are then only recorded.
        dense: Resolved ``{module name: reason}`` of eligible layers kept dense (filled in like ``ranks``).
        format_version: Version of the on-disk layout (:data:`hf_svdq.format.FORMAT_VERSION`).

    Raises:
        ValueError: naming the field and the value, for any invalid argument or unknown key.
    """

    def __init__(
        self,
        rank: int | Mapping[str, int] | None = None,
        skip: Sequence[str] | None = None,
        ranks: Mapping[str, int] | None = None,
        dense: Mapping[str, str] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(f"SVDQuantConfig got unknown key(s) {sorted(kwargs)}")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise ValueError(f"format_version must be a positive int, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {format_version} is newer than this hf_svdq understands ({FORMAT_VERSION}); "
                "upgrade hf_svdq to load this checkpoint"
            )
        self.format_version = format_version
        self.rank = self._validate_rank(rank)
        if skip is None:
            skip = []
        if isinstance(skip, str) or not isinstance(skip, Sequence):
            raise ValueError(f"skip must be a list of patterns, got {skip!r}")
        compile_patterns(skip, "skip")
        self.skip = list(skip)
        self.ranks = self._validate_ranks(ranks)
        self.dense = self._validate_dense(dense)
        if self.rank is None and self.ranks is None:
            raise ValueError("SVDQuantConfig needs `rank` (an int or a {pattern: rank} mapping) or `ranks`")
        # Whoever holds a config can pass it to from_pretrained: make "svdq" known to transformers
        # now, also when the autoload hook is switched off. Idempotent and cheap after the first call.
        from .registration import register

        register()

    @staticmethod
    def _validate_rank(rank: object) -> int | dict[str, int] | None:
        if rank is None:
            return None
        if isinstance(rank, Mapping):
            if not rank:
                raise ValueError("rank: a rank mapping must not be empty")
            for pattern, value in rank.items():
                compile_pattern(pattern, "rank")
                _check_rank(value, f"rank[{pattern!r}]")
            return dict(rank)
        return _check_rank(rank, "rank")

    @staticmethod
    def _validate_ranks(ranks: object) -> dict[str, int] | None:
        if ranks is None:
            return None
        if not isinstance(ranks, Mapping):
            raise ValueError(f"ranks must be a mapping of module name to rank, got {ranks!r}")
        for name, value in ranks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"ranks: module names must be non-empty strings, got {name!r}")
            _check_rank(value, f"ranks[{name!r}]")
        return dict(ranks)

    @staticmethod
    def _validate_dense(dense: object) -> dict[str, str] | None:
        if dense is None:
            return None
        if not isinstance(dense, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in dense.items()):
            raise ValueError(f"dense must be a mapping of module name to reason, got {dense!r}")
        return dict(dense)

    @property
    def is_resolved(self) -> bool:
        """True when per-module ranks are fixed (after compression, on reload, or from a policy)."""
        return self.ranks is not None

    def skip_patterns(self) -> list[Pattern]:
        return compile_patterns(self.skip, "skip")

    def rank_patterns(self) -> list[tuple[Pattern, int]]:
        """``[(pattern, rank)]`` in priority order; an int rank is the catch-all ``"*"``."""
        if self.rank is None:
            return []
        if isinstance(self.rank, int):
            return [(compile_pattern("*", "rank"), self.rank)]
        return [(compile_pattern(p, "rank"), r) for p, r in self.rank.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "rank": self.rank,
            "skip": list(self.skip),
            "ranks": None if self.ranks is None else dict(self.ranks),
            "dense": None if self.dense is None else dict(self.dense),
        }

