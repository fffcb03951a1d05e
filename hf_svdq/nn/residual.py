"""``SVDQResidualLinear``: a group-quantized weight plus an INT8 low-rank correction, ``W ~ Q + L R``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..algorithms.groupquant import GroupQuantized, check_group_args, pack_codes
from ..algorithms.linalg import LowRankInt8
from ..format.layout import LayerShape
from ..kernels.ops import residual_linear
from ..kernels.reference import dequantize_group_codes, dequantize_rows
from .low_rank import _frozen, declare_tensors, dense_module


class SVDQResidualLinear(nn.Module):
    """``y = x (Q + L R)^T + b``: ``Q`` INT4/INT8 codes with per-group fp16 scale and uint8 zero,
    ``L`` [out, rank] and ``R`` [rank, in] INT8 with per-row scales (omitted when ``rank == 0``).
    Parameter names and shapes follow the residual layout of :mod:`hf_svdq.format.layout`."""

    weight: nn.Parameter  # the stored tensors: registered by declare_tensors from the format's layout
    weight_scale: nn.Parameter
    weight_zero: nn.Parameter
    weight_u: nn.Parameter
    weight_u_scale: nn.Parameter
    weight_vh: nn.Parameter
    weight_vh_scale: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        check_group_args(in_features, bits, group_size)
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [0, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        declare_tensors(self, LayerShape(out_features, in_features, rank, bits, group_size), dtype, device)
        if bias:
            self.bias: nn.Parameter | None = _frozen((out_features,), dtype, device)
        else:
            self.register_parameter("bias", None)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_u_scale.dtype if self.rank else (self.bias.dtype if self.bias is not None else torch.float32)

    def load(self, base: GroupQuantized, correction: LowRankInt8 | None, bias: torch.Tensor | None = None) -> None:
        """Install a quantized base and (when ``rank > 0``) its low-rank correction."""
        if (base.bits, base.group_size) != (self.bits, self.group_size) or tuple(base.codes.shape) != (self.out_features, self.in_features):
            raise ValueError("quantized base does not match this module's shape, bits or group size")
        if (correction is None) != (self.rank == 0) or (correction is not None and correction.rank != self.rank):
            raise ValueError(f"correction rank does not match module rank {self.rank}")
        dtype = self.compute_dtype
        self.weight = nn.Parameter(pack_codes(base.codes, self.bits, self.group_size), requires_grad=False)
        self.weight_scale = nn.Parameter(base.scale.to(torch.float16), requires_grad=False)
        self.weight_zero = nn.Parameter(base.zero.to(torch.uint8), requires_grad=False)
        if correction is not None:
            self.weight_u = nn.Parameter(correction.left.codes, requires_grad=False)
            self.weight_u_scale = nn.Parameter(correction.left.scale.to(dtype), requires_grad=False)
            self.weight_vh = nn.Parameter(correction.right.codes, requires_grad=False)
            self.weight_vh_scale = nn.Parameter(correction.right.scale.to(dtype), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``Q`` as ``[out, in]`` in ``dtype`` (see :func:`hf_svdq.kernels.reference.dequantize_group_codes`)."""
        return dequantize_group_codes(self.weight, self.weight_scale, self.weight_zero, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p: Any = self._parameters  # direct: nn.Module.__getattr__ per tensor cost ~4-5 us per call (measured)
        if self.rank:
            return residual_linear(x, p["weight"], p["weight_scale"], p["weight_zero"], self.bits, p["weight_u"],
                                   p["weight_u_scale"], p["weight_vh"], p["weight_vh_scale"], p["bias"])
        return residual_linear(x, p["weight"], p["weight_scale"], p["weight_zero"], self.bits, bias=p["bias"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``Q + L R`` as ``[out, in]`` (computed in float32)."""
        weight = self.base_weight(torch.float32)
        if self.rank:
            left = dequantize_rows(self.weight_u, self.weight_u_scale, torch.float32)
            weight = weight + left @ dequantize_rows(self.weight_vh, self.weight_vh_scale, torch.float32)
        return weight.to(dtype or self.compute_dtype)

    def to_dense_module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A dense ``nn.Linear`` (or ``Conv1D`` when the source was one) holding ``Q + L R``."""
        return dense_module(self.dequantize(dtype), self.bias, self.transposed)

    def storage_bytes(self) -> int:
        """Bytes of codes, group parameters and correction (bias excluded)."""
        return sum(p.numel() * p.element_size() for name, p in self.named_parameters(recurse=False) if name != "bias")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, rank={self.rank}, bias={self.bias is not None}, bytes={self.storage_bytes()}"
        )
