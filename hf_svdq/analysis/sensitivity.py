"""Per-layer isolation: what compressing one layer does to its own weight and output.

Cheap (no model forward per layer): each eligible layer is compressed once under the analysis
setting, and its error is measured against the dense weight and, when calibrated, on the
calibration activations through their Gram ``G = X^T X``:

* relative weight error ``|W - W'|_F / |W|_F``;
* relative output error ``sqrt(tr(E G E^T) / tr(W G W^T))`` with ``E = W - W'`` and its SQNR in dB;
* output cosine ``tr(W G W'^T) / sqrt(tr(W G W^T) tr(W' G W'^T))``.

The compressed modules are kept so the end-to-end probes (:mod:`hf_svdq.analysis.probes`) swap them in
without recomputing any SVD.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compression.compress import budget_ranks, compress_layer, truncation_spectrum
from ..compression.decisions import CompressionSettings, LayerDecision
from ..nn.low_rank import dense_weight_of


def layer_metrics(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None = None) -> dict[str, float]:
    """Error measures of ``approx`` against ``weight`` (both ``[out, in]``); output measures need ``gram``."""
    w = weight.detach().to(torch.float64)
    a = approx.detach().to(torch.float64)
    diff = w - a
    w_norm = float(w.norm())
    metrics = {"weight_rel_error": float(diff.norm()) / w_norm if w_norm else math.inf}
    if gram is None:
        rel = metrics["weight_rel_error"]
    else:
        g = gram.to(torch.float64)
        signal = float(((w @ g) * w).sum())
        noise = float(((diff @ g) * diff).sum())
        approx_power = float(((a @ g) * a).sum())
        cross = float(((w @ g) * a).sum())
        rel = math.sqrt(max(noise, 0.0) / signal) if signal > 0 else math.inf
        metrics["output_rel_error"] = rel
        denominator = math.sqrt(signal * approx_power)
        metrics["output_cosine"] = cross / denominator if denominator > 0 else 0.0
    metrics["sqnr_db"] = -20.0 * math.log10(rel) if rel > 0 else math.inf
    return metrics


def split_name(name: str, block_prefix: str) -> tuple[int | None, str]:
    """``("model.layers.3.self_attn.q_proj", "model.layers")`` -> ``(3, "self_attn.q_proj")``."""
    head = block_prefix + "."
    if block_prefix and name.startswith(head):
        index, _, rest = name[len(head):].partition(".")
        if index.isdigit():
            return int(index), rest
    return None, name


def family(kind: str) -> str:
    """``"attention"``, ``"mlp"`` or ``"other"`` from a module type like ``"self_attn.q_proj"``."""
    lowered = kind.lower()
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "ffn" in lowered or "feed_forward" in lowered:
        return "mlp"
    return "other"


@dataclass
class LayerIsolation:
    """One layer compressed alone: its setting rank, bytes and error measures."""

    name: str
    block: int | None
    kind: str
    out_features: int
    in_features: int
    rank: int | None  # None: the break-even guard keeps it dense at this setting
    dense_bytes: int
    compressed_bytes: int
    weight_rel_error: float
    output_rel_error: float | None
    output_cosine: float | None
    sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def isolate_layers(
    model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings,
    grams: Mapping[str, torch.Tensor] | None = None, block_prefix: str = "", progress: bool = True,
) -> tuple[list[LayerIsolation], dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Compress every planned layer of ``targets``, one at a time, without touching ``model``.

    Returns the per-layer measures, the compressed modules (by name; layers kept dense are absent)
    and each layer's truncation spectrum (for rank policies). A global budget is resolved first,
    exactly as :func:`hf_svdq.compression.compress.compress_model` resolves it.
    """
    grams = dict(grams or {})
    targets = [d for d in targets if d.rank is not None]
    if not targets:
        raise ValueError("the analysis setting compresses no layer of this model (check skip patterns and rank)")
    spectra: dict[str, torch.Tensor] = {}
    if settings.budgeted:  # ranks at the default bits, as budget_ranks gives them (bit_choices are the option analysis')
        ranks = budget_ranks(model, targets, settings, grams, spectra)
        targets = [replace(d, rank=ranks[d.spec.name]) for d in targets]
    rows: list[LayerIsolation] = []
    modules: dict[str, Any] = {}
    for d in tqdm(targets, desc="isolating layers", disable=not progress):
        spec = d.spec
        module = model.get_submodule(spec.name)
        weight, _ = dense_weight_of(module)
        gram = grams.get(spec.name)
        new, rank = compress_layer(module, d, settings, gram)
        approx = new.dequantize(torch.float32) if new is not None else weight
        metrics = layer_metrics(weight.detach().float(), approx, gram)
        block, kind = split_name(spec.name, block_prefix)
        dense_bytes = spec.out_features * spec.in_features * weight.element_size()
        rows.append(LayerIsolation(
            spec.name, block, kind, spec.out_features, spec.in_features, rank if new is not None else None,
            dense_bytes, new.storage_bytes() if new is not None else dense_bytes,
            metrics["weight_rel_error"], metrics.get("output_rel_error"), metrics.get("output_cosine"), metrics["sqnr_db"],
        ))
        if new is not None:
            modules[spec.name] = new
        if spec.name not in spectra:
            spectra[spec.name] = truncation_spectrum(weight, gram, d.bits, d.group_size, settings.damp)
    return rows, modules, spectra


def format_isolation(rows: Sequence[LayerIsolation]) -> str:
    """A per-layer table like the seeds' quality table."""
    header = f"{'layer':<44} {'rank':>5} {'bytes %':>8} {'W rel err':>10} {'out rel err':>11} {'SQNR dB':>8} {'out cos':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        out_err = "-" if r.output_rel_error is None else f"{r.output_rel_error:.4f}"
        cos = "-" if r.output_cosine is None else f"{r.output_cosine:.5f}"
        lines.append(f"{r.name:<44} {('dense' if r.rank is None else r.rank):>5} {100 * r.compressed_bytes / r.dense_bytes:>7.1f}% "
                     f"{r.weight_rel_error:>10.4f} {out_err:>11} {r.sqnr_db:>8.2f} {cos:>8}")
    return "\n".join(lines)
