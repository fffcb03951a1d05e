"""Compressing a loaded (dense) model in place: the data-dependent paths.

Used for calibrated (whitened) compression, the low-rank + quantized-residual modes and the
energy / budget rank policies: every decision that needs the weights or activations first. The
plain fixed-rank path runs during loading instead (:class:`hf_svdq.integration.quantizer.SVDQuantizeOp`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.allocation import option_ranks, relative_error_curves
from ..algorithms.budget import allocate_ranks, choose_options
from ..algorithms.linalg import LowRankInt8, energy_rank
from ..algorithms.whitening import Whitener
from ..calibration.statistics import block_grams, block_inputs, dense_grams, find_blocks, input_groups, run_block
from ..nn.low_rank import SVDQLinear, dense_weight_of
from ..nn.residual import SVDQResidualLinear
from .decisions import RANK_FROM_DATA, CompressionSettings, LayerDecision, LinearSpec, layer_bytes
from .experts import compress_stack, stack_curves, stack_spectrum
from .fisher import output_sensitivity
from .matrix import base_quantization, low_rank, residual_parts, spectrum, truncation_spectrum
from .memory import release_free_memory

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
    if base is None and bits is not None:
        base = base_quantization(w, gram, bits, decision.group_size, settings.residual_method, settings.damp)
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
        new = _residual_module(w, spec, rank, base, decision.group_size, settings, gram, whitener, bias, dtype, transposed)
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
                     bias: torch.Tensor | None, dtype: torch.dtype, transposed: bool) -> SVDQResidualLinear:
    """``base`` plus a rank-``rank`` correction of its error, refined ``settings.refine_steps`` times."""
    residual = SVDQResidualLinear(spec.in_features, spec.out_features, rank, base.bits, group_size or spec.in_features,
                                  bias is not None, dtype=dtype, transposed=transposed)
    base, correction = residual_parts(w, rank, base, group_size, settings, gram, whitener, dtype)
    residual.load(base, correction, bias)
    return residual


def budget_ranks(model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings,
                 grams: Mapping[str, Any], spectra: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Ranks of ``targets`` under the global budget (``settings.target_bits_per_weight`` or
    ``target_param_ratio``), allocated by measured truncation loss. ``spectra`` (name ->
    :func:`truncation_spectrum`) is used where given and filled in where missing."""
    spectra = {} if spectra is None else spectra
    plans = {d.spec.name: d for d in targets}
    scale_bytes = 4
    for d in targets:
        if d.spec.experts:
            scale_bytes = next(model.parameters()).element_size()
            if d.spec.name not in spectra:
                spectra[d.spec.name] = stack_spectrum(model, d.spec.name, grams.get(d.spec.name), d.bits, d.group_size, settings.damp)
            continue
        weight, _ = dense_weight_of(model.get_submodule(d.spec.name))
        scale_bytes = weight.element_size()
        if d.spec.name not in spectra:
            spectra[d.spec.name] = truncation_spectrum(weight, grams.get(d.spec.name), d.bits, d.group_size, settings.damp)
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


