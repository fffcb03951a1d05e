"""Pure tensor algorithms: truncated SVD, symmetric INT8 rows, byte accounting, SQNR.

Nothing here knows about transformers; every function takes and returns plain tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..format.layout import INT8_MAX, LayerShape, layer_nbytes


@dataclass(frozen=True)
class Int8Rows:
    """A matrix stored as INT8 codes with one symmetric scale per row."""

    codes: torch.Tensor  # int8 [rows, cols]
    scale: torch.Tensor  # float [rows]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.codes.to(dtype) * self.scale.to(dtype)[:, None]


@dataclass(frozen=True)
class LowRankInt8:
    """``W ~ left.dequantize() @ right.dequantize()`` with ``left`` [out, r] and ``right`` [r, in]."""

    left: Int8Rows
    right: Int8Rows

    @property
    def rank(self) -> int:
        return int(self.right.codes.shape[0])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        product = self.left.dequantize(torch.float32) @ self.right.dequantize(torch.float32)
        return product.to(dtype)


def quantize_int8_rows(matrix: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> Int8Rows:
    """Round each row of ``matrix`` to INT8 with a symmetric per-row scale ``max|row| / 127``.

    The scale is rounded to ``scale_dtype`` *before* the codes are computed, so dequantizing with
    the stored scale is exactly what the codes were fitted to. All-zero rows get scale 0, codes 0.
    """
    if matrix.dim() != 2:
        raise ValueError(f"quantize_int8_rows expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    work = matrix.detach().to(torch.float32)
    amax = work.abs().amax(dim=1)
    scale = (amax / INT8_MAX).to(scale_dtype)
    safe = scale.to(torch.float32)
    safe = torch.where(safe > 0, safe, torch.ones_like(safe))
    codes = torch.round(work / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).contiguous()
    return Int8Rows(codes=codes, scale=scale)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(L, R)`` of ``matrix`` in Frobenius norm, ``L R ~ matrix``.

    The singular values are split evenly (``L = U sqrt(S)``, ``R = sqrt(S) Vh``) so both factors
    have similar ranges, which is what per-row INT8 needs. Computed in float32 whatever the input.
    """
    m, n = matrix.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}")
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float32), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def low_rank_int8(
    matrix: torch.Tensor, rank: int, scale_dtype: torch.dtype = torch.float32
) -> LowRankInt8:
    """Truncated SVD of ``matrix`` to ``rank``, each factor stored as per-row INT8."""
    left, right = truncated_svd(matrix, rank)
    return LowRankInt8(quantize_int8_rows(left, scale_dtype), quantize_int8_rows(right, scale_dtype))


def break_even_rank(out_features: int, in_features: int) -> float:
    """Rank at which two float factors hold as many numbers as the dense matrix: ``m n / (m + n)``."""
    return out_features * in_features / (out_features + in_features)


def factor_bytes(out_features: int, in_features: int, rank: int, scale_bytes: int) -> int:
    """Bytes of INT8 factors of rank ``rank`` plus their per-row scales (bias excluded; the low-rank layout)."""
    return layer_nbytes(LayerShape(out_features, in_features, rank), scale_bytes)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the squared singular-value mass."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    power = singular_values.detach().to(torch.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    ref = reference.detach().to(torch.float64)
    noise = float((ref - approximation.detach().to(torch.float64)).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
