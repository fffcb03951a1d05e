"""The hf_svdq on-disk format: one named contract for tensor names, versions and metadata.

A compressed ``Linear`` (or GPT-2 ``Conv1D``) called ``<m>`` stores the tensors :data:`LOW_RANK_TENSORS`
declares (low-rank layout) or :data:`BASE_TENSORS` + :data:`CORRECTION_TENSORS` (residual layout, the
correction only when ``r > 0``), plus ``<m>.bias`` when it has one. Shapes are functions of the layer's
:class:`LayerShape`; the modules register their tensors from these declarations, the loader checks the
headers against them, byte counts and the README's table derive from them. Factors are in ``nn.Linear``
layout ``[out, in]`` also for ``Conv1D`` sources.

The left factor is deliberately stored under the dense name ``weight``: its shape ``[out, r]``
never equals the dense ``[out, in]`` (a layer is only compressed when ``r < in``), so a
transformers install that does not know hf_svdq fails with a size-mismatch error instead of
loading random weights. Float scales are stored in the dtype the model was compressed in.

**Experts.** A fused mixture-of-experts module (transformers 5: 3-D parameters ``<e>.gate_up_proj`` and
``<e>.down_proj``, one matrix per expert) stores each compressed stack ``<e>.<stack>`` with the same
tensors, stacked over the ``E`` experts: the name ``<m>.weight<suffix>`` of a Linear becomes
``<e>.<stack><suffix>`` (:func:`expert_tensor_name`) and every shape gains a leading ``E``
(:func:`expert_tensors`). Stacked, not one name per expert, because that is how transformers holds the
weights (one tensor per stack, the loader merges per-expert checkpoints into it), how llama.cpp stores
them (``ffn_*_exps``), and it keeps a 128-expert model's header at 14 tensors a block instead of
1,792; the price is one rank, bit width and group size per stack. The codes keep the stack's dense
name (``<e>.gate_up_proj``) with a shape the dense model never has, so a loader that does not know
hf_svdq fails with a size mismatch instead of loading random experts. A stack's matrices are in
``[out, in]`` layout also where transformers stores them transposed (gpt-oss).

The version is ``config.json``'s ``quantization_config.format_version``; the safetensors header
metadata is transformers' ``{"format": "pt"}`` alone (safetensors writes metadata from a hash map, so
a second key would change the header's byte order from save to save).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

QUANT_METHOD = "svdq"
"""``quant_method`` written into ``config.json``."""

FORMAT_VERSION = 1
"""Version of this layout; a checkpoint with a newer version is refused, never guessed at."""

LEFT = "weight"
LEFT_SCALE = "weight_scale"
RIGHT = "weight_vh"
RIGHT_SCALE = "weight_vh_scale"

FACTOR_NAMES: tuple[str, ...] = (LEFT, LEFT_SCALE, RIGHT, RIGHT_SCALE)
"""Parameter names of a compressed module, in the order they are written."""

CODES = "weight"
GROUP_SCALE = "weight_scale"
GROUP_ZERO = "weight_zero"
CORR_LEFT = "weight_u"
CORR_LEFT_SCALE = "weight_u_scale"
RESIDUAL_NAMES: tuple[str, ...] = (CODES, GROUP_SCALE, GROUP_ZERO)
CORRECTION_NAMES: tuple[str, ...] = (CORR_LEFT, CORR_LEFT_SCALE, RIGHT, RIGHT_SCALE)
"""Residual-layout parameter names: the quantized base, then the low-rank correction (``r > 0``)."""

INT8_MAX = 127
"""Symmetric INT8 range is ``[-127, 127]``; ``-128`` is never produced."""


@dataclass(frozen=True)
class LayerShape:
    """The dimensions a compressed layer's tensors follow: ``bits`` is ``None`` in the low-rank layout,
    the base width in the residual layout (``group_size`` ``None`` = one group per row)."""

    out_features: int
    in_features: int
    rank: int
    bits: int | None = None
    group_size: int | None = None

    @property
    def groups(self) -> int:
        return self.in_features // (self.group_size or self.in_features)

    @property
    def group(self) -> int:
        return self.group_size or self.in_features


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a layer type: its name, dtype (``"float"``: the model's float dtype), shape."""

    name: str
    dtype: str
    shape: Callable[[LayerShape], tuple[int, ...]]
    shape_doc: str
    meaning: str


FLOAT = "float"
"""The dtype of per-row scales and bias: the float dtype the model was compressed in."""
DTYPE_BYTES = {"int8": 1, "uint8": 1, "float16": 2}
SAFETENSORS_DTYPES = {"int8": ("I8",), "uint8": ("U8",), "float16": ("F16",), FLOAT: ("F64", "F32", "F16", "BF16")}

LOW_RANK_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec(LEFT, "int8", lambda s: (s.out_features, s.rank), "[out, r]", "left factor U sqrt(S), per-row symmetric"),
    TensorSpec(LEFT_SCALE, FLOAT, lambda s: (s.out_features,), "[out]", "scale of each row of the left factor"),
    TensorSpec(RIGHT, "int8", lambda s: (s.rank, s.in_features), "[r, in]", "right factor sqrt(S) Vh, per-row symmetric"),
    TensorSpec(RIGHT_SCALE, FLOAT, lambda s: (s.rank,), "[r]", "scale of each row of the right factor"),
)
"""The low-rank layout: ``W ~ (weight * weight_scale) @ (weight_vh * weight_vh_scale)``."""

