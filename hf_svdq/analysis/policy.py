"""Sensitivity classes and compression policies.

:func:`classify` labels each probe group ``robust``, ``sensitive`` or ``pillar`` from the probe
measures (thresholds in :class:`Thresholds`). :func:`build_policy` turns the analysis into per-layer
ranks and a keep-dense list that meet a byte budget or a quality floor; the result is a JSON document
(:data:`POLICY_VERSION`) that :meth:`hf_svdq.SVDQuantConfig.from_policy` loads.

How ranks are chosen: compressing group ``G`` alone at the analysis setting costs ``KL_G`` (measured
end to end). Within the group that cost is spread over layers by their truncation loss ``t_L(r)``
(share of the, possibly whitened, squared spectrum beyond rank ``r``), so the predicted cost of
layer ``L`` at rank ``r`` is ``KL_G * t_L(r) / sum_{L' in G} t_L'(r_0)``; keeping it dense costs 0.
Predicted costs add up over layers (first order); the cheapest mix of ranks for the budget is chosen
greedily on each layer's convex hull of (bytes, predicted KL). **Outliers** (:func:`find_outliers`:
damage far above the bulk of the layers, by a robust z-score) are always kept dense; other pillars
are kept dense (``pillars="dense"``) or compete at a higher cost (``"protect"``). A quality floor ``max_ppl_ratio`` is read as a summed-KL budget of ``log(max_ppl_ratio)`` nats per
token (KL to the dense model approximates the rise in cross entropy).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..algorithms.budget import choose_options, tail_loss
from ..compression.decisions import CompressionSettings, LinearSpec, layer_bytes
from ..format.policy_file import POLICY_KEY, POLICY_VERSION
from .sensitivity import LayerIsolation


@dataclass(frozen=True)
class Thresholds:
    """When a probe group counts as sensitive or a pillar.

    * pillar: compressing it alone makes more generations loop than the dense model (and its KL alone
      is at least ``min_kl``: a negligible change that flips one greedy path is not a pillar); or the
      whole model compressed loops and restoring this group alone brings the loops back to the dense
      count while lowering the KL by a "sensitive" gain (below); or its KL alone is at least
      ``pillar_kl`` times the median group's KL alone.
    * sensitive: its KL alone is at least ``sensitive_kl`` times the median; or restoring it lowers
      the all-compressed model's KL by at least ``sensitive_kl`` times the median such gain.
    * KL criteria only fire above ``min_kl`` (nats/token), so a near-lossless setting flags nothing.

    * outlier (kept dense by every policy, see :func:`find_outliers`): a pillar whose ``log10`` KL alone
      is more than ``outlier_z`` robust standard deviations above the median ``log10`` KL alone.
    """

    pillar_kl: float = 10.0
    sensitive_kl: float = 3.0
    min_kl: float = 1e-3
    outlier_z: float = 3.0

    def __post_init__(self) -> None:
        for name in ("pillar_kl", "sensitive_kl", "min_kl", "outlier_z"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Thresholds.{name} must be a positive number, got {value!r}")
        if self.sensitive_kl > self.pillar_kl:
            raise ValueError(f"Thresholds.sensitive_kl ({self.sensitive_kl}) must not exceed pillar_kl ({self.pillar_kl})")


def classify(
    alone: Mapping[str, Mapping[str, float]],
    dense_loops: int,
    leave_one_out: Mapping[str, Mapping[str, float]] | None = None,
    all_compressed: Mapping[str, float] | None = None,
    thresholds: Thresholds | None = None,
) -> dict[str, tuple[str, str]]:
    """``{group: (class, reason)}`` from probe measures (dicts with ``kl`` and ``loops``)."""
    t = thresholds or Thresholds()
    median = statistics.median(m["kl"] for m in alone.values()) if alone else 0.0
    gains: dict[str, float] = {}
    if leave_one_out and all_compressed is not None:
        gains = {g: all_compressed["kl"] - m["kl"] for g, m in leave_one_out.items()}
    median_gain = statistics.median(gains.values()) if gains else 0.0
    result = {}
    for group, m in alone.items():
        kl = m["kl"]
        verdict = ("robust", f"KL alone {kl:.2e} (median {median:.2e})")
        gain = gains.get(group, 0.0)
        gain_floor = max(t.min_kl, t.sensitive_kl * median_gain)
        if m["loops"] > dense_loops and kl >= t.min_kl:
            verdict = ("pillar", f"compressing it alone makes {m['loops']} generation(s) loop (dense: {dense_loops})")
        elif (leave_one_out and all_compressed is not None and all_compressed["loops"] > dense_loops
              and group in leave_one_out and leave_one_out[group]["loops"] <= dense_loops and gain >= gain_floor):
            restored = leave_one_out[group]["loops"]
            verdict = ("pillar", (f"restoring it alone removes the all-compressed model's loops ({all_compressed['loops']} -> "
                                  f"{restored}) and lowers its KL by {gain:.2e}"))
        elif kl >= max(t.min_kl, t.pillar_kl * median):
            verdict = ("pillar", f"KL alone {kl:.2e} >= {t.pillar_kl:g} x median {median:.2e}")
        elif kl >= max(t.min_kl, t.sensitive_kl * median):
            verdict = ("sensitive", f"KL alone {kl:.2e} >= {t.sensitive_kl:g} x median {median:.2e}")
        elif gain >= gain_floor:
            verdict = ("sensitive", f"restoring it lowers the all-compressed KL by {gain:.2e} >= {t.sensitive_kl:g} x median {median_gain:.2e}")
        result[group] = verdict
    return result


OUTLIER_MIN_SPREAD = 0.25
"""Floor on the robust spread (decades of KL) used by :func:`find_outliers`: when nearly every layer
measures the same, a layer needs ``outlier_z * 0.25`` decades (5.6x at z = 3) above the median, not any
tiny excess, to count as an outlier."""


def find_outliers(alone_kl: Mapping[str, float], thresholds: Thresholds | None = None) -> dict[str, str]:
    """``{group: reason}`` for the groups whose measured damage is an outlier among all groups.

    Robust, so that one catastrophic layer cannot hide itself by inflating the spread: with
    ``l = log10(KL alone)``, ``z = (l - median(l)) / max(1.4826 * MAD(l), 0.25)`` (MAD: median absolute
    deviation; 1.4826 * MAD estimates a standard deviation). A group is an outlier when
    ``z > outlier_z`` (default 3), its KL alone is at least ``pillar_kl`` times the median (a pillar) and at
    least ``min_kl``. On SmolLM2-135M (whitened -20%) the strongest layers are 13-130x the median and none
    is an outlier; a planted layer 1700x the median of a tiny model is one.
    """
    t = thresholds or Thresholds()
    if len(alone_kl) < 3:
        return {}
    logs = {g: math.log10(max(kl, 1e-12)) for g, kl in alone_kl.items()}
    median = statistics.median(logs.values())
    spread = max(1.4826 * statistics.median(abs(v - median) for v in logs.values()), OUTLIER_MIN_SPREAD)
    median_kl = 10**median
    result = {}
    for g, kl in alone_kl.items():
        z = (logs[g] - median) / spread
        if z > t.outlier_z and kl >= max(t.min_kl, t.pillar_kl * median_kl):
            result[g] = (f"outlier: KL alone {kl:.2e} is {kl / median_kl:.0f}x the median {median_kl:.2e} "
                         f"(robust z {z:.1f} > {t.outlier_z:g})")
    return result


def _options(spec: LinearSpec, spectrum: torch.Tensor, weight: float, settings: CompressionSettings, element_bytes: int,
             step: int, measured_rank: int | None = None, rank_range: float | None = None) -> list[tuple[object, float, float]]:
    dense = spec.out_features * spec.in_features * element_bytes
    tail = tail_loss(spectrum)
    bits = settings.residual_bits
    limit = min(len(spectrum), spec.out_features, spec.in_features - (0 if bits else 1))
    low = 0 if bits else max(1, min(settings.rank_floor, limit))
    if rank_range is not None and measured_rank is not None:  # trust region around the measured rank
        low = max(low, int(measured_rank / rank_range))
        limit = min(limit, max(int(measured_rank * rank_range), low))
    ranks = sorted({*range(low, limit + 1, step), limit} if limit >= low else set())
    options: list[tuple[object, float, float]] = [(None, float(dense), 0.0)]
    for r in ranks:
        stored = layer_bytes(spec, r, bits, settings.group_size, element_bytes)
        if stored < dense:
            options.append((r, float(stored), weight * float(tail[r])))
    return options


def build_policy(
    rows: Sequence[LayerIsolation],
    spectra: Mapping[str, torch.Tensor],
    groups: Mapping[str, Sequence[str]],
    alone_kl: Mapping[str, float],
    classes: Mapping[str, tuple[str, str]],
    settings: CompressionSettings,
    all_layers: Mapping[str, str],
    element_bytes: int,
    budget_bits_per_weight: float | None = None,
    max_ppl_ratio: float | None = None,
    step: int = 8,
    model_info: Mapping[str, Any] | None = None,
    pillars: str = "dense",
    pillar_weight: float = 10.0,
    rank_range: float | None = 2.0,
    outliers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The policy document: per-layer ranks and dense layers for a budget or a quality floor.

    ``pillars="dense"`` keeps every pillar dense (the study's skip policy); ``"protect"`` lets the
    allocator choose their ranks too, with their predicted cost multiplied by ``pillar_weight``
    (cheaper when a dense layer costs many compressed ones, e.g. in float32). ``predicted["kl"]`` is
    the allocator's objective, pillar weights included. ``rank_range``: each layer's rank stays within
    this factor of the rank its sensitivity was measured at (the first-order cost model is only
    trusted near that point; measured on SmolLM2, unbounded extrapolation to rank 8 lost badly);
    None lifts the bound.

    ``outliers`` (``{group: reason}``, see :func:`find_outliers`) are kept dense whatever ``pillars`` says.

    ``all_layers`` maps every Linear of the model not analysed (head, skipped, ...) to why it stays
    dense; with the analysed layers it must cover the whole model, which is how a policy is
    recognised as made for this architecture when it is loaded.
    """
    _check_criterion(budget_bits_per_weight, max_ppl_ratio, pillars)
    group_of = {n: g for g, members in groups.items() for n in members}
    layer_class = {n: classes[g][0] for n, g in group_of.items() if g in classes}
    outliers = dict(outliers or {})
    layer_outlier = {n: outliers[g] for n, g in group_of.items() if g in outliers}
    weights = _layer_weights(rows, spectra, groups, alone_kl)
    options: dict[str, list[tuple[object, float, float]]] = {}
    for r in rows:
        pillar = layer_class.get(r.name) == "pillar"
        if (pillar and pillars == "dense") or r.name in layer_outlier or r.name not in weights:
            options[r.name] = [(None, float(r.dense_bytes), 0.0)]
        else:
            spec = LinearSpec(r.name, r.out_features, r.in_features, False)
            weight = weights[r.name] * (pillar_weight if pillar else 1.0)
            options[r.name] = _options(spec, spectra[r.name], weight, settings, element_bytes, step, r.rank, rank_range)
    numbers = sum(r.out_features * r.in_features for r in rows)
    chosen, criterion = _choose(options, numbers, budget_bits_per_weight, max_ppl_ratio)
    ranks = {n: int(o[0]) for n, o in chosen.items() if o[0] is not None}  # type: ignore[call-overload]
    dense = dict(all_layers)
    for n, o in chosen.items():
        if o[0] is None and n in layer_outlier:
            dense[n] = f"policy: pillar, {layer_outlier[n]}"
        elif o[0] is None:
            dense[n] = f"policy: {layer_class[n]} ({classes[group_of[n]][1]})" if layer_class.get(n) == "pillar" else "policy: kept dense"
    total = sum(o[1] for o in chosen.values())
    return {
        POLICY_KEY: POLICY_VERSION,
        "model": dict(model_info or {}),
        "setting": settings.policy_setting(),
        "criterion": {**criterion, "pillars": pillars, "rank_range": rank_range},
        "classes": {r.name: {"class": layer_class.get(r.name, "robust"), "group": group_of.get(r.name),
                             "reason": classes[group_of[r.name]][1] if group_of.get(r.name) in classes else "not probed",
                             **({"outlier": layer_outlier[r.name]} if r.name in layer_outlier else {})} for r in rows},
        "ranks": ranks,
        "dense": dense,
        "predicted": {"kl": sum(o[2] for o in chosen.values()), "bytes": int(total),
                      "bits_per_weight": 8 * total / numbers if numbers else 0.0},
    }


