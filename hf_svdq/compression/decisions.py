"""What the planner decided, as plain data: one :class:`LayerDecision` per Linear and the run's
:class:`CompressionSettings`.

The planner (:mod:`hf_svdq.compression.plan`) builds them from a :class:`~hf_svdq.SVDQuantConfig` once;
everything below it (compression, budgets, analysis, the quantizer's module swap) takes these
values, never the config. Nothing here imports transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..format.layout import LayerShape, layer_nbytes
from ..format.policy_file import SETTING_KEYS

RESIDUAL_METHODS = ("rtn", "mse", "gptq")
"""How the residual mode quantizes its base: round-to-nearest, RTN with a clip search, or GPTQ."""


@dataclass(frozen=True)
class CompressionSettings:
    """What is the same for every layer of one compression run.

    Per-layer values (rank, base bits, group size) live in the plan's ``LayerDecision``s; these are
    the defaults the planner gave them and the parameters of the algorithms that build them.
    """

    residual_bits: int | None = None
    """Default base bit width of the residual mode (None: pure low rank)."""
    group_size: int | None = None
    """Input columns per quantization group (None: one group per row)."""
    residual_method: str | None = None
    """One of :data:`RESIDUAL_METHODS` in residual mode."""
    refine_steps: int = 0
    """Alternations of re-quantizing ``W - L R`` and refitting ``L R``."""
    damp: float = 0.01
    """Eigenvalue floor of activation Grams, as a share of their mean eigenvalue."""
    energy: float | None = None
    """Rank from the spectrum: the smallest rank keeping this share of the squared singular values."""
    rank_floor: int = 8
    """Smallest rank a global budget gives any matrix."""
    target_bits_per_weight: float | None = None
    """Global budget in stored bits per weight over the compressed layers."""
    target_param_ratio: float | None = None
    """Global budget as the share of parameters the factors may hold (pure low rank)."""
    bit_choices: tuple[int, ...] | None = None
    """Base widths a mixed budget may give each layer."""
    calibrated: bool = False
    """Activation-aware: Grams of calibration activations steer every layer."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""
    sequential: bool = False
    """Calibrate block by block on the outputs of the already-compressed blocks."""
    stats_cache: str | None = None
    """Folder caching dense activation statistics across runs."""

    @property
    def budgeted(self) -> bool:
        """True when a global budget decides the ranks."""
        return self.target_bits_per_weight is not None or self.target_param_ratio is not None

    def policy_setting(self) -> dict[str, Any]:
        """The analysed setting a policy file records (what ``config_kwargs_from_policy`` reproduces)."""
        return {**{key: getattr(self, key) for key in SETTING_KEYS}, "calibrated": self.calibrated}


@dataclass(frozen=True)
class LinearSpec:
    """A layer hf_svdq can compress: ``nn.Linear`` or GPT-2 ``Conv1D`` (``transposed``), or a stack of
    ``experts`` matrices of a fused mixture-of-experts module, named ``<experts module>.<stack>``."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    transposed: bool = False
    experts: int = 0
    """Number of expert matrices of an expert stack; 0 for a Linear."""

    @property
    def matrices(self) -> int:
        """How many ``[out, in]`` matrices this layer holds (1 for a Linear)."""
        return self.experts or 1

    @property
    def numel(self) -> int:
        """Dense weights of the layer (all experts of a stack)."""
        return self.out_features * self.in_features * self.matrices


RANK_FROM_DATA = -1
"""``LayerDecision.rank`` of a layer to compress whose rank is decided from its weights or activations."""


@dataclass(frozen=True)
class LayerDecision:
    """One layer's plan. ``rank`` is None when the layer stays dense (``reason`` says why, or notes a
    clamp), :data:`RANK_FROM_DATA` when the weights or activations decide it. ``bits`` is the residual
    mode's base width (None: pure low rank) and ``group_size`` its quantization group (None: per row)."""

    spec: LinearSpec
    rank: int | None
    reason: str = ""
    bits: int | None = None
    group_size: int | None = None

    @property
    def method(self) -> str:
        """``"dense"``, ``"low_rank"`` (INT8 factors) or ``"residual"`` (group-quantized base + INT8 correction)."""
        if self.rank is None:
            return "dense"
        return "low_rank" if self.bits is None else "residual"


def layer_bytes(spec: LinearSpec, rank: int, bits: int | None, group_size: int | None, scale_bytes: int) -> int:
    """Stored bytes of one compressed layer at ``rank`` (bias excluded; all experts of a stack): INT8
    factors when ``bits`` is None, else a ``bits``-wide base in groups of ``group_size`` plus a
    rank-``rank`` correction."""
    shape = LayerShape(spec.out_features, spec.in_features, rank, bits, group_size if bits is not None else None)
    return layer_nbytes(shape, scale_bytes, spec.matrices) if bits is not None or rank else 0


def recorded_dense(decisions: Sequence[LayerDecision]) -> dict[str, str]:
    return {d.spec.name: d.reason for d in decisions if d.rank is None}


def recorded_ranks(decisions: Sequence[LayerDecision]) -> dict[str, int]:
    return {d.spec.name: d.rank for d in decisions if d.rank is not None}


def recorded_layer_bits(decisions: Sequence[LayerDecision], default_bits: int | None) -> dict[str, int]:
    """``{name: bits}`` of the compressed layers whose base width differs from ``default_bits``."""
    return {d.spec.name: d.bits for d in decisions if d.rank is not None and d.bits is not None and d.bits != default_bits}
