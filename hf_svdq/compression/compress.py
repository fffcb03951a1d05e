"""Compressing a loaded (dense) model in place: the data-dependent paths.

Used for calibrated (whitened) compression, the low-rank + quantized-residual modes and the
energy / budget rank policies: every decision that needs the weights or activations first. The
plain fixed-rank path runs during loading instead (:class:`hf_svdq.integration.quantizer.SVDQuantizeOp`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.allocation import option_ranks, relative_error_curves
from ..algorithms.budget import allocate_ranks, choose_options
from ..algorithms.linalg import LowRankInt8, energy_rank
from ..algorithms.whitening import Whitener
from ..nn.low_rank import SVDQLinear, dense_element_bytes, dense_weight_of
from ..nn.residual import SVDQResidualLinear
from .decisions import RANK_FROM_DATA, CompressionSettings, LayerDecision, LinearSpec, layer_bytes
from .experts import stack_curves, stack_spectrum
from .fisher import output_sensitivity
from .matrix import base_quantization, gptq_factor, low_rank, residual_parts, spectrum, truncation_spectrum

logger = logging.getLogger(__name__)


def compress_layer(
    module: nn.Module, decision: LayerDecision, settings: CompressionSettings, gram: torch.Tensor | None,
    base: Any = None, whitener: Whitener | None = None,
) -> tuple[SVDQLinear | SVDQResidualLinear | None, int]:
    """A compressed replacement of ``module`` as ``decision`` plans it, and its rank; ``(None, rank)``
    when the break-even guard keeps it dense. A :data:`~hf_svdq.compression.decisions.RANK_FROM_DATA` rank
    is chosen from the spectrum (``settings.energy``). ``base``: a :func:`base_quantization` of this
    weight at the decision's bits, and ``whitener``: ``Whitener.from_gram(gram, settings.damp)``, both
    reused when probes build several options of one layer."""
    spec, bits, rank = decision.spec, decision.bits, decision.rank
    if rank is None:
        raise ValueError(f"compress_layer: {spec.name} is planned dense ({decision.reason})")
    weight, transposed = dense_weight_of(module)
    dtype = weight.dtype
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{spec.name}.weight has {bad} non-finite value(s) (NaN/Inf): refusing to compress it")
    bias = getattr(module, "bias", None)
    if whitener is None and gram is not None:
        whitener = Whitener.from_gram(gram, settings.damp)
    hinv = None
    if base is None and bits is not None:
        hinv = gptq_factor(gram, settings.residual_method, settings.damp, whitener)
        base = base_quantization(w, gram, bits, decision.group_size, settings.residual_method, settings.damp, hinv)
    target = w - base.dequantize() if base is not None else w
    if rank == RANK_FROM_DATA:
        if settings.energy is None:
            raise ValueError(f"compress_layer: {spec.name}'s rank is left to the data and no energy threshold is set")
        rank = energy_rank(spectrum(target, whitener), settings.energy)
    rank = min(rank, spec.in_features - 1 if base is None else spec.in_features, spec.out_features)
    dense_bytes = spec.out_features * spec.in_features * weight.element_size()
    if layer_bytes(spec, rank, bits, decision.group_size, weight.element_size()) >= dense_bytes:
        return None, rank
    if base is None:
        if rank < 1:
            return None, rank
        new: SVDQLinear | SVDQResidualLinear = _low_rank_module(spec, rank, low_rank(target, rank, gram, whitener, dtype),
                                                                 bias, dtype, transposed)
    else:
        new = _residual_module(w, spec, rank, base, decision.group_size, settings, gram, whitener, bias, dtype, transposed, hinv)
    for tensor_name, tensor in new.named_parameters():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{spec.name}.{tensor_name}: compression produced non-finite values; please report it")
    return new.to(weight.device), rank


def _low_rank_module(spec: LinearSpec, rank: int, factors: LowRankInt8, bias: torch.Tensor | None, dtype: torch.dtype,
                     transposed: bool) -> SVDQLinear:
    low = SVDQLinear(spec.in_features, spec.out_features, rank, bias is not None, dtype=dtype, transposed=transposed)
    low.load_factors(factors)
    if bias is not None:
        low.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    return low


def _residual_module(w: torch.Tensor, spec: LinearSpec, rank: int, base: Any, group_size: int | None,
                     settings: CompressionSettings, gram: torch.Tensor | None, whitener: Whitener | None,
                     bias: torch.Tensor | None, dtype: torch.dtype, transposed: bool,
                     hinv: torch.Tensor | None = None) -> SVDQResidualLinear:
    """``base`` plus a rank-``rank`` correction of its error, refined ``settings.refine_steps`` times."""
    residual = SVDQResidualLinear(spec.in_features, spec.out_features, rank, base.bits, group_size or spec.in_features,
                                  bias is not None, dtype=dtype, transposed=transposed)
    base, correction = residual_parts(w, rank, base, group_size, settings, gram, whitener, dtype, hinv)
    residual.load(base, correction, bias)
    return residual


def budget_ranks(model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings,
                 grams: Mapping[str, Any], spectra: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Ranks of ``targets`` under the global budget (``settings.target_bits_per_weight`` or
    ``target_param_ratio``), allocated by measured truncation loss. ``spectra`` (name ->
    :func:`truncation_spectrum`) is used where given and filled in where missing."""
    spectra = {} if spectra is None else spectra
    plans = {d.spec.name: d for d in targets}
    scale_bytes = dense_element_bytes(model)
    for d in targets:
        if d.spec.name not in spectra:
            spectra[d.spec.name] = layer_curve(model, d, replace(settings, bit_choices=None), grams.get(d.spec.name))
    numbers = sum(d.spec.numel for d in targets)
    if settings.target_param_ratio is not None:
        budget = settings.target_param_ratio * numbers
        def cost(name: str, r: int) -> float:
            s = plans[name].spec
            return r * (s.out_features + s.in_features) * s.matrices
    elif settings.target_bits_per_weight is not None:
        budget = settings.target_bits_per_weight * numbers / 8
        def cost(name: str, r: int) -> float:
            d = plans[name]
            return layer_bytes(d.spec, r, d.bits, d.group_size, scale_bytes)
    else:
        raise ValueError("budget_ranks needs target_bits_per_weight or target_param_ratio")
    limits = {n: min(d.spec.out_features, d.spec.in_features - (0 if d.bits is not None else 1)) for n, d in plans.items()}
    ranks = allocate_ranks(spectra, cost, budget, floor=settings.rank_floor, max_rank=limits)
    logger.info("hf_svdq: budget allocated ranks %s", ranks)
    return ranks