BASE_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec(CODES, "uint8", lambda s: (s.out_features, s.groups, s.group * (s.bits or 8) // 8), "[out, in/g, g*bits/8]",
               "codes, INT4 packed two per byte"),
    TensorSpec(GROUP_SCALE, "float16", lambda s: (s.out_features, s.groups), "[out, in/g]", "one scale per group"),
    TensorSpec(GROUP_ZERO, "uint8", lambda s: (s.out_features, s.groups), "[out, in/g]", "one integer zero point per group"),
)
CORRECTION_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec(CORR_LEFT, "int8", lambda s: (s.out_features, s.rank), "[out, r]", "left factor of the correction (r > 0)"),
    TensorSpec(CORR_LEFT_SCALE, FLOAT, lambda s: (s.out_features,), "[out]", "scale of each row of it"),
    TensorSpec(RIGHT, "int8", lambda s: (s.rank, s.in_features), "[r, in]", "right factor of the correction (r > 0)"),
    TensorSpec(RIGHT_SCALE, FLOAT, lambda s: (s.rank,), "[r]", "scale of each row of it"),
)
"""The residual layout: ``W ~ (codes - zero) * scale + (weight_u * weight_u_scale) @ (weight_vh * weight_vh_scale)``;
the correction tensors are absent when ``r = 0``."""


def layer_tensors(shape: LayerShape) -> tuple[TensorSpec, ...]:
    """The tensors one compressed layer stores (bias not included), in the order they are written."""
    if shape.bits is None:
        return LOW_RANK_TENSORS
    return BASE_TENSORS + (CORRECTION_TENSORS if shape.rank else ())


def layer_nbytes(shape: LayerShape, float_bytes: int, experts: int = 1) -> int:
    """Stored bytes of one compressed layer (bias excluded), or of a stack of ``experts`` of them;
    ``float_bytes``: the size of the model's float dtype."""
    one = sum(math.prod(t.shape(shape)) * DTYPE_BYTES.get(t.dtype, float_bytes) for t in layer_tensors(shape))
    return one * experts


EXPERT_STACKS: tuple[str, ...] = ("gate_up_proj", "down_proj", "up_proj")
"""Names of the 3-D expert parameters hf_svdq compresses (``up_proj``: experts without a gate)."""


def expert_tensor_name(stack: str, tensor: str) -> str:
    """The stored name of a Linear-layout tensor (``weight``, ``weight_scale``, ...) in an expert stack
    called ``stack``: ``weight_u_scale`` of ``gate_up_proj`` is ``gate_up_proj_u_scale``."""
    if not tensor.startswith(LEFT):
        raise ValueError(f"not a layout tensor name: {tensor!r}")
    return stack + tensor[len(LEFT):]


def expert_tensors(stack: str, shape: LayerShape, experts: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{stored name: (dtype, shape)}`` of one compressed expert stack of ``experts`` matrices, each of
    ``shape`` (names relative to the experts module, in the order they are written)."""
    return {expert_tensor_name(stack, t.name): (t.dtype, (experts, *t.shape(shape))) for t in layer_tensors(shape)}


def _table(title: str, specs: tuple[TensorSpec, ...]) -> str:
    rows = "\n".join(f"| `<m>.{t.name}` | `{t.shape_doc}` | {t.dtype} | {t.meaning} |" for t in specs)
    return f"{title}\n\n| tensor | shape | dtype | meaning |\n|---|---|---|---|\n{rows}\n"


LOW_RANK_TITLE = "Low-rank layout (`residual_bits` unset):"
RESIDUAL_TITLE = "Residual layout (`residual_bits` set; `g` = `group_size`):"


def markdown_table(residual: bool) -> str:
    """One layout's table (the README's and each model card's), rendered from the declarations above."""
    if residual:
        return _table(RESIDUAL_TITLE, BASE_TENSORS + CORRECTION_TENSORS)
    return _table(LOW_RANK_TITLE, LOW_RANK_TENSORS)


EXPERTS_TITLE = "Expert stacks (`<e>.<stack>`, `<stack>` = `gate_up_proj` / `down_proj`, `E` experts; residual layout shown):"


def experts_table() -> str:
    """The expert-stack table, rendered from the residual declarations with the stacked names and shapes."""
    rows = "\n".join(f"| `<e>.{expert_tensor_name('<stack>', t.name)}` | `[E, {t.shape_doc[1:]}` | {t.dtype} | {t.meaning} |"
                     for t in BASE_TENSORS + CORRECTION_TENSORS)
    return f"{EXPERTS_TITLE}\n\n| tensor | shape | dtype | meaning |\n|---|---|---|---|\n{rows}\n"


def markdown_tables() -> str:
    """The README's tables of both layouts and of expert stacks."""
    return markdown_table(residual=False) + "\n" + markdown_table(residual=True) + "\n" + experts_table()
