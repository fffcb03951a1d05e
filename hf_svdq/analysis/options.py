"""Measured sensitivity of the residual modes, and a bits-per-weight allocator driven by it.

For every layer, the compression code itself builds each probed option (base bits ``b``, INT8
correction of rank ``r``; by default INT8 with no correction and INT4 with ranks 0/16/32/64), swaps it
in alone and measures KL(dense || probe) on calibration tokens (:class:`hf_svdq.analysis.block_kl.BlockKL`:
only the blocks from that layer on are re-run). Between probed ranks the KL follows the layer's
relative output error curve (:func:`hf_svdq.algorithms.allocation.relative_error_curves`) scaled to the
probes: ``kl_b(r) = s_b(r) * e_b(r)``, ``s_b`` interpolated linearly in ``r`` between the probes'
ratios ``kl / e`` (measured points are exact; ranks beyond twice the largest probe are not offered).

A layer whose cheapest option's KL is an outlier (:func:`hf_svdq.analysis.policy.find_outliers`, robust z over
all layers) is offered only its highest-bits options or dense. :func:`hf_svdq.algorithms.budget.choose_options`
then picks one option per layer, minimising the summed KL (first order: per-layer KLs add up) under
the budget. The plan is built and measured on held-out text, so the report gives predicted against
measured KL and perplexity.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.allocation import option_ranks, relative_error_curves
from ..algorithms.budget import choose_options
from ..algorithms.whitening import Whitener
from ..calibration.statistics import dense_grams, find_blocks
from ..compression.compress import base_quantization, compress_layer
from ..compression.decisions import CompressionSettings, LayerDecision, layer_bytes
from ..compression.matrix import gptq_factor
from ..evaluation.metrics import DEFAULT_PROMPTS, tokenize_text
from ..format.policy_file import POLICY_KEY, POLICY_VERSION, save_policy
from ..nn.low_rank import dense_weight_of
from .block_kl import BlockKL
from .policy import Thresholds, find_outliers
from .probes import Prober, swapped
from .sensitivity import split_name

logger = logging.getLogger(__name__)

DEFAULT_PROBE_RANKS = (0, 16, 32, 64)

Option = tuple[int, int]  # (base bits, correction rank)


def probe_points(bit_choices: Sequence[int], ranks: Sequence[int] = DEFAULT_PROBE_RANKS) -> list[Option]:
    """The options measured per layer: every rank of ``ranks`` at the lowest bit width, rank 0 at the others."""
    low = min(bit_choices)
    return [(b, r) for b in sorted(set(bit_choices)) for r in (sorted(set(ranks)) if b == low else (0,))]


def interpolate_kl(curve: torch.Tensor, measured: Mapping[int, float]) -> np.ndarray:
    """``kl[r]`` for every rank of ``curve``: ``measured`` at probed ranks, the curve scaled by the
    measured/curve ratio (linear in ``r``, constant beyond the ends) in between."""
    if not measured:
        raise ValueError("interpolate_kl: no measured rank")
    e = curve.detach().to(torch.float64).numpy()
    points = sorted(measured)
    ratios = [measured[r] / max(float(e[min(r, len(e) - 1)]), 1e-30) for r in points]
    return e * np.interp(np.arange(len(e)), points, ratios)


@dataclass
class OptionAnalysis:
    """Per-layer measured KLs, the chosen plan, the policy and the plan's measures on held-out text."""

    measured: dict[str, dict[str, float]]  # layer -> {"bits:rank": KL}
    policy: dict[str, Any]
    dense_measures: dict[str, Any]
    plan_measures: dict[str, Any]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"measured_kl": self.measured, "policy": self.policy, "dense": self.dense_measures,
                "plan": self.plan_measures, "timings": self.timings}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``report.json``, ``policy.json`` and ``report.md`` in ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "policy": save_policy(self.policy, out / "policy.json"), "markdown": out / "report.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        paths["markdown"].write_text(self.markdown(), encoding="utf-8")
        return paths

    def markdown(self) -> str:
        p, plan, dense = self.policy["predicted"], self.plan_measures, self.dense_measures
        lines = [
            "# hf_svdq residual-option analysis", "",
            (f"Budget {self.policy['criterion']['budget_bits_per_weight']:g} bits/weight; plan {p['bits_per_weight']:.3f} "
            f"bits/weight over the analysed layers; {len(self.policy.get('layer_bits', {}))} layer(s) at other bits than "
            f"{self.policy['setting']['residual_bits']}."), "",
            "| | KL (nats/token) | perplexity ratio | loops |", "|---|---|---|---|",
            f"| predicted (sum of per-layer KLs, on calibration tokens) | {p['kl']:.4f} | {math.exp(p['kl']):.4f} (exp KL) | |",
            (f"| measured (held-out text) | {plan['kl']:.4f} | {plan['perplexity'] / dense['perplexity']:.4f} | "
            f"{plan['loops']} (dense {dense['loops']}) |"), "",
            "| layer | choice | " + " | ".join(f"KL {k}" for k in self._columns()) + " | reason |",
            "|---|---|" + "---|" * (len(self._columns()) + 1),
        ]
        for name, row in self.measured.items():
            choice = self.policy["choices"].get(name, "dense")
            reason = self.policy["classes"].get(name, {}).get("reason", "")
            lines.append(f"| {name} | {choice} | " + " | ".join(f"{row[k]:.2e}" if k in row else "-" for k in self._columns())
                         + f" | {reason} |")
        return "\n".join(lines) + "\n"

    def _columns(self) -> list[str]:
        return sorted({k for row in self.measured.values() for k in row}, key=lambda k: tuple(int(x) for x in k.split(":")))


