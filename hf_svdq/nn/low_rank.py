"""``SVDQLinear``: a frozen low-rank layer with INT8 factors that replaces ``nn.Linear``/``Conv1D``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..algorithms.linalg import LowRankInt8, low_rank_int8
from ..format import layout as fmt
from ..kernels.ops import low_rank_linear
from ..kernels.reference import dequantize_rows


def _frozen(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


_TORCH_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "float16": torch.float16}


def declare_tensors(module: nn.Module, shape: fmt.LayerShape, dtype: torch.dtype, device: torch.device | str | None) -> None:
    """Register ``module``'s empty stored tensors exactly as :mod:`hf_svdq.format.layout` declares them for ``shape``
    (``"float"`` tensors in ``dtype``)."""
    for spec in fmt.layer_tensors(shape):
        module.register_parameter(spec.name, _frozen(spec.shape(shape), _TORCH_DTYPES.get(spec.dtype, dtype), device))


class SVDQLinear(nn.Module):
    """``y = x (L R)^T + b`` with INT8 factors ``L`` [out, rank], ``R`` [rank, in] and per-row scales.

    Parameters follow :mod:`hf_svdq.format.layout`. Build it on the meta device and fill it with
    :meth:`load_factors` (quantize-on-load) or from a checkpoint (reload). ``transposed`` records
    that the dense source was a GPT-2 ``Conv1D`` (weight stored ``[in, out]``), so
    :meth:`to_dense_module` gives back the same type.
    """

    weight: nn.Parameter  # the stored tensors: registered by declare_tensors from the format's layout
    weight_scale: nn.Parameter
    weight_vh: nn.Parameter
    weight_vh_scale: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.transposed = transposed
        declare_tensors(self, fmt.LayerShape(out_features, in_features, rank), dtype, device)
        if bias:
            self.bias: nn.Parameter | None = _frozen((out_features,), dtype, device)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, module: nn.Module, rank: int, dtype: torch.dtype | None = None) -> SVDQLinear:
        """Compress a materialized ``nn.Linear`` or ``Conv1D`` (SVD in float32)."""
        weight, transposed = dense_weight_of(module)
        bias = getattr(module, "bias", None)
        out_features, in_features = weight.shape
        dtype = dtype or weight.dtype
        layer = cls(in_features, out_features, rank, bias is not None, dtype=dtype, device=weight.device, transposed=transposed)
        layer.load_factors(low_rank_int8(weight, rank, dtype))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return layer

    def load_factors(self, factors: LowRankInt8) -> None:
        """Install computed factors, replacing (meta) placeholders; shapes must match this module."""
        expected = {fmt.LEFT: self.weight.shape, fmt.RIGHT: self.weight_vh.shape}
        got = {fmt.LEFT: factors.left.codes.shape, fmt.RIGHT: factors.right.codes.shape}
        if got != expected:
            raise ValueError(f"factor shapes {got} do not match module shapes {expected}")
        scale_dtype = self.weight_scale.dtype
        self.weight = nn.Parameter(factors.left.codes, requires_grad=False)
        self.weight_scale = nn.Parameter(factors.left.scale.to(scale_dtype), requires_grad=False)
        self.weight_vh = nn.Parameter(factors.right.codes, requires_grad=False)
        self.weight_vh_scale = nn.Parameter(factors.right.scale.to(scale_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p: Any = self._parameters  # direct: skips nn.Module.__getattr__ per tensor on the decode path
        return low_rank_linear(x, p["weight"], p["weight_scale"], p["weight_vh"], p["weight_vh_scale"], p["bias"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` these factors represent (computed in float32)."""
        left = dequantize_rows(self.weight, self.weight_scale, torch.float32)
        right = dequantize_rows(self.weight_vh, self.weight_vh_scale, torch.float32)
        return (left @ right).to(dtype or self.weight_scale.dtype)

    def to_dense_module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A dense ``nn.Linear`` (or ``Conv1D`` when the source was one) with the dequantized weight."""
        dtype = dtype or self.weight_scale.dtype
        return dense_module(self.dequantize(dtype), self.bias, self.transposed)

    def storage_bytes(self) -> int:
        """Bytes of the factors and scales (bias excluded)."""
        return sum(p.numel() * p.element_size() for p in (self.weight, self.weight_scale, self.weight_vh, self.weight_vh_scale))

    def extra_repr(self) -> str:
        dense = self.out_features * self.in_features * self.weight_scale.element_size()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, bytes={self.storage_bytes()} (dense {dense})"
        )


def dense_module(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Module:
    """``nn.Linear`` holding ``weight`` [out, in] (and ``bias``), or a GPT-2 ``Conv1D`` when ``transposed``."""
    out_features, in_features = weight.shape
    bias_param = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype).clone())
    module: nn.Module
    if transposed:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(out_features, in_features)
        module.weight = nn.Parameter(weight.t().contiguous())
        module.bias = bias_param
    else:
        module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        module.weight = nn.Parameter(weight)
        if bias_param is not None:
            module.bias = bias_param
    return module


def dense_element_bytes(model: nn.Module) -> int:
    """Bytes per element of the model's dense float weights (what scales are stored in; 4 when it has none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.element_size()
    return 4


def dense_weight_of(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """``(weight as [out, in], transposed)`` of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight, False
    if is_conv1d(module):
        return module.weight.t(), True  # type: ignore[operator]  # (Conv1D.weight is a Parameter)
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (checked without importing transformers)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")

