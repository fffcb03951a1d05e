"""Compressing the expert stacks of a fused mixture-of-experts module, one expert matrix at a time.

Each expert is compressed like a Linear (:mod:`.matrix`): GPTQ and the whitened correction on the
input Gram of the tokens the router sent to *that* expert (:class:`~hf_svdq.calibration.statistics.ExpertGrams`).
An expert that received fewer tokens than :func:`min_tokens` has no usable statistics (its Gram is
rank-deficient, GPTQ's Hessian is mostly damping), so it takes the data-free path: round-to-nearest
and a plain SVD of the error. A stack has one rank, bit width and group size for all its experts
(the stored layout is stacked, :mod:`hf_svdq.format.layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algorithms.allocation import relative_error_curves
from ..algorithms.linalg import LowRankInt8, energy_rank
from ..algorithms.whitening import Whitener
from ..calibration.statistics import ExpertGrams
from ..nn.experts import ExpertStack, StackFormat, SVDQExperts, find_expert_stacks
from .decisions import RANK_FROM_DATA, CompressionSettings, LayerDecision, layer_bytes
from .matrix import base_quantization, gptq_factor, low_rank, residual_parts, spectrum, truncation_spectrum

MIN_TOKENS_PER_INPUT = 1.0
"""An expert's statistics are used when it saw at least this many tokens per input column."""


def min_tokens(in_features: int) -> float:
    """Fewest routed calibration tokens for an expert's Gram to steer its compression (its input width:
    below that the Gram is singular and the whitened correction fits the damping, not the data)."""
    return MIN_TOKENS_PER_INPUT * in_features


@dataclass(frozen=True)
class StackResult:
    """What compressing one stack did: its rank (None: kept dense by the break-even guard) and how many
    experts had too few routed tokens and took the data-free path."""

    rank: int | None
    fallback: int
    experts: int


def stack_of(model: nn.Module, name: str) -> tuple[nn.Module, ExpertStack]:
    """The fused-experts module owning stack ``name`` (``<module>.<stack>``) and the stack."""
    module_name, _, stack_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    for stack in find_expert_stacks(module):
        if stack.name == stack_name:
            return module, stack
    raise ValueError(f"{name} is not an expert stack of {type(module).__name__}")


def dense_matrices(module: nn.Module, stack: ExpertStack) -> torch.Tensor:
    """The dense stack as ``[E, out, in]`` (a view; transposed stacks are viewed, not copied)."""
    weight = module._parameters.get(stack.name)
    if weight is None or weight.dim() != 3:
        raise ValueError(f"{stack.name} of {type(module).__name__} is already compressed")
    return weight.detach().transpose(1, 2) if stack.transposed else weight.detach()


def _expert_gram(gram: ExpertGrams | None, expert: int, needed: float) -> torch.Tensor | None:
    if gram is None or int(gram.tokens[expert]) < needed:
        return None
    return gram.grams[expert]


