"""The planner: a config resolved once against a model into plain data.

:func:`compression_settings` turns a :class:`~hf_svdq.SVDQuantConfig` into :class:`CompressionSettings`
and :func:`resolve_plan` / :func:`plan_from_resolved` into one :class:`LayerDecision` per Linear
(method, rank, base bits, group size). This is the only compression module that reads the config:
the algorithms below it take those values. Both are pure (layer specs in, decisions out), so they
are testable without a model; :func:`find_linear_layers` and :func:`protected_layers` read a (meta) model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from ..integration.config import SVDQuantConfig
from ..integration.patterns import first_match, unmatched
from ..nn.experts import find_expert_stacks, is_fused_experts
from ..nn.low_rank import SVDQLinear, is_conv1d
from .decisions import RANK_FROM_DATA, CompressionSettings, LayerDecision, LinearSpec, layer_bytes

logger = logging.getLogger(__name__)


def compression_settings(config: SVDQuantConfig) -> CompressionSettings:
    """The config's algorithm parameters as plain data (see :class:`CompressionSettings`). A resolved
    config (``ranks`` set) keeps no budget: its ranks and layer bits are authoritative."""
    calibration = config.calibration
    budget = not config.is_resolved
    return CompressionSettings(
        residual_bits=config.residual_bits, group_size=config.group_size, residual_method=config.residual_method,
        refine_steps=config.refine_steps, damp=config.damp, energy=config.energy, rank_floor=config.rank_floor,
        target_bits_per_weight=config.target_bits_per_weight if budget else None,
        target_param_ratio=config.target_param_ratio if budget else None,
        bit_choices=tuple(config.bit_choices) if budget and config.bit_choices else None,
        calibrated=calibration is not None, batch_size=calibration.batch_size if calibration is not None else 8,
        sequential=calibration is not None and calibration.sequential,
        stats_cache=calibration.stats_cache if calibration is not None else None,
    )


def find_linear_layers(model: nn.Module, experts: bool = True) -> list[LinearSpec]:
    """Every ``nn.Linear``/``Conv1D`` (and already-compressed ``SVDQLinear``) of ``model``, by name, and
    with ``experts`` every stack of a fused mixture-of-experts module (``<module>.gate_up_proj``, ...)."""
    specs: list[LinearSpec] = []
    for name, module in model.named_modules():
        if experts and is_fused_experts(module):
            specs.extend(LinearSpec(f"{name}.{s.name}", s.out_features, s.in_features, s.bias, s.transposed, s.experts)
                         for s in find_expert_stacks(module))
            continue
        if isinstance(module, nn.Linear):
            specs.append(LinearSpec(name, module.out_features, module.in_features, module.bias is not None))
        elif is_conv1d(module):
            in_features, out_features = module.weight.shape
            specs.append(LinearSpec(name, out_features, in_features, module.bias is not None, transposed=True))
        elif isinstance(module, SVDQLinear):
            specs.append(
                LinearSpec(name, module.out_features, module.in_features, module.bias is not None, module.transposed)
            )
    return specs


def protected_layers(model: nn.Module) -> dict[str, str]:
    """Layers always kept dense: the output head and anything whose weight is tied to another."""
    protected: dict[str, str] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    tied: Mapping[str, str] = getattr(model, "all_tied_weights_keys", None) or {}
    for name, module in model.named_modules():
        if head is not None and module is head:
            protected[name] = "output embedding"
    for target, source in tied.items():
        for key, other in ((target, source), (source, target)):
            module_name = key.rsplit(".", 1)[0]
            protected.setdefault(module_name, f"weight tied to {other}")
    return protected


def resolve_plan(
    specs: Sequence[LinearSpec],
    config: SVDQuantConfig,
    protected: Mapping[str, str],
    dense_element_bytes: int,
) -> list[LayerDecision]:
    """Decide each layer's rank from ``config.rank``/``config.skip`` (ignores ``config.ranks``).

    Warns (``UserWarning``) for every skip or rank pattern that matches no eligible layer.
    """
    names = [s.name for s in specs]
    skip = config.skip_patterns()
    rank_rules = config.rank_patterns()
    for text in unmatched(skip, names):
        warnings.warn(f"SVDQuantConfig.skip pattern {text!r} matched no Linear layer or expert stack", UserWarning, stacklevel=3)
    for text in unmatched([p for p, _ in rank_rules], names):
        warnings.warn(f"SVDQuantConfig.rank pattern {text!r} matched no Linear layer or expert stack", UserWarning, stacklevel=3)

    data_rank = config.rank is None  # energy or budget policy: ranks come from the data
    decisions = []
    for spec in specs:
        if spec.name in protected:
            decisions.append(LayerDecision(spec, None, protected[spec.name]))
            continue
        hit = first_match(skip, spec.name)
        if hit is not None:
            decisions.append(LayerDecision(spec, None, f"skip pattern {hit.text!r}"))
            continue
        if config.residual_bits is not None and spec.in_features % (config.group_size or spec.in_features):
            decisions.append(LayerDecision(spec, None, f"group_size {config.group_size} does not divide in_features {spec.in_features}"))
            continue
        bits, group = _quantization(config, spec.name)
        if data_rank:
            decisions.append(LayerDecision(spec, RANK_FROM_DATA, bits=bits, group_size=group))
            continue
        rule = next(((p, r) for p, r in rank_rules if p.matches(spec.name)), None)
        if rule is None:
            decisions.append(LayerDecision(spec, None, "no rank pattern matched"))
            continue
        decisions.append(_decide_rank(spec, rule[1], dense_element_bytes, bits, group))
    _check_group_size(decisions, config.group_size)
    return decisions


def _quantization(config: SVDQuantConfig, name: str) -> tuple[int | None, int | None]:
    """Layer ``name``'s base bits and group size (both None in pure low rank)."""
    bits = config.bits_for(name)
    return bits, config.group_size if bits is not None else None


