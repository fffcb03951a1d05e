"""Mixture-of-experts stacks inside ``from_pretrained``: the module swap, quantize-on-load of an arriving
stack, and the save-time names. Called by :mod:`hf_svdq.integration.quantizer` (the one
module that implements transformers' quantizer hooks); nothing here touches that API.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..algorithms.linalg import low_rank_int8
from ..compression.decisions import LayerDecision
from ..compression.memory import release_free_memory
from ..format import layout as fmt
from ..nn.experts import StackFormat, SVDQExperts, find_expert_stacks

logger = logging.getLogger(__name__)


def quantize_stack(module: SVDQExperts, name: str, dense: torch.Tensor, full_name: str,
                   missing_keys: set[str] | None, non_finite: list[str]) -> dict[str, torch.Tensor]:
    """Factorize every expert of one arriving dense stack (quantize-on-load, low-rank layout)."""
    stack, stack_format = module.stacks[name], module.formats[name]
    expected = (stack.experts, stack.in_features, stack.out_features) if stack.transposed else \
        (stack.experts, stack.out_features, stack.in_features)
    if tuple(dense.shape) != expected:
        raise ValueError(f"hf_svdq: {full_name} has shape {tuple(dense.shape)}, expected {expected}")
    matrices = dense.transpose(1, 2) if stack.transposed else dense
    if not torch.isfinite(matrices).all():
        non_finite.append(
            f"{full_name} has {int((~torch.isfinite(matrices)).sum())} non-finite value(s) (NaN/Inf): refusing to compress it")
        matrices = torch.zeros_like(matrices)
    dtype = module.compute_dtype
    module.declare_stack(name, stack_format, dtype, "meta")  # the float placeholder back to the declared layout
    module.load_stack(name, None, [low_rank_int8(matrices[e], stack_format.rank, dtype) for e in range(stack.experts)])
    filled = module.__dict__.setdefault("_hf_svdq_filled", set())
    filled.add(name)
    module._is_hf_initialized = True  # type: ignore[assignment]
    for param in module.parameters(recurse=False):
        param._is_hf_initialized = True  # type: ignore[attr-defined]
    if missing_keys is not None:
        prefix = full_name.rpartition(".")[0]
        for tensor in fmt.expert_tensors(name, stack_format.shape(stack), stack.experts):
            missing_keys.discard(f"{prefix}.{tensor}")
    del dense, matrices
    release_free_memory()
    return {}




def swap_in_experts(model: nn.Module, decisions: list[LayerDecision], dense_placeholder: bool) -> None:
    """Put an :class:`SVDQExperts` (meta) in place of every fused-experts module with a compressed stack."""
    by_module: dict[str, dict[str, StackFormat]] = {}
    for d in decisions:
        if d.rank is not None and d.spec.experts:
            module_name, _, stack = d.spec.name.rpartition(".")
            by_module.setdefault(module_name, {})[stack] = StackFormat(d.rank, d.bits, d.group_size if d.bits is not None else None)
    for module_name, formats in by_module.items():
        old = model.get_submodule(module_name)
        if isinstance(old, SVDQExperts):
            continue
        new = SVDQExperts.from_module(old, formats, device="meta")
        if dense_placeholder:  # quantize-on-load: the dense stack arrives under the codes' name, in its float dtype
            for stack in formats:
                shape = new._parameters[stack].shape  # type: ignore[union-attr]
                new._parameters[stack] = nn.Parameter(torch.empty(shape, dtype=new.compute_dtype, device="meta"), requires_grad=False)
        model.set_submodule(module_name, new)


def keep_fused_expert_names(model: nn.Module) -> None:
    """Save expert stacks (compressed, and dense ones beside them) under the names they have in the model, so
    an hf_svdq checkpoint always holds experts fused. transformers' save reverts
    its load-time conversions (e.g. ``experts.gate_up_proj`` back into per-expert ``gate_proj``/``up_proj``
    weights, Mixtral's ``mlp`` back to ``block_sparse_moe``), which would split the stacked codes and their
    companions apart or rename them away from what the header check reads; every conversion whose target
    names an expert stack is dropped from what the save reverts (reload reads the names as they are:
    no conversion's source matches them)."""
    import re

    conversions = getattr(model, "_weight_conversions", None)
    stacks = [f"{name}.{s.name}" for name, m in model.named_modules() for s in find_expert_stacks(m)]
    if not conversions or not stacks:
        return
    kept = []
    for conversion in conversions:
        targets = getattr(conversion, "target_patterns", None) or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        if any(re.search(str(t).replace("*", r"\d+"), name) for t in targets for name in stacks):
            continue
        kept.append(conversion)
    model._hf_svdq_weight_conversions = conversions  # type: ignore[assignment]  # restored by dequantize()
    model._weight_conversions = kept  # type: ignore[assignment]


def restore_conversions(model: nn.Module) -> None:
    """Give back the conversions :func:`keep_fused_expert_names` dropped (dense experts save per expert again)."""
    if "_hf_svdq_weight_conversions" in model.__dict__:
        model._weight_conversions = model.__dict__.pop("_hf_svdq_weight_conversions")  # type: ignore[assignment]


__all__ = ["keep_fused_expert_names", "quantize_stack", "restore_conversions", "swap_in_experts"]