def compress_stack(model: nn.Module, decision: LayerDecision, settings: CompressionSettings,
                   gram: ExpertGrams | None) -> StackResult:
    """Compress stack ``decision.spec.name`` as planned and install it (the experts module becomes an
    :class:`~hf_svdq.nn.experts.SVDQExperts` on its first compressed stack). A ``RANK_FROM_DATA`` rank
    is the largest energy rank over the experts."""
    spec, bits, group = decision.spec, decision.bits, decision.group_size
    if decision.rank is None:
        raise ValueError(f"compress_stack: {spec.name} is planned dense ({decision.reason})")
    module, stack = stack_of(model, spec.name)
    weights = dense_matrices(module, stack)
    dtype, device = weights.dtype, weights.device
    if not torch.isfinite(weights).all():
        bad = int((~torch.isfinite(weights)).sum())
        raise ValueError(f"{spec.name} has {bad} non-finite value(s) (NaN/Inf): refusing to compress it")
    needed = min_tokens(stack.in_features)
    grams = [_expert_gram(gram, e, needed) for e in range(stack.experts)]
    fallback = sum(g is None for g in grams) if gram is not None else 0

    def prepared(e: int) -> tuple[torch.Tensor, Whitener | None, object, torch.Tensor | None]:
        w, gram_e = weights[e].to(torch.float32), grams[e]
        whitener = Whitener.from_gram(gram_e, settings.damp) if gram_e is not None else None
        hinv = gptq_factor(gram_e, settings.residual_method, settings.damp, whitener) if bits is not None else None
        base = (base_quantization(w, gram_e, bits, group, settings.residual_method, settings.damp, hinv)
                if bits is not None else None)
        return w, whitener, base, hinv

    rank = decision.rank
    if rank == RANK_FROM_DATA:
        if settings.energy is None:
            raise ValueError(f"compress_stack: {spec.name}'s rank is left to the data and no energy threshold is set")
        ranks = []
        for e in range(stack.experts):
            w, whitener, base, _ = prepared(e)
            target = w - base.dequantize() if base is not None else w  # type: ignore[attr-defined]
            ranks.append(energy_rank(spectrum(target, whitener), settings.energy))
        rank = max(ranks)
    rank = min(rank, stack.in_features - 1 if bits is None else stack.in_features, stack.out_features)
    if layer_bytes(spec, rank, bits, group, weights.element_size()) >= spec.numel * weights.element_size() or (bits is None and rank < 1):
        return StackResult(None, fallback, stack.experts)
    bases: list[Any] = []
    corrections: list[LowRankInt8 | None] = []
    for e in range(stack.experts):
        w, whitener, base, hinv = prepared(e)
        if base is None:
            corrections.append(low_rank(w, rank, grams[e], whitener, dtype))
            continue
        base, correction = residual_parts(w, rank, base, group, settings, grams[e], whitener, dtype, hinv)
        bases.append(base)
        corrections.append(correction)
    experts = as_svdq_experts(model, spec.name.rpartition(".")[0])
    experts.declare_stack(stack.name, StackFormat(rank, bits, group if bits is not None else None), dtype, device)
    experts.load_stack(stack.name, bases if bits is not None else None, corrections)
    for tensor in experts.parameters(recurse=False):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{spec.name}: compression produced non-finite values; please report it")
    return StackResult(rank, fallback, stack.experts)


def as_svdq_experts(model: nn.Module, module_name: str) -> SVDQExperts:
    """The experts module at ``module_name``, converted in place to an all-dense :class:`SVDQExperts` first."""
    module = model.get_submodule(module_name)
    if isinstance(module, SVDQExperts):
        return module
    new = SVDQExperts.from_module(module, {})
    model.set_submodule(module_name, new)
    return new


def stack_spectrum(model: nn.Module, name: str, gram: ExpertGrams | None, bits: int | None, group_size: int | None,
                   damp: float) -> torch.Tensor:
    """A spectrum whose squared tail at ``r`` is the summed truncation loss of all experts of stack
    ``name`` at rank ``r`` (``sqrt(sum_e s_e^2)``): what a global budget allocates a stack's rank on."""
    module, stack = stack_of(model, name)
    weights = dense_matrices(module, stack)
    needed = min_tokens(stack.in_features)
    total = None
    for e in range(stack.experts):
        s = truncation_spectrum(weights[e], _expert_gram(gram, e, needed), bits, group_size, damp).to(torch.float64)
        total = s.pow(2) if total is None else total + s.pow(2)
    assert total is not None
    return total.sqrt()


def stack_curves(model: nn.Module, name: str, gram: ExpertGrams | None, bit_choices: Sequence[int], group_size: int | None,
                 damp: float) -> dict[int, torch.Tensor]:
    """A stack's mixed-budget loss curves: each expert's relative output error
    (:func:`~hf_svdq.algorithms.allocation.relative_error_curves`), averaged over the experts."""
    module, stack = stack_of(model, name)
    weights = dense_matrices(module, stack)
    needed = min_tokens(stack.in_features)
    total: dict[int, torch.Tensor] = {}
    for e in range(stack.experts):
        for bits, curve in relative_error_curves(weights[e], _expert_gram(gram, e, needed), bit_choices, group_size, damp).items():
            total[bits] = curve / stack.experts + total.get(bits, 0)
    return total