def measure_options(
    model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings, grams: Mapping[str, torch.Tensor],
    meter: BlockKL, points: Sequence[Option], progress: bool = True,
) -> dict[str, dict[Option, float]]:
    """``{layer: {(bits, rank): KL}}``: each option built by :func:`~hf_svdq.compression.compress.compress_layer`
    and measured alone (options the break-even guard refuses are left out). One base per bit width is
    reused across the ranks and the refinement step is skipped (9x fewer GPTQ runs); the plan itself
    is built with the setting's refinement, so probes slightly overstate the corrected options' KL."""
    prefix, _ = find_blocks(model)
    probe_settings = replace(settings, refine_steps=0)
    measured: dict[str, dict[Option, float]] = {}
    for d in tqdm(targets, desc="probing options", disable=not progress):
        name = d.spec.name
        module = model.get_submodule(name)
        block = split_name(name, prefix)[0] or 0
        measured[name] = {}
        weight = dense_weight_of(module)[0].detach().to(torch.float32)
        bases: dict[int, Any] = {}
        gram = grams.get(name)
        whitener = Whitener.from_gram(gram, settings.damp) if gram is not None else None
        for bits, rank in points:
            if bits not in bases:
                hinv = gptq_factor(gram, settings.residual_method, settings.damp, whitener)
                bases[bits] = base_quantization(weight, gram, bits, d.group_size, settings.residual_method, settings.damp, hinv)
            new, _ = compress_layer(module, replace(d, rank=rank, bits=bits), probe_settings, gram, bases[bits], whitener)
            if new is None:
                continue
            with swapped(model, {name: new}):
                measured[name][(bits, rank)] = meter.measure(block)
    return measured


def allocate(
    model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings, grams: Mapping[str, torch.Tensor],
    measured: Mapping[str, Mapping[Option, float]], budget_bits_per_weight: float, outliers: Mapping[str, str],
) -> tuple[dict[str, tuple[object, float, float]], float]:
    """One option per layer (``(bits, rank)`` or None = dense, bytes, predicted KL) for the budget, and the budget in bytes."""
    bit_choices = sorted({b for m in measured.values() for b, _ in m})
    options: dict[str, list[tuple[object, float, float]]] = {}
    numbers = 0
    for d in targets:
        name, spec = d.spec.name, d.spec
        weight, _ = dense_weight_of(model.get_submodule(name))
        element = weight.element_size()
        numbers += spec.out_features * spec.in_features
        allowed = [max(bit_choices)] if name in outliers else bit_choices
        curves = relative_error_curves(weight, grams.get(name), allowed, d.group_size, settings.damp)
        opts: list[tuple[object, float, float]] = [(None, float(spec.out_features * spec.in_features * element), 0.0)]
        for bits in allowed:
            probed = {r: kl for (b, r), kl in measured[name].items() if b == bits}
            if not probed:
                continue
            kl = interpolate_kl(curves[bits], probed)
            top = min(2 * max(max(probed), 8), len(kl) - 1)
            for r in option_ranks(min(spec.out_features, spec.in_features), max_rank=top):
                opts.append(((bits, r), float(layer_bytes(spec, r, bits, d.group_size, element)), max(float(kl[r]), 0.0)))
        options[name] = opts
    budget = budget_bits_per_weight * numbers / 8
    try:
        return choose_options(options, budget=budget), budget
    except ValueError as err:
        raise ValueError(f"budget {budget_bits_per_weight} bits/weight cannot be met by the probed options ({err})") from None


