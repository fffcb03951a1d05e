"""Forward kernels of a low-rank INT8 layer.

``low_rank_linear_reference`` is the pure-PyTorch definition every other path is tested against:
dequantize each thin factor to the compute dtype (scale applied before the matmul, so fp16 cannot
overflow) and run two thin matmuls. The dense ``[out, in]`` weight is never formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """INT8 ``codes`` [rows, cols] times per-row ``scale`` [rows], in ``dtype``."""
    return codes.to(dtype) * scale.to(dtype).unsqueeze(1)


def low_rank_linear_reference(
    x: torch.Tensor,
    left: torch.Tensor,
    left_scale: torch.Tensor,
    right: torch.Tensor,
    right_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (L R)^T + bias`` with ``L = left*left_scale`` [out, r], ``R = right*right_scale`` [r, in]."""
    dtype = x.dtype
    hidden = F.linear(x, dequantize_rows(right, right_scale, dtype))
    return F.linear(hidden, dequantize_rows(left, left_scale, dtype), None if bias is None else bias.to(dtype))


low_rank_linear = low_rank_linear_reference
"""The kernel the module calls. On CPU (AVX2) ``torch.ops.aten._weight_int8pack_mm`` measured
3-4x slower than this path for these shapes, so the reference is also the fast path for now."""
