"""The peak memory a streaming compression will need, predicted from the shapes before it starts.

A block-by-block run holds at once: the model's parts outside the blocks (embeddings, final norm,
head), one dense block and its compressed replacement, the calibration activations at one block
boundary (inputs and outputs), the block's input Grams (float64, one per group of layers sharing an
input) and the working copies of the largest layer being compressed (its float32 weight, the Cholesky
factor of its damped Gram and that factor's inverse, products of the low-rank step). None of it grows
with the number of blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compression.decisions import CompressionSettings, LayerDecision

GB = 1024**3
RUNTIME_BYTES = int(0.6 * GB)
"""Python, PyTorch and transformers themselves (measured: ~0.5 GB resident before any weight)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident memory, by part (bytes)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        largest = sorted(self.parts.items(), key=lambda kv: -kv[1])
        listed = ", ".join(f"{name} {size / GB:.2f} GB" for name, size in largest if size >= 0.01 * GB)
        return f"expected peak memory {self.total / GB:.1f} GB ({listed})"


def estimate_peak(model: nn.Module, prefix: str, decisions: Sequence[LayerDecision], settings: CompressionSettings,
                  ids: torch.Tensor | None, dtype: torch.dtype) -> MemoryEstimate:
    """The peak of compressing ``model`` (its skeleton: shapes only) block by block."""
    element = dtype.itemsize
    outside = sum(p.numel() * element for n, p in model.named_parameters() if not n.startswith(prefix + "."))
    blocks: dict[str, int] = {}
    for name, param in model.named_parameters():
        if name.startswith(prefix + "."):
            index = name[len(prefix) + 1:].split(".", 1)[0]
            blocks[index] = blocks.get(index, 0) + param.numel() * element
    block = max(blocks.values(), default=0)
    targets = [d for d in decisions if d.rank is not None]
    parts = {"runtime": RUNTIME_BYTES, "embeddings, norm and head": outside, "one dense block": block,
             "its compressed copy": block // 2}
    if ids is not None:
        hidden = int(getattr(model.config, "hidden_size", 0) or 0)
        tokens = ids.numel()
        parts["calibration activations"] = 2 * tokens * hidden * element
        widest = max((d.spec.out_features for d in targets), default=0)
        parts["forward pass of one batch"] = 3 * settings.batch_size * ids.shape[1] * widest * 4
        parts["one block's input Grams"] = max(_block_grams(targets, prefix, i) for i in blocks) if blocks else 0
    largest = max(targets, key=lambda d: d.spec.in_features * (d.spec.in_features + d.spec.out_features), default=None)
    if largest is not None:
        parts[f"working copies ({largest.spec.name})"] = _working_bytes(largest, ids is not None)
    return MemoryEstimate(parts)


def _working_bytes(d: LayerDecision, calibrated: bool) -> int:
    """The largest layer's working set, the larger of its two phases: the Cholesky of its input Gram (an
    in-place float64 copy, then the float32 factor), and its compression (the float32 factor ``V`` and
    its inverse, the inverse's quarter-size products, float32 copies of the weight, its residual and its
    whitened form, and the small side's Gram for the eigendecomposition)."""
    m, n = d.spec.out_features, d.spec.in_features
    small = min(m, n) ** 2 * 4 * 2
    if not calibrated:
        return 6 * m * n * 4 + small
    return max(12 * n * n, 10 * n * n + 6 * m * n * 4 + small)


def _block_grams(targets: Sequence[LayerDecision], prefix: str, index: str) -> int:
    """float64 Grams of block ``index``: one per (parent module, input width), the layers reading one input."""
    inputs = {(d.spec.name.rpartition(".")[0], d.spec.in_features, d.spec.experts)
              for d in targets if d.spec.name.startswith(f"{prefix}.{index}.")}
    return sum(width * width * 8 * max(experts, 1) for _, width, experts in inputs)


def available_bytes() -> int | None:
    """Memory the OS can still give this process (Linux ``MemAvailable``; None where unknown)."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_fits(estimate: MemoryEstimate, available: int | None = None) -> None:
    """MemoryError naming the largest parts when ``estimate`` exceeds the available memory."""
    available = available_bytes() if available is None else available
    if available is None or estimate.total <= available:
        return
    largest = sorted(estimate.parts.items(), key=lambda kv: -kv[1])[:3]
    listed = "; ".join(f"{name}: {size / GB:.2f} GB" for name, size in largest)
    raise MemoryError(
        f"this compression needs about {estimate.total / GB:.1f} GB and {available / GB:.1f} GB are available; the "
        f"largest parts: {listed}. What shrinks them: fewer calibration samples (calibration n_samples) or a smaller "
        "batch_size, --dtype bfloat16, or a machine with more memory; pass --no-memory-check to try anyway"
    )
