"""Pure-PyTorch reference kernels: the definition of what every compressed layer computes.

``low_rank_linear_reference`` dequantizes each thin factor to the compute dtype and runs two thin
matmuls (the dense ``[out, in]`` weight is never formed). ``low_rank_linear`` is the same product with
the per-row scales applied to the (small) matmul outputs instead of the factors, which saves one pass
over each factor (2-20x faster at batch 1 on CPU); float16 keeps the reference order, because an
unscaled INT8 product can exceed its range. ``residual_linear_reference`` dequantizes the group
quantized base ``Q`` to the compute dtype, multiplies, and adds the low-rank correction.

These run on every device and for every input size, and they are what autograd differentiates (LoRA
training). The fused CPU decode kernels (:mod:`hf_svdq.kernels.numba_cpu`) are tested against them;
:mod:`hf_svdq.kernels.ops` chooses between the two.
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


def low_rank_linear(
    x: torch.Tensor,
    left: torch.Tensor,
    left_scale: torch.Tensor,
    right: torch.Tensor,
    right_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same value as :func:`low_rank_linear_reference`, scaling the outputs instead of the factors."""
    dtype = x.dtype
    if dtype == torch.float16:
        return low_rank_linear_reference(x, left, left_scale, right, right_scale, bias)
    hidden = F.linear(x, right.to(dtype)) * right_scale.to(dtype)
    out = F.linear(hidden, left.to(dtype)) * left_scale.to(dtype)
    return out if bias is None else out + bias.to(dtype)


def dequantize_group_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Group-quantized base ``Q`` as ``[out, in]`` in ``dtype``: ``codes * scale - zero * scale`` per group.

    ``codes`` is the packed ``[out, groups, g * bits / 8]`` uint8 tensor of the residual layout. INT4
    nibbles (element ``2j`` low, ``2j + 1`` high) are written straight into one float buffer (a uint8
    stack + cast was 5x slower at batch 1 on CPU), then one fused multiply-add applies the group
    parameters."""
    out, groups, width = codes.shape
    if bits == 4:
        values = torch.empty(out, groups, width, 2, dtype=dtype, device=codes.device)
        values[..., 0] = codes & 0x0F
        values[..., 1] = codes >> 4
        values = values.view(out, groups, width * 2)
    else:
        values = codes.to(dtype)
    group_scale = scale.to(dtype).unsqueeze(-1)
    offset = -zero.to(dtype).unsqueeze(-1) * group_scale
    return torch.addcmul(offset, values, group_scale).view(out, -1)


def residual_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    u: torch.Tensor | None = None,
    u_scale: torch.Tensor | None = None,
    vh: torch.Tensor | None = None,
    vh_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (Q + L R)^T + bias``: ``Q`` dequantized to ``x.dtype`` whole, then the correction (if any)."""
    weight = dequantize_group_codes(codes, scale, zero, bits, x.dtype)
    y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if u is not None and u_scale is not None and vh is not None and vh_scale is not None:
        y = y + low_rank_linear(x, u, u_scale, vh, vh_scale)
    return y
