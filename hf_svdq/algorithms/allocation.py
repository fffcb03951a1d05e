"""Mixed-precision budgets: per layer, the loss of every (base bits, rank) option of the residual mode.

Pure functions on tensors. The loss of an option is the layer's **relative output error**: the energy of
``(W - Q_b - L R) S`` over the energy of ``W S``, where ``S S^T`` is the layer's input Gram (the
calibration activations; identity when data-free), ``Q_b`` round-to-nearest at ``b`` bits and ``L R`` the
best rank-``r`` correction of its error in that norm (the tail of the whitened error spectrum). Relative
errors add up across layers as the allocator's objective (no layer is weighted above another: the same
share of output error costs the same wherever it is), and the allocator
(:func:`hf_svdq.algorithms.budget.choose_options`) picks one option per layer for the byte budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .budget import tail_loss
from .groupquant import quantize_rtn
from .linalg import singular_values
from .whitening import Whitener, whitened_spectrum


def relative_error_curves(
    weight: torch.Tensor, gram: torch.Tensor | None, bit_choices: Sequence[int], group_size: int | None,
    damp: float = 0.01, whitener: Whitener | None = None,
) -> dict[int, torch.Tensor]:
    """``{bits: loss}`` with ``loss[r]`` (``r = 0 .. min(out, in)``) the relative output error of the base
    quantized at ``bits`` plus a rank-``r`` correction (float64, non-increasing in ``r``)."""
    w = weight.detach().to(torch.float32)
    group = group_size or w.shape[1]
    if whitener is None and gram is not None:
        whitener = Whitener.from_gram(gram, damp)
    importance = gram.diagonal() if gram is not None else None
    energy = (whitener.output_energy(w) if whitener is not None else float(w.to(torch.float64).pow(2).sum())) or 1.0
    curves = {}
    for bits in bit_choices:
        error = w - quantize_rtn(w, bits, group, importance).dequantize()
        spectrum = whitened_spectrum(error, whitener) if whitener is not None else singular_values(error)
        # tail_loss is the tail as a share of the error's energy; rescale it to a share of the layer's
        curves[bits] = tail_loss(spectrum) * (float(spectrum.to(torch.float64).pow(2).sum()) / energy)
    return curves


def option_ranks(limit: int, step: int = 8, max_rank: int = 256) -> list[int]:
    """Ranks offered to the allocator: 0, then every ``step`` up to ``min(limit, max_rank)``."""
    top = min(limit, max_rank)
    return sorted({0, *range(step, top + 1, step)} | ({top} if top > 0 else set()))
