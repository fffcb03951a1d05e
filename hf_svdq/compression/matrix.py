"""One weight matrix compressed: the residual mode's base, its low-rank correction, and the spectra
budgets read. Shared by Linear layers (:mod:`.compress`) and expert stacks (:mod:`.experts`); pure
functions on tensors."""

from __future__ import annotations

from typing import Any

import torch

from ..algorithms.groupquant import CLIP_GRID, inverse_hessian_factor, quantize_gptq, quantize_rtn
from ..algorithms.linalg import LowRankInt8, low_rank_int8, quantize_int8_rows, singular_values
from ..algorithms.whitening import Whitener, refit_left, whitened_low_rank, whitened_spectrum
from .decisions import CompressionSettings


def low_rank(target: torch.Tensor, rank: int, gram: torch.Tensor | None, whitener: Whitener | None, scale_dtype: torch.dtype) -> LowRankInt8:
    """INT8 factors of the best rank-``rank`` approximation of ``target``. Calibrated: in the output
    norm, with the right factor quantized first and the left one refitted to it; data-free: the same
    :func:`~hf_svdq.algorithms.linalg.low_rank_int8` the quantize-on-load path uses."""
    if whitener is None or gram is None:
        return low_rank_int8(target, rank, scale_dtype)
    left, right, _ = whitened_low_rank(target, whitener, rank)
    right_q = quantize_int8_rows(right, scale_dtype)
    left = refit_left(target, right_q.dequantize(), gram)
    return LowRankInt8(quantize_int8_rows(left, scale_dtype), right_q)


def spectrum(target: torch.Tensor, whitener: Whitener | None) -> torch.Tensor:
    return whitened_spectrum(target, whitener) if whitener is not None else singular_values(target)


def gptq_factor(gram: torch.Tensor | None, method: str | None, damp: float,
                whitener: Whitener | None = None) -> torch.Tensor | None:
    """GPTQ's inverse-Hessian factor of ``gram`` when ``method`` is GPTQ (None otherwise): computed once
    per layer and shared by its base and every refinement step; the inverse of ``whitener``'s factor
    when given (``Whitener.from_gram(gram, damp)``: the same Cholesky serves both)."""
    if gram is None or method != "gptq":
        return None
    return whitener.inverse if whitener is not None else inverse_hessian_factor(gram, damp)


def base_quantization(weight: torch.Tensor, gram: torch.Tensor | None, bits: int, group_size: int | None,
                      method: str | None, damp: float, hinv: torch.Tensor | None = None) -> Any:
    """The residual mode's base: ``weight`` (float32 ``[out, in]``) group-quantized at ``bits`` in groups of
    ``group_size`` (None: per row) by ``method`` (GPTQ needs ``gram``, and takes its :func:`gptq_factor`
    ``hinv`` when given; otherwise round-to-nearest, with a clip search for ``"mse"``,
    activation-weighted when ``gram`` is given)."""
    group = group_size or weight.shape[1]
    if gram is not None and method == "gptq":
        return quantize_gptq(weight, gram, bits, group, damp=damp, hinv=hinv)
    importance = gram.diagonal() if gram is not None else None
    clips = CLIP_GRID if method == "mse" else (1.0,)
    return quantize_rtn(weight, bits, group, importance, clips)


def residual_parts(w: torch.Tensor, rank: int, base: Any, group_size: int | None, settings: CompressionSettings,
                   gram: torch.Tensor | None, whitener: Whitener | None, dtype: torch.dtype,
                   hinv: torch.Tensor | None = None) -> tuple[Any, LowRankInt8 | None]:
    """``base`` and a rank-``rank`` correction of ``w - base`` (None at rank 0), refined
    ``settings.refine_steps`` times by alternating: re-quantize what the correction does not explain,
    then refit the correction. ``hinv``: the layer's :func:`gptq_factor`, computed here when needed."""
    correction = low_rank(w - base.dequantize(), rank, gram, whitener, dtype) if rank else None
    steps = settings.refine_steps if correction is not None else 0
    if steps and hinv is None:
        hinv = gptq_factor(gram, settings.residual_method, settings.damp, whitener)
    for _ in range(steps):
        assert correction is not None
        base = base_quantization(w - correction.dequantize(), gram, base.bits, group_size, settings.residual_method,
                                 settings.damp, hinv)
        correction = low_rank(w - base.dequantize(), rank, gram, whitener, dtype)
    return base, correction


def truncation_spectrum(weight: torch.Tensor, gram: torch.Tensor | None, bits: int | None, group_size: int | None,
                        damp: float, whitener: Whitener | None = None) -> torch.Tensor:
    """Singular values whose squared tail is the truncation loss of ``weight``: of the whitened weight
    when calibrated (``gram``; ``whitener`` its :class:`Whitener` when already built), of the
    ``bits``-wide round-to-nearest quantization error in residual mode."""
    w = weight.detach().to(torch.float32)
    if whitener is None and gram is not None:
        whitener = Whitener.from_gram(gram, damp)
    target = w - quantize_rtn(w, bits, group_size or w.shape[1]).dequantize() if bits else w
    return spectrum(target, whitener)