def _check_group_size(decisions: Sequence[LayerDecision], group_size: int | None) -> None:
    """A group size that divides no eligible layer's width would leave the whole model dense: an error.
    One that divides only some leaves the others dense: a warning naming how many and the widths."""
    misfit = [d for d in decisions if d.rank is None and d.reason.startswith("group_size")]
    if not misfit:
        return
    widths = sorted({d.spec.in_features for d in misfit})
    if not any(d.rank is not None for d in decisions):
        raise ValueError(f"group_size {group_size} divides the input width of none of the {len(misfit)} eligible layers "
                         f"(widths {widths}): every layer would stay dense; choose a divisor of those widths")
    warnings.warn(f"group_size {group_size} does not divide the input width {widths} of {len(misfit)} layer(s), "
                  f"e.g. {misfit[0].spec.name}: they stay dense (bits per weight over compressed layers leave them out)",
                  UserWarning, stacklevel=4)


def _decide_rank(spec: LinearSpec, requested: int, dense_element_bytes: int, bits: int | None,
                 group_size: int | None) -> LayerDecision:
    full = min(spec.out_features, spec.in_features)
    rank, note = requested, ""
    if requested > full:
        rank, note = full, f"rank {requested} clamped to min(out, in) = {full}"
    if bits is None and rank >= spec.in_features:
        return LayerDecision(spec, None, f"full rank: rank {rank} >= in_features {spec.in_features}, nothing to truncate")
    stored = layer_bytes(spec, rank, bits, group_size, dense_element_bytes)
    dense = spec.numel * dense_element_bytes
    if stored >= dense:
        return LayerDecision(spec, None, f"break-even: rank-{rank} compressed layer takes {stored} B >= dense {dense} B")
    return LayerDecision(spec, rank, note, bits, group_size)


def plan_from_resolved(specs: Sequence[LinearSpec], config: SVDQuantConfig) -> list[LayerDecision]:
    """Decisions from ``config.ranks`` (a saved checkpoint or a policy), validated against ``specs``."""
    ranks = config.ranks or {}
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(ranks) - set(by_name))
    if unknown:
        raise ValueError(
            f"SVDQuantConfig.ranks names {len(unknown)} module(s) that are not Linear layers of this model, "
            f"e.g. {unknown[:3]}: the config was made for another architecture"
        )
    stray = sorted(set(config.layer_bits or {}) - set(ranks))
    if stray:
        raise ValueError(f"SVDQuantConfig.layer_bits names {len(stray)} module(s) that are not compressed (not in ranks), "
                         f"e.g. {stray[:3]}")
    if config.dense is not None:
        uncovered = [s.name for s in specs if s.name not in ranks and s.name not in config.dense]
        if uncovered:
            raise ValueError(
                f"SVDQuantConfig.ranks/dense do not mention {len(uncovered)} Linear layer(s) of this model, "
                f"e.g. {uncovered[:3]}: the config (or policy) was made for another architecture"
            )
    decisions = []
    for spec in specs:
        rank = ranks.get(spec.name)
        if rank is None:
            decisions.append(LayerDecision(spec, None, (config.dense or {}).get(spec.name, "not in ranks")))
        elif rank > spec.out_features or rank > spec.in_features or (config.residual_bits is None and (rank >= spec.in_features or rank < 1)):
            raise ValueError(
                f"SVDQuantConfig.ranks[{spec.name!r}] = {rank} does not fit its {spec.out_features}x{spec.in_features} "
                "weight (low rank needs 1 <= rank < in_features; residual mode 0 <= rank <= min(out, in))"
            )
        else:
            bits, group = _quantization(config, spec.name)
            decisions.append(LayerDecision(spec, rank, bits=bits, group_size=group))
    return decisions


def log_plan(decisions: Sequence[LayerDecision]) -> None:
    """Log a summary; warn (once per kind, with a count and an example) about clamps and guards."""
    compressed = sum(d.rank is not None for d in decisions)
    stacks = sum(d.rank is not None and d.spec.experts > 0 for d in decisions)
    logger.info("hf_svdq: compressing %d of %d Linear layers and expert stacks (%d expert stacks)", compressed,
                len(decisions), stacks)
    groups: dict[str, list[LayerDecision]] = {}
    for d in decisions:
        if d.reason:
            groups.setdefault(d.reason.split(":")[0].split(" ")[0], []).append(d)
    for kind, members in groups.items():
        example = members[0]
        level = logging.WARNING if kind in ("break-even", "full", "rank") else logging.INFO
        logger.log(level, "hf_svdq: %d layer(s) %s, e.g. %s: %s", len(members),
                   "kept dense" if example.rank is None else "adjusted", example.spec.name, example.reason)