def mixed_budget(model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings,
                 grams: Mapping[str, Any], ids: torch.Tensor | None = None) -> MixedBudget:
    """One (bits, rank) option per layer among ``settings.bit_choices`` under ``target_bits_per_weight``,
    minimising the summed relative output error (:mod:`hf_svdq.algorithms.allocation`), each layer's
    weighted by its Fisher sensitivity when calibrated (:mod:`hf_svdq.compression.fisher`; the weighted
    sum predicts the perplexity ratio, returned in ``prediction``)."""
    if not settings.bit_choices or settings.target_bits_per_weight is None:
        raise ValueError("mixed_budget needs bit_choices and target_bits_per_weight")
    names = [d.spec.name for d in targets]
    kappa = output_sensitivity(model, names, ids, settings.batch_size) if ids is not None else dict.fromkeys(names, 1.0)
    options: dict[str, list[tuple[object, float, float]]] = {}
    numbers = 0
    for d in tqdm(targets, desc="scoring bit/rank options", disable=len(targets) < 8):
        if d.spec.experts:
            curves = stack_curves(model, d.spec.name, grams.get(d.spec.name), settings.bit_choices, d.group_size, settings.damp)
            element = next(model.parameters()).element_size()
        else:
            weight, _ = dense_weight_of(model.get_submodule(d.spec.name))
            curves = relative_error_curves(weight, grams.get(d.spec.name), settings.bit_choices, d.group_size, settings.damp)
            element = weight.element_size()
        limit = min(d.spec.out_features, d.spec.in_features)
        weight_of = kappa[d.spec.name]
        options[d.spec.name] = [((bits, r), float(layer_bytes(d.spec, r, bits, d.group_size, element)),
                                 weight_of * float(curve[r])) for bits, curve in curves.items() for r in option_ranks(limit)]
        numbers += d.spec.numel
    budget = settings.target_bits_per_weight * numbers / 8
    try:
        chosen = choose_options(options, budget=budget)
    except ValueError as err:
        raise ValueError(f"target_bits_per_weight {settings.target_bits_per_weight} cannot be met with bit_choices "
                         f"{list(settings.bit_choices)} ({err})") from None
    keys = {n: cast(tuple[int, int], o[0]) for n, o in chosen.items()}
    total = sum(o[2] for o in chosen.values())
    prediction = {"weighted": ids is not None, "objective": total,
                  "perplexity_ratio": math.exp(total) if ids is not None else None}
    logger.info("hf_svdq: mixed budget: %d of %d layers at other bits than %s; objective %.4g%s",
                sum(k[0] != settings.residual_bits for k in keys.values()), len(keys), settings.residual_bits, total,
                f" (predicted perplexity ratio {math.exp(total):.4f})" if ids is not None else "")
    return MixedBudget({n: int(k[1]) for n, k in keys.items()}, {n: int(k[0]) for n, k in keys.items()}, prediction)


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress_model` did: the final plan (ranks and bits resolved, layers the break-even
    guard kept dense marked so) and, for a calibrated mixed budget, its predicted quality."""

    decisions: list[LayerDecision]
    prediction: dict[str, Any] | None = None
    expert_fallback: dict[str, int] = field(default_factory=dict)
    """Per compressed expert stack: experts with too few routed calibration tokens, compressed data-free."""


def resolve_budget(model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings,
                   grams: Mapping[str, Any], ids: torch.Tensor | None) -> tuple[list[LayerDecision], dict[str, Any] | None]:
    """``targets`` with the ranks (and, with ``bit_choices``, the base bits) a global budget gives them;
    unchanged without a budget. Also returns a mixed budget's prediction."""
    if settings.budgeted and settings.bit_choices:
        mixed = mixed_budget(model, targets, settings, grams, ids)
        return [replace(d, rank=mixed.ranks[d.spec.name], bits=mixed.bits[d.spec.name]) for d in targets], mixed.prediction
    if settings.budgeted:
        ranks = budget_ranks(model, targets, settings, grams)
        return [replace(d, rank=ranks[d.spec.name]) for d in targets], None
    return list(targets), None


def compress_model(
    model: nn.Module, settings: CompressionSettings, decisions: Sequence[LayerDecision], ids: torch.Tensor | None,
    progress: bool = True,
) -> CompressionResult:
    """Replace every layer ``decisions`` plans compressed (a rank, or ``RANK_FROM_DATA``) in place,
    calibrated on ``ids`` when given (block by block when ``settings.sequential``)."""
    targets = [d for d in decisions if d.rank is not None]
    sequential = ids is not None and settings.sequential
    grams: dict[str, torch.Tensor] = {}
    if ids is not None and (not sequential or settings.budgeted):
        grams = dense_grams(model, [d.spec.name for d in targets], ids, settings.batch_size, settings.stats_cache, progress)
    targets, prediction = resolve_budget(model, targets, settings, grams, ids)
    by_name = {d.spec.name: d for d in targets}
    results: dict[str, tuple[object | None, int]] = {}
    fallback: dict[str, int] = {}

    def do(name: str, gram: Any) -> None:
        if by_name[name].spec.experts:
            done = compress_stack(model, by_name[name], settings, gram)
            results[name] = (done.rank, done.rank or 0)
            if done.rank is not None and ids is not None:
                fallback[name] = done.fallback
            release_free_memory()
            return
        new, rank = compress_layer(model.get_submodule(name), by_name[name], settings, gram)
        results[name] = (new, rank)
        if new is not None:
            model.set_submodule(name, new)
        release_free_memory()

    if sequential:
        assert ids is not None
        _compress_block_by_block(model, list(by_name), ids, settings.batch_size, do, progress)
    else:
        for name in tqdm(list(by_name), desc="compressing", disable=not progress):
            do(name, grams.get(name))
    final = []
    for d in decisions:
        if d.rank is None:
            final.append(d)
            continue
        new, rank = results[d.spec.name]
        planned = by_name[d.spec.name]
        final.append(replace(planned, rank=rank) if new is not None
                     else LayerDecision(d.spec, None, f"break-even: rank {rank} is not smaller than dense"))
    if any(fallback.values()):
        stacks, experts = len(fallback), sum(by_name[n].spec.experts for n in fallback)
        logger.warning("hf_svdq: %d of %d experts (in %d stacks) saw fewer routed calibration tokens than their input "
                       "width and were compressed data-free", sum(fallback.values()), experts, stacks)
    return CompressionResult(final, prediction, fallback)


def _compress_block_by_block(model: nn.Module, names: Sequence[str], ids: torch.Tensor, batch: int,
                             do: Callable[[str, torch.Tensor | None], None], progress: bool) -> None:
    """Call ``do(name, gram)`` for every layer, block by block, each gram taken on the outputs of the
    blocks already compressed (layers outside the blocks last, on dense statistics)."""
    prefix, blocks = find_blocks(model)
    hidden, kwargs = block_inputs(model, blocks, ids, batch)
    done: set[str] = set()
    for index, block in enumerate(tqdm(blocks, desc="calibrated compression", disable=not progress)):
        block_prefix = f"{prefix}.{index}."
        local_names = [n[len(block_prefix):] for n in names if n.startswith(block_prefix)]
        for group in input_groups(block, local_names, hidden[0], kwargs[index]) if local_names else []:
            group_grams = block_grams(block, group, hidden, kwargs[index])
            for local in group:
                do(block_prefix + local, group_grams[local])
                done.add(block_prefix + local)
        with torch.no_grad():
            hidden = [run_block(block, h, kwargs[index]) for h in hidden]
    rest = [n for n in names if n not in done]
    if rest:
        extra = dense_grams(model, rest, ids, batch, None, progress)
        for name in rest:
            do(name, extra.get(name))