@dataclass(frozen=True)
class MixedBudget:
    """A mixed-bits budget's choice: each layer's rank and base bits, and the predicted quality."""

    ranks: dict[str, int]
    bits: dict[str, int]
    prediction: dict[str, Any]


def layer_curve(model: nn.Module, d: LayerDecision, settings: CompressionSettings, gram: Any,
                whitener: Whitener | None = None) -> Any:
    """What a global budget reads of one layer, from its weight and (calibrated) input Gram: the
    truncation spectrum (:func:`truncation_spectrum`; a stack's :func:`stack_spectrum`) for a rank
    budget, or ``{bits: relative error curve}`` for a mixed-bits budget. A few KB: computed block by
    block while the Gram is alive, then kept until the budget is solved. ``whitener``:
    ``Whitener.from_gram(gram, settings.damp)`` when the caller shares one between layers."""
    if settings.bit_choices:
        if d.spec.experts:
            return stack_curves(model, d.spec.name, gram, settings.bit_choices, d.group_size, settings.damp)
        weight, _ = dense_weight_of(model.get_submodule(d.spec.name))
        return relative_error_curves(weight, gram, settings.bit_choices, d.group_size, settings.damp, whitener)
    if d.spec.experts:
        return stack_spectrum(model, d.spec.name, gram, d.bits, d.group_size, settings.damp)
    weight, _ = dense_weight_of(model.get_submodule(d.spec.name))
    return truncation_spectrum(weight, gram, d.bits, d.group_size, settings.damp, whitener)


def mixed_budget(model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings,
                 grams: Mapping[str, Any], ids: torch.Tensor | None = None,
                 curves: Mapping[str, dict[int, torch.Tensor]] | None = None,
                 kappa: Mapping[str, float] | None = None) -> MixedBudget:
    """One (bits, rank) option per layer among ``settings.bit_choices`` under ``target_bits_per_weight``,
    minimising the summed relative output error (:mod:`hf_svdq.algorithms.allocation`), each layer's
    weighted by its Fisher sensitivity when calibrated (:mod:`hf_svdq.compression.fisher`; the weighted
    sum predicts the perplexity ratio, returned in ``prediction``). ``curves`` (:func:`layer_curve`) and
    ``kappa`` are used where given, computed otherwise."""
    if not settings.bit_choices or settings.target_bits_per_weight is None:
        raise ValueError("mixed_budget needs bit_choices and target_bits_per_weight")
    names = [d.spec.name for d in targets]
    weighted = ids is not None or kappa is not None
    if kappa is None:
        kappa = output_sensitivity(model, names, ids, settings.batch_size) if ids is not None else dict.fromkeys(names, 1.0)
    options: dict[str, list[tuple[object, float, float]]] = {}
    numbers = 0
    element = dense_element_bytes(model)
    for d in tqdm(targets, desc="scoring bit/rank options", disable=len(targets) < 8 or curves is not None):
        layer = curves[d.spec.name] if curves is not None else layer_curve(model, d, settings, grams.get(d.spec.name))
        limit = min(d.spec.out_features, d.spec.in_features)
        weight_of = kappa[d.spec.name]
        options[d.spec.name] = [((bits, r), float(layer_bytes(d.spec, r, bits, d.group_size, element)),
                                 weight_of * float(curve[r])) for bits, curve in layer.items() for r in option_ranks(limit)]
        numbers += d.spec.numel
    budget = settings.target_bits_per_weight * numbers / 8
    try:
        chosen = choose_options(options, budget=budget)
    except ValueError as err:
        raise ValueError(f"target_bits_per_weight {settings.target_bits_per_weight} cannot be met with bit_choices "
                         f"{list(settings.bit_choices)} ({err})") from None
    keys = {n: cast(tuple[int, int], o[0]) for n, o in chosen.items()}
    total = sum(o[2] for o in chosen.values())
    prediction = {"weighted": weighted, "objective": total,
                  "perplexity_ratio": math.exp(total) if weighted else None}
    logger.info("hf_svdq: mixed budget: %d of %d layers at other bits than %s; objective %.4g%s",
                sum(k[0] != settings.residual_bits for k in keys.values()), len(keys), settings.residual_bits, total,
                f" (predicted perplexity ratio {math.exp(total):.4f})" if weighted else "")
    return MixedBudget({n: int(k[1]) for n, k in keys.items()}, {n: int(k[0]) for n, k in keys.items()}, prediction)


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress_model` did: the final plan (ranks and bits resolved, layers the break-even
    guard kept dense marked so) and, for a calibrated mixed budget, its predicted quality."""

    decisions: list[LayerDecision]
    prediction: dict[str, Any] | None = None
    expert_fallback: dict[str, int] = field(default_factory=dict)
    """Per compressed expert stack: experts with too few routed calibration tokens, compressed data-free."""


