"""``SVDQInt8Head``: the output head with an in-memory INT8 copy for decode (opt-in, ``int8_head=True``).

The head of a small model is its largest single read per generated token (SmolLM2-135M: a 49152x576
float32 matrix, 113 MB, tied to the embedding). This module keeps the head's float weight as it is
(same ``Parameter``, so ties, ``state_dict`` and checkpoints are unchanged) and adds non-persistent INT8
per-row codes (asymmetric, fp16 scale, uint8 zero: the residual layout with one group per row) built
when the model is loaded. Decode-sized inputs on CPU with the fused kernels active read the INT8 copy;
everything else (prefill, gradients, the reference backend, other devices) uses the float weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.groupquant import pack_codes, quantize_rtn
from ..kernels.ops import residual_linear, uses_fused_kernels


class SVDQInt8Head(nn.Module):
    """Wraps an ``nn.Linear`` output head; see the module docstring."""

    codes: torch.Tensor
    code_scale: torch.Tensor
    code_zero: torch.Tensor
    bits = 8

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"int8_head needs an nn.Linear output head, got {type(head).__name__}")
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight
        self.bias = head.bias
        quantized = quantize_rtn(head.weight.detach().float(), 8, head.in_features)
        self.register_buffer("codes", pack_codes(quantized.codes, 8, head.in_features), persistent=False)
        self.register_buffer("code_scale", quantized.scale, persistent=False)
        self.register_buffer("code_zero", quantized.zero, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_fused_kernels(x):
            return residual_linear(x, self.codes, self.code_scale, self.code_zero, self.bits, bias=self.bias)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_dense_module(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The plain ``nn.Linear`` head (the same weight ``Parameter``; ``dtype`` is ignored: it is not quantized)."""
        head = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        head.weight = self.weight
        head.bias = self.bias
        return head

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 copy of {self.codes.numel()} bytes"


def install_int8_head(model: nn.Module) -> str | None:
    """Replace ``model``'s ``nn.Linear`` output head by :class:`SVDQInt8Head`; returns its name (None if absent)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or isinstance(head, SVDQInt8Head):
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    model.set_submodule(name, SVDQInt8Head(head))
    return name
