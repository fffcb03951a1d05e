"""The hf_svdq on-disk format: one named contract for tensor names, versions and metadata.

A compressed ``Linear`` (or GPT-2 ``Conv1D``) called ``<m>`` with output size ``out``, input size
``in`` and rank ``r`` is stored as four tensors (plus its ``<m>.bias`` when it has one):

=========================  =============  ==========  =========================================
name                       shape          dtype       meaning
=========================  =============  ==========  =========================================
``<m>.weight``             ``[out, r]``   int8        left factor ``U sqrt(S)``, per-row symmetric
``<m>.weight_scale``       ``[out]``      float       one scale per row of the left factor
``<m>.weight_vh``          ``[r, in]``    int8        right factor ``sqrt(S) Vh``, per-row symmetric
``<m>.weight_vh_scale``    ``[r]``        float       one scale per row of the right factor
=========================  =============  ==========  =========================================

The dense weight is ``(weight * weight_scale[:, None]) @ (weight_vh * weight_vh_scale[:, None])``,
in ``nn.Linear`` layout ``[out, in]`` also for ``Conv1D`` sources.

**Residual layout** (``residual_bits`` set): ``W ~ Q + L R`` with ``Q`` group-quantized:

=========================  ===========================  ========  ==================================
``<m>.weight``             ``[out, in/g, g*bits/8]``    uint8     codes, INT4 packed two per byte
``<m>.weight_scale``       ``[out, in/g]``              float16   one scale per group
``<m>.weight_zero``        ``[out, in/g]``              uint8     one integer zero point per group
``<m>.weight_u``           ``[out, r]``                 int8      left factor of the correction
``<m>.weight_u_scale``     ``[out]``                    float     per-row scale
``<m>.weight_vh``          ``[r, in]``                  int8      right factor of the correction
``<m>.weight_vh_scale``    ``[r]``                      float     per-row scale
=========================  ===========================  ========  ==================================

``Q = (codes - zero) * scale`` per group of ``g`` input columns; the four ``weight_u*``/``weight_vh*``
tensors are absent when ``r = 0``. ``bits`` is ``residual_bits`` of ``config.json``'s
``quantization_config``, or the layer's entry in its ``layer_bits`` (mixed-precision budgets); the
loader checks every layer's code tensor against the width its config names. The 3-D code tensor cannot match a dense ``[out, in]`` weight.

The left factor is deliberately stored under the dense name ``weight``: its shape ``[out, r]``
never equals the dense ``[out, in]`` (a layer is only compressed when ``r < in``), so a
transformers install that does not know hf_svdq fails with a size-mismatch error instead of
loading random weights. Float scales are stored in the dtype the model was compressed in.

The version is ``config.json``'s ``quantization_config.format_version``; the safetensors header
metadata is transformers' ``{"format": "pt"}`` alone (safetensors writes metadata from a hash map, so
a second key would change the header's byte order from save to save).
"""

from __future__ import annotations

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