def _check_criterion(budget_bits_per_weight: float | None, max_ppl_ratio: float | None, pillars: str) -> None:
    if (budget_bits_per_weight is None) == (max_ppl_ratio is None):
        raise ValueError("give exactly one of budget_bits_per_weight and max_ppl_ratio")
    if pillars not in ("dense", "protect"):
        raise ValueError(f"pillars must be 'dense' or 'protect', got {pillars!r}")
    if budget_bits_per_weight is not None and budget_bits_per_weight <= 0:
        raise ValueError(f"budget_bits_per_weight must be positive, got {budget_bits_per_weight}")
    if max_ppl_ratio is not None and max_ppl_ratio <= 1:
        raise ValueError(f"max_ppl_ratio must be above 1, got {max_ppl_ratio}")


def _layer_weights(rows: Sequence[LayerIsolation], spectra: Mapping[str, torch.Tensor], groups: Mapping[str, Sequence[str]],
                   alone_kl: Mapping[str, float]) -> dict[str, float]:
    """Per layer: its group's KL alone per unit of the group's truncation loss at the analysed ranks
    (the slope that turns a layer's truncation loss at another rank into predicted KL)."""
    by_name = {r.name: r for r in rows}
    weights: dict[str, float] = {}
    for g, members in groups.items():
        base = sum(float(tail_loss(spectra[n])[by_name[n].rank]) for n in members if by_name[n].rank is not None)
        for n in members:
            weights[n] = alone_kl.get(g, 0.0) / base if base > 0 else alone_kl.get(g, 0.0)
    return weights


def _choose(options: dict[str, list[tuple[object, float, float]]], numbers: int, budget_bits_per_weight: float | None,
            max_ppl_ratio: float | None) -> tuple[dict[str, tuple[object, float, float]], dict[str, Any]]:
    """One option per layer: the least predicted KL within the byte budget, or the fewest bytes within the quality floor."""
    if budget_bits_per_weight is None:
        assert max_ppl_ratio is not None
        return choose_options(options, max_loss=math.log(max_ppl_ratio)), {"max_ppl_ratio": max_ppl_ratio}
    try:
        chosen = choose_options(options, budget=budget_bits_per_weight * numbers / 8)
    except ValueError as err:
        kept = sum(1 for o in options.values() if len(o) == 1)
        raise ValueError(
            f"policy budget {budget_bits_per_weight:.3f} bits/weight is too small: {kept} layer(s) must stay dense "
            f"(pillars or not compressible) and every other layer at its smallest rank still does not fit ({err}); "
            "give a larger budget or a quality floor (max_ppl_ratio)"
        ) from None
    return chosen, {"budget_bits_per_weight": budget_bits_per_weight}


def thresholds_dict(t: Thresholds) -> dict[str, float]:
    return asdict(t)