def build_option_policy(
    chosen: Mapping[str, tuple[object, float, float]], settings: CompressionSettings, all_layers: Mapping[str, str],
    outliers: Mapping[str, str], budget_bits_per_weight: float, numbers: int, model_info: Mapping[str, Any],
) -> dict[str, Any]:
    """A policy document (:func:`hf_svdq.format.policy_file.load_policy` reads it) with ranks and per-layer bits."""
    ranks, layer_bits, dense = {}, {}, dict(all_layers)
    for name, (key, _, _) in chosen.items():
        if key is None:
            dense[name] = f"policy: {outliers.get(name, 'kept dense by the allocator')}"
            continue
        bits, rank = cast(Option, key)
        ranks[name] = rank
        if bits != settings.residual_bits:
            layer_bits[name] = bits
    total = sum(o[1] for o in chosen.values())
    return {
        POLICY_KEY: POLICY_VERSION, "model": dict(model_info), "setting": settings.policy_setting(),
        "criterion": {"budget_bits_per_weight": budget_bits_per_weight, "allocator": "measured option KL"},
        "classes": {n: {"class": "outlier" if n in outliers else "robust",
                        "reason": outliers.get(n, "within the spread of all layers")} for n in chosen},
        "choices": {n: ("dense" if k is None else f"INT{k[0]} + rank {k[1]}") for n, (k, _, _) in chosen.items()},  # type: ignore[index]
        "ranks": ranks, "layer_bits": layer_bits, "dense": dense,
        "predicted": {"kl": sum(o[2] for o in chosen.values()), "bytes": int(total),
                      "bits_per_weight": 8 * total / numbers if numbers else 0.0},
    }


def option_analysis(
    model: nn.Module, tokenizer: Any, decisions: Sequence[LayerDecision], settings: CompressionSettings, ids: torch.Tensor,
    text: str, budget_bits_per_weight: float, probe_ranks: Sequence[int] = DEFAULT_PROBE_RANKS, probe_samples: int = 2,
    eval_tokens: int = 1024, prompts: Sequence[str] = DEFAULT_PROMPTS[:3], thresholds: Thresholds | None = None,
    progress: bool = True,
) -> OptionAnalysis:
    """Probe every planned layer's residual options on calibration ``ids``, allocate the budget and
    measure the plan on ``text`` (see :func:`hf_svdq.analysis.analyze.analyze_options`, which plans)."""
    assert settings.bit_choices, "analyze_options validates the setting"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    targets = [d for d in decisions if d.rank is not None]
    grams = dense_grams(model, [d.spec.name for d in targets], ids, settings.batch_size, settings.stats_cache, progress)
    meter = BlockKL(model, ids[:probe_samples])
    timings["setup_s"] = time.perf_counter() - start
    start = time.perf_counter()
    measured = measure_options(model, targets, settings, grams, meter, probe_points(settings.bit_choices, probe_ranks), progress)
    timings["probes_s"] = time.perf_counter() - start
    start = time.perf_counter()
    cheapest = {n: m[min(m)] for n, m in measured.items() if m}  # lowest bits, lowest rank
    outliers = find_outliers(cheapest, thresholds)
    for name, reason in outliers.items():
        logger.warning("hf_svdq analysis: %s offered only its highest-precision options: %s", name, reason)
    chosen, _ = allocate(model, targets, settings, grams, measured, budget_bits_per_weight, outliers)
    numbers = sum(d.spec.out_features * d.spec.in_features for d in targets)
    all_layers = {d.spec.name: d.reason or "not analysed" for d in decisions if d.rank is None}
    cfg = getattr(model, "config", None)
    info = {"name_or_path": getattr(cfg, "name_or_path", None), "model_type": getattr(cfg, "model_type", None)}
    policy = build_option_policy(chosen, settings, all_layers, outliers, budget_bits_per_weight, numbers, info)
    timings["allocation_s"] = time.perf_counter() - start
    start = time.perf_counter()
    prober = Prober(model, tokenizer, tokenize_text(tokenizer, text, eval_tokens), prompts)
    with swapped(model, _plan_modules(model, targets, settings, grams, chosen, progress)):
        plan = prober.measure()
    timings["plan_check_s"] = time.perf_counter() - start
    readable = {n: {f"{b}:{r}": kl for (b, r), kl in m.items()} for n, m in measured.items()}
    return OptionAnalysis(readable, policy, prober.dense.to_dict(), plan.to_dict(), timings)


def _plan_modules(model: nn.Module, targets: Sequence[LayerDecision], settings: CompressionSettings,
                  grams: Mapping[str, torch.Tensor], chosen: Mapping[str, tuple[object, float, float]],
                  progress: bool) -> dict[str, nn.Module]:
    """The compressed module of every layer the allocator did not keep dense, built as the plan says."""
    modules: dict[str, nn.Module] = {}
    for d in tqdm(targets, desc="building the plan", disable=not progress):
        key = chosen[d.spec.name][0]
        if key is None:
            continue
        bits, rank = cast(Option, key)
        new, _ = compress_layer(model.get_submodule(d.spec.name), replace(d, rank=rank, bits=bits), settings,
                                grams.get(d.spec.name))
        if new is not None:
            modules[d.spec.name] = new
    return modules
