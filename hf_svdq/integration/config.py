"""``SVDQuantConfig``: what to compress and how, as a transformers quantization config."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..algorithms.groupquant import SUPPORTED_BITS
from ..calibration.source import CalibrationConfig
from ..compression.decisions import RESIDUAL_METHODS
from ..format.layout import FORMAT_VERSION, QUANT_METHOD
from .patterns import Pattern, compile_pattern, compile_patterns


def _is_bits(value: object) -> bool:
    """A supported bit width as an int (``True`` and ``4.0`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value in SUPPORTED_BITS


def _check_rank(value: object, field: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "a non-negative int (0: no low-rank correction)" if allow_zero else "a positive int"
        raise ValueError(f"{field} must be {kind}, got {value!r}")
    return value


RECOMMENDED_DAMP = 0.003
"""The recommended mode's Gram damping: on SmolLM2, 2 x 32768 held-out tokens, 0.001 and 0.003 give the
same perplexity within noise and 0.01 (GPTQ's usual) is 0.3-0.5% worse (README, "How precise a
perplexity ratio is")."""


class SVDQuantConfig(QuantizationConfigMixin):
    """Low-rank (truncated SVD) compression of Linear layers with INT8 factors.

    Rank policies (give one): ``rank``; ``energy``; ``target_bits_per_weight`` or
    ``target_param_ratio`` (a global budget split by measured truncation loss, each matrix at least
    ``rank_floor``). Modes: plain low rank (default), activation-aware when ``calibration`` is given,
    and ``W ~ Q + L R`` when ``residual_bits`` is set (quantize first, then spend the rank on the
    quantization error; ``rank=0`` is plain group quantization).

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
        energy: Per matrix, the smallest rank keeping this share of the squared singular values (of the
            whitened weight when calibrated, of the quantization error in residual mode).
        target_bits_per_weight: Average stored bits per weight over the compressed layers.
        target_param_ratio: Share of the compressed layers' parameters the factors may hold (pure low rank).
        rank_floor: Smallest rank a budget policy gives any matrix.
        residual_bits: 4 or 8: group-quantize the weight and add a low-rank correction of the error.
        group_size: Input columns per quantization group (None: one group per row).
        residual_method: ``"gptq"`` (error feedback; needs calibration, its default), ``"mse"``
            (round-to-nearest with a per-group clip search, activation-weighted when calibrated) or
            ``"rtn"`` (plain min/max round-to-nearest, the data-free default).
        refine_steps: Residual mode: alternate re-quantizing ``W - L R`` and refitting ``L R`` this many times.
        bit_choices: Residual mode with ``target_bits_per_weight``: base bit widths the budget may give each
            layer (e.g. ``[4, 8]``), chosen with its rank to minimise the summed relative output error;
            must include ``residual_bits``. The result is saved in ``layer_bits``.
        layer_bits: Resolved ``{module name: base bits}`` for layers whose base width differs from
            ``residual_bits`` (filled in at compression and saved, like ``ranks``).
        calibration: A :class:`~hf_svdq.calibration.source.CalibrationConfig` (or dict) for activation-aware
            compression; only a summary (source, sha256, sizes) is saved.
        damp: Damping added to the activation Gram's diagonal, as a share of its mean (GPTQ's damping; the
            whitening uses the same damped Gram).
        int8_head: Keep an in-memory INT8 (per-row) copy of the output head and use it for decode-sized
            inputs on CPU, where the float head is the largest read per token; the checkpoint still
            stores the float head (often tied to the embedding), so this costs 1 byte per head weight
            of memory and nothing on disk. Larger inputs (prefill) use the float head.
        coverage: Recorded at compression: the parameters compressed and those kept dense, by reason
            (see :mod:`hf_svdq.compression.coverage`); saved, not an input.
        format_version: Version of the on-disk layout (:data:`hf_svdq.format.layout.FORMAT_VERSION`).

    Raises:
        ValueError: naming the field and the value, for any invalid argument or unknown key.
    """

    def __init__(
        self,
        rank: int | Mapping[str, int] | None = None,
        skip: Sequence[str] | None = None,
        *,
        energy: float | None = None,
        target_bits_per_weight: float | None = None,
        target_param_ratio: float | None = None,
        rank_floor: int = 8,
        residual_bits: int | None = None,
        group_size: int | None = 64,
        residual_method: str | None = None,
        refine_steps: int = 0,
        bit_choices: Sequence[int] | None = None,
        layer_bits: Mapping[str, int] | None = None,
        calibration: CalibrationConfig | Mapping[str, Any] | None = None,
        damp: float = 0.01,
        ranks: Mapping[str, int] | None = None,
        dense: Mapping[str, str] | None = None,
        int8_head: bool = False,
        coverage: Mapping[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(f"SVDQuantConfig got unknown key(s) {sorted(kwargs)}")
        _require(quant_method == QUANT_METHOD, f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # (transformers types it as its own enum)
        self.format_version = _format_version(format_version)
        _require(residual_bits is None or _is_bits(residual_bits),
                 f"residual_bits must be one of {SUPPORTED_BITS} or None, got {residual_bits!r}")
        self.residual_bits = residual_bits
        self.rank = self._validate_rank(rank, allow_zero=residual_bits is not None)
        self.skip = _skip(skip)
        self.ranks = self._validate_ranks(ranks)
        self.dense = self._validate_dense(dense)
        self.energy = _optional(energy, lambda v: _is_number(v) and 0 < v <= 1, "energy must be a number in (0, 1]")
        self.target_bits_per_weight = _optional(target_bits_per_weight, lambda v: _is_number(v) and math.isfinite(v) and v > 0,
                                                "target_bits_per_weight must be a positive finite number")
        self.target_param_ratio = _optional(target_param_ratio, lambda v: _is_number(v) and 0 < v < 1,
                                            "target_param_ratio must be in (0, 1) (the share of parameters kept)")
        _require(_is_int(rank_floor) and rank_floor >= 0, f"rank_floor must be a non-negative int, got {rank_floor!r}")
        self.rank_floor = rank_floor
        self.group_size = _group_size(group_size, residual_bits)
        _require(_is_number(damp) and 0 <= damp < 1, f"damp must be in [0, 1), got {damp!r}")
        self.damp = float(damp)
        self.calibration = CalibrationConfig.coerce(calibration)
        self.residual_method = _residual_method(residual_method, residual_bits, self.calibration is not None)
        _require(_is_int(refine_steps) and refine_steps >= 0, f"refine_steps must be a non-negative int, got {refine_steps!r}")
        _require(not refine_steps or residual_bits is not None, "refine_steps applies to residual mode (residual_bits=4|8)")
        self.refine_steps = refine_steps
        self.bit_choices = self._validate_bit_choices(bit_choices, residual_bits, target_bits_per_weight)
        self.prediction: dict[str, Any] | None = None  # set by a mixed budget at compression; not saved
        self.layer_bits = self._validate_layer_bits(layer_bits, residual_bits)
        _require(isinstance(int8_head, bool), f"int8_head must be True or False, got {int8_head!r}")
        self.int8_head = int8_head
        _require(coverage is None or isinstance(coverage, Mapping), f"coverage must be a mapping or None, got {coverage!r}")
        self.coverage = None if coverage is None else dict(coverage)
        self._check_rank_policy()

    def _check_rank_policy(self) -> None:
        """Exactly one rank policy (or resolved ``ranks``), and one that fits the mode."""
        policies = [n for n in ("rank", "energy", "target_bits_per_weight", "target_param_ratio") if getattr(self, n) is not None]
        if len(policies) > 1:
            raise ValueError(f"give one rank policy, got {policies}")
        if self.target_param_ratio is not None and self.residual_bits is not None:
            raise ValueError("target_param_ratio applies to pure low rank; with residual_bits use target_bits_per_weight")
        if not policies and self.ranks is None:
            raise ValueError(
                "SVDQuantConfig needs a rank policy: `rank` (an int or {pattern: rank}), `energy`, "
                "`target_bits_per_weight`, `target_param_ratio`, or resolved `ranks`"
            )

    @classmethod
    def from_policy(cls, policy: Any, calibration: CalibrationConfig | Mapping[str, Any] | None = None) -> SVDQuantConfig:
        """The config a sensitivity policy (``hf-svdq analyze``'s ``policy.json``, a path or a dict)
        describes: its per-layer ranks and dense layers, with the analysed setting (residual bits,
        group size, ...). Pass ``calibration`` to compress activation-aware as the analysis did.

        Raises:
            ValueError: the policy is not a readable hf_svdq policy; loading it into a model whose
                layers it does not name exactly raises when ``from_pretrained`` plans the layers.
        """
        from ..format.policy_file import config_kwargs_from_policy

        return cls(**config_kwargs_from_policy(policy, calibration))

    @classmethod
    def recommended(
        cls, bits_per_weight: float = 5.0, *, calibration: Any = "default", group_size: int = 64, **kwargs: Any
    ) -> SVDQuantConfig:
        """The mode we recommend: INT4 GPTQ (``group_size`` 64) plus a whitened INT8 low-rank correction of
        its error, ``bits_per_weight`` in all (5.0: ~1.03-1.04x dense perplexity on SmolLM2-135M), with one
        refinement step and ``damp`` :data:`RECOMMENDED_DAMP`, calibrated on ``calibration`` (default: the bundled public-domain text).
        A string or list ``calibration`` gets 32 windows of 256 tokens (measured as good as 64 at half
        the time); ``kwargs`` go to the constructor (``skip``, ``int8_head``, ...)."""
        if isinstance(calibration, (str, os.PathLike, list, tuple)):
            calibration = CalibrationConfig.coerce_source(calibration, n_samples=32, seq_len=256)
        kwargs.setdefault("damp", RECOMMENDED_DAMP)
        return cls(target_bits_per_weight=bits_per_weight, residual_bits=4, group_size=group_size, refine_steps=1,
                   calibration=calibration, **kwargs)

    def describe(self) -> str:
        """One line: the mode, its budget or rank policy and the calibration."""
        if self.residual_bits is not None:
            method = (self.residual_method or "rtn").upper()
            group = f"group {self.group_size}" if self.group_size else "per row"
            mode = f"INT{self.residual_bits} {method} ({group}) + INT8 low-rank correction"
        else:
            mode = "INT8 low-rank factors" + (" (whitened)" if self.calibration is not None else "")
        policy = (f"{self.target_bits_per_weight:g} bits/weight" if self.target_bits_per_weight is not None
                  else f"{self.target_param_ratio:g} of the parameters" if self.target_param_ratio is not None
                  else f"energy {self.energy:g}" if self.energy is not None
                  else f"rank {self.rank}" if self.rank is not None else "resolved ranks")
        calibration = "data-free" if self.calibration is None else f"calibrated on {self.calibration.summary()['source']}"
        return f"{mode}, {policy}, {calibration}"

    @staticmethod
    def _validate_rank(rank: object, allow_zero: bool) -> int | dict[str, int] | None:
        if rank is None:
            return None
        if isinstance(rank, Mapping):
            if not rank:
                raise ValueError("rank: a rank mapping must not be empty")
            for pattern, value in rank.items():
                compile_pattern(pattern, "rank")
                _check_rank(value, f"rank[{pattern!r}]", allow_zero)
            return dict(rank)
        return _check_rank(rank, "rank", allow_zero)

    @staticmethod
    def _validate_ranks(ranks: object) -> dict[str, int] | None:
        if ranks is None:
            return None
        if not isinstance(ranks, Mapping):
            raise ValueError(f"ranks must be a mapping of module name to rank, got {ranks!r}")  # noqa: TRY004
        for name, value in ranks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"ranks: module names must be non-empty strings, got {name!r}")
            _check_rank(value, f"ranks[{name!r}]", allow_zero=True)
        return dict(ranks)

    @staticmethod
    def _validate_bit_choices(choices: object, residual_bits: int | None, target: object) -> list[int] | None:
        if choices is None:
            return None
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
            raise ValueError(f"bit_choices must be a non-empty list of bit widths, got {choices!r}")
        for bits in choices:
            if not _is_bits(bits):
                raise ValueError(f"bit_choices: every entry must be one of {SUPPORTED_BITS}, got {bits!r}")
        if residual_bits is None or residual_bits not in choices:
            raise ValueError(f"bit_choices {list(choices)} must include residual_bits ({residual_bits!r})")
        if target is None:
            raise ValueError("bit_choices needs target_bits_per_weight (the budget that picks each layer's bits)")
        return sorted(set(choices))

    @staticmethod
    def _validate_layer_bits(layer_bits: object, residual_bits: int | None) -> dict[str, int] | None:
        if layer_bits is None:
            return None
        if residual_bits is None:
            raise ValueError("layer_bits applies to residual mode (residual_bits=4|8)")
        if not isinstance(layer_bits, Mapping):
            raise ValueError(f"layer_bits must be a mapping of module name to bits, got {layer_bits!r}")  # noqa: TRY004 (config errors are ValueError)
        for name, bits in layer_bits.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"layer_bits: module names must be non-empty strings, got {name!r}")
            if not _is_bits(bits):
                raise ValueError(f"layer_bits[{name!r}] must be one of {SUPPORTED_BITS}, got {bits!r}")
        return dict(layer_bits)

    def bits_for(self, name: str) -> int | None:
        """The base bit width of layer ``name`` (None outside residual mode)."""
        if self.residual_bits is None:
            return None
        return (self.layer_bits or {}).get(name, self.residual_bits)

    @staticmethod
    def _validate_dense(dense: object) -> dict[str, str] | None:
        if dense is None:
            return None
        if not isinstance(dense, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in dense.items()):
            raise ValueError(f"dense must be a mapping of module name to reason, got {dense!r}")
        return dict(dense)

    @property
    def compresses_after_load(self) -> bool:
        """True when compression needs the loaded weights or activations first (calibration,
        residual quantization, energy or budget policies) rather than one weight at a time."""
        return (
            self.calibration is not None
            or self.residual_bits is not None
            or self.energy is not None
            or self.target_bits_per_weight is not None
            or self.target_param_ratio is not None
        )

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

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """The config of a saved checkpoint (``config.json``'s ``quantization_config``; transformers calls
        this when loading). Its ``calibration`` must be the recorded summary: a saved config never names
        calibration data, so a live source (a file, text, a dataset) is refused before anything is read
        (a downloaded config could otherwise make loading open any path)."""
        if not isinstance(config_dict, Mapping):
            raise ValueError(f"quantization_config must be a JSON object, got {type(config_dict).__name__}")  # noqa: TRY004
        calibration = config_dict.get("calibration")
        if calibration is not None and not (isinstance(calibration, Mapping) and "sha256" in calibration):
            shown = sorted(calibration) if isinstance(calibration, Mapping) else type(calibration).__name__
            raise ValueError(
                f"quantization_config.calibration must be the recorded summary (with 'sha256') in a saved config, got "
                f"{shown}: calibration is a compress-time input and loading never reads it; to compress with calibration "
                "pass SVDQuantConfig(calibration=...) to from_pretrained"
            )
        return super().from_dict(dict(config_dict), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "rank": self.rank,
            "skip": list(self.skip),
            "energy": self.energy,
            "target_bits_per_weight": self.target_bits_per_weight,
            "target_param_ratio": self.target_param_ratio,
            "rank_floor": self.rank_floor,
            "residual_bits": self.residual_bits,
            "group_size": self.group_size,
            "residual_method": self.residual_method,
            "refine_steps": self.refine_steps,
            "bit_choices": None if self.bit_choices is None else list(self.bit_choices),
            "layer_bits": None if self.layer_bits is None else dict(self.layer_bits),
            "calibration": None if self.calibration is None else self.calibration.summary(),
            "damp": self.damp,
            "ranks": None if self.ranks is None else dict(self.ranks),
            "dense": None if self.dense is None else dict(self.dense),
            "int8_head": self.int8_head,
            "coverage": self.coverage,
        }


def _require(ok: bool, message: str) -> None:
    """Config errors are ``ValueError`` naming the field (a wrong type included: it is a wrong value here)."""
    if not ok:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(value: Any, valid: Callable[[Any], bool], message: str) -> Any:
    """``value`` when it is ``None`` or ``valid``; ``ValueError("<message>, got <value>")`` otherwise."""
    _require(value is None or valid(value), f"{message}, got {value!r}")
    return value


def _format_version(version: object) -> int:
    _require(_is_int(version) and version >= 1, f"format_version must be a positive int, got {version!r}")  # type: ignore[operator]
    assert isinstance(version, int)
    if version > FORMAT_VERSION:
        raise ValueError(f"format_version {version} is newer than this hf_svdq understands ({FORMAT_VERSION}); "
                         "upgrade hf_svdq to load this checkpoint")
    return version


def _skip(skip: object) -> list[str]:
    skip = [] if skip is None else skip
    _require(not isinstance(skip, str) and isinstance(skip, Sequence), f"skip must be a list of patterns, got {skip!r}")
    compile_patterns(skip, "skip")  # type: ignore[arg-type]
    return list(skip)  # type: ignore[call-overload]


def _group_size(group_size: object, residual_bits: int | None) -> int | None:
    _require(group_size is None or (_is_int(group_size) and group_size > 0),  # type: ignore[operator]
             f"group_size must be a positive int or None (one group per row), got {group_size!r}")
    _require(not (residual_bits == 4 and group_size is not None and group_size % 2),  # type: ignore[operator]
             f"group_size must be even with residual_bits=4 (two codes per byte), got {group_size!r}")
    return group_size  # type: ignore[return-value]


def _residual_method(method: object, residual_bits: int | None, calibrated: bool) -> str | None:
    _require(method is None or method in RESIDUAL_METHODS,
             f"residual_method must be one of {list(RESIDUAL_METHODS)} or None, got {method!r}")
    _require(method != "gptq" or calibrated, "residual_method 'gptq' needs calibration data (calibration=...)")
    if method is None and residual_bits is not None:
        return "gptq" if calibrated else "rtn"
    return method  # type: ignore[return-value]
