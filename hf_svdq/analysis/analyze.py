"""Sensitivity analysis of a model under one compression setting, end to end.

The two entry points, :func:`analyze` and :func:`analyze_options`, are where an analysis reads its
``SVDQuantConfig``: each resolves it once (the per-layer plan, the algorithm settings, the calibration
tokens) and hands plain values down. ``analyze(model, tokenizer, config, text)`` isolates every layer (:mod:`hf_svdq.analysis.sensitivity`), probes
groups of layers one at a time and leave-one-out (:mod:`hf_svdq.analysis.probes`), classifies them and emits
a policy (:mod:`hf_svdq.analysis.policy`). :meth:`Analysis.write` puts ``report.md``, ``report.json``,
``policy.json`` and, with matplotlib installed, the pictures (:mod:`hf_svdq.analysis.plots`) in a folder.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.statistics import dense_grams, find_blocks
from ..compression.decisions import CompressionSettings, LayerDecision
from ..compression.plan import compression_settings, find_linear_layers, protected_layers, resolve_plan
from ..evaluation.metrics import DEFAULT_PROMPTS, tokenize_text
from ..format.policy_file import save_policy
from ..integration.config import SVDQuantConfig
from .options import DEFAULT_PROBE_RANKS, OptionAnalysis, option_analysis
from .policy import Thresholds, build_policy, classify, find_outliers, thresholds_dict
from .probes import GROUPINGS, MODES, Prober, estimate_seconds, group_layers, run_probes
from .sensitivity import LayerIsolation, family, format_isolation, isolate_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisSettings:
    """What to probe and how the policy is chosen (a byte budget or a quality floor; neither: the
    bytes of the analysis setting itself, i.e. the policy competes with uniform compression)."""

    grouping: str = "layer"
    modes: tuple[str, ...] = MODES
    eval_tokens: int = 1024
    window: int = 512
    prompts: tuple[str, ...] = DEFAULT_PROMPTS[:3]
    max_new_tokens: int = 32
    thresholds: Thresholds = field(default_factory=Thresholds)
    budget_bits_per_weight: float | None = None
    max_ppl_ratio: float | None = None
    rank_step: int = 8
    pillars: str = "protect"

    def __post_init__(self) -> None:
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or "alone" not in self.modes:
            raise ValueError(f"modes must include 'alone' and be drawn from {MODES}, got {self.modes!r}")
        if self.eval_tokens < 2 or self.max_new_tokens < 1 or self.rank_step < 1:
            raise ValueError("eval_tokens must be >= 2, max_new_tokens and rank_step >= 1")
        if self.budget_bits_per_weight is not None and self.max_ppl_ratio is not None:
            raise ValueError("give budget_bits_per_weight or max_ppl_ratio, not both")
        if self.pillars not in ("dense", "protect"):
            raise ValueError(f"pillars must be 'dense' or 'protect', got {self.pillars!r}")


@dataclass
class Analysis:
    """Everything measured, the classes and the policy."""

    rows: list[LayerIsolation]
    groups: dict[str, list[str]]
    dense: dict[str, Any]
    all_compressed: dict[str, Any]
    probes: dict[str, dict[str, dict[str, Any]]]
    classes: dict[str, tuple[str, str]]
    policy: dict[str, Any] | None
    timings: dict[str, float]
    info: dict[str, Any]
    policy_error: str | None = None

    def family_summary(self) -> dict[str, dict[str, float]]:
        """Per module family (attention / MLP): median and max KL when compressed alone, class counts."""
        kind_of = {r.name: r.kind for r in self.rows}
        buckets: dict[str, list[tuple[float, str]]] = {}
        for group, members in self.groups.items():
            families = {family(kind_of[n]) for n in members}
            key = families.pop() if len(families) == 1 else "mixed"
            buckets.setdefault(key, []).append((self.probes["alone"][group]["kl"], self.classes[group][0]))
        return {
            key: {"groups": len(items), "median_kl_alone": statistics.median(k for k, _ in items),
                  "max_kl_alone": max(k for k, _ in items), "pillars": sum(c == "pillar" for _, c in items),
                  "sensitive": sum(c == "sensitive" for _, c in items)}
            for key, items in buckets.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": self.info, "timings": self.timings, "dense": self.dense, "all_compressed": self.all_compressed,
            "families": self.family_summary(), "layers": [r.to_dict() for r in self.rows], "groups": self.groups,
            "probes": self.probes, "classes": {g: {"class": c, "reason": why} for g, (c, why) in self.classes.items()},
            "policy": self.policy, "policy_error": self.policy_error,
        }

    def write(self, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
        """``report.json``, ``report.md``, ``policy.json`` and the PNGs; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json"}
        if self.policy is not None:
            paths["policy"] = save_policy(self.policy, out / "policy.json")
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        if plots:
            from .plots import plot_policy_ranks, plot_sensitivity_heatmap

            paths["heatmap"] = plot_sensitivity_heatmap(self, out / "sensitivity_heatmap.png")
            if self.policy is not None:
                paths["ranks"] = plot_policy_ranks(self, out / "policy_ranks.png")
        from .report import markdown_report

        paths["markdown"] = out / "report.md"
        paths["markdown"].write_text(markdown_report(self, {k: p.name for k, p in paths.items()}), encoding="utf-8")
        return paths


def _model_info(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {"name_or_path": getattr(cfg, "name_or_path", None), "architectures": getattr(cfg, "architectures", None),
            "model_type": getattr(cfg, "model_type", None)}


def _reused_probes(report: dict[str, Any], setting: dict[str, Any], groups: dict[str, list[str]],
                   settings: AnalysisSettings) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Probe measures of an earlier ``report.json``, after checking it analysed this setting and these groups."""
    if report.get("info", {}).get("setting") != setting:
        raise ValueError("the reused report analysed another setting; give the same mode/rank/calibration flags")
    if report.get("groups") != groups:
        raise ValueError("the reused report has other probe groups (another model, grouping or setting)")
    missing = [m for m in settings.modes if m not in report.get("probes", {})]
    if missing:
        raise ValueError(f"the reused report has no {missing} probes")
    return {m: report["probes"][m] for m in settings.modes}, report["dense"], report["all_compressed"]


def _plan(model: nn.Module, tokenizer: Any, config: SVDQuantConfig) -> tuple[list[LayerDecision], CompressionSettings, torch.Tensor | None]:
    """The config resolved once: the per-layer plan, the algorithm settings and the calibration tokens."""
    stacks = len(find_linear_layers(model)) - len(find_linear_layers(model, experts=False))
    if stacks:
        warnings.warn(f"hf-svdq analyze studies Linear layers only: the {stacks} mixture-of-experts stack(s) of this model "
                      "are left out of the analysis (they are compressed by from_pretrained as usual)", UserWarning, stacklevel=3)
    decisions = resolve_plan(find_linear_layers(model, experts=False), config, protected_layers(model),
                             next(model.parameters()).element_size())
    ids = config.calibration.token_ids(tokenizer, model) if config.calibration is not None else None
    return decisions, compression_settings(config), ids


@dataclass
class _Measured:
    rows: list[LayerIsolation]
    spectra: dict[str, torch.Tensor]
    groups: dict[str, list[str]]
    probes: dict[str, Any]
    dense: dict[str, Any]
    all_compressed: dict[str, Any]
    eval_tokens: int


def _measure(model: nn.Module, tokenizer: Any, decisions: list[LayerDecision], compression: CompressionSettings,
             ids: torch.Tensor | None, text: str, settings: AnalysisSettings, setting: dict[str, Any], progress: bool,
             reuse: dict[str, Any] | None, timings: dict[str, float]) -> _Measured:
    """Per-layer isolation, then the probes (or an earlier report's, checked against ``setting``)."""
    start = time.perf_counter()
    prefix, _ = find_blocks(model)
    names = [d.spec.name for d in decisions if d.rank is not None]
    grams = dense_grams(model, names, ids, compression.batch_size, compression.stats_cache, progress) if ids is not None else {}
    timings["activation_statistics_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rows, modules, spectra = isolate_layers(model, decisions, compression, grams, prefix, progress)
    del grams
    timings["isolation_s"] = time.perf_counter() - start
    logger.info("hf_svdq analysis: per-layer isolation\n%s", format_isolation(rows))
    groups = group_layers(rows, settings.grouping)
    start = time.perf_counter()
    if reuse is not None:
        probes, dense_measures, all_measures = _reused_probes(reuse, setting, groups, settings)
        eval_tokens = int(reuse["info"]["eval_tokens"])
    else:
        eval_ids = tokenize_text(tokenizer, text, settings.eval_tokens)
        prober = Prober(model, tokenizer, eval_ids, settings.prompts, settings.max_new_tokens, settings.window)
        estimate = estimate_seconds(prober, groups, settings.modes)
        logger.warning("hf_svdq analysis: %d probe(s) of %d group(s), about %.0f s (%.1f s per probe)",
                       len(groups) * len(settings.modes) + 1, len(groups), estimate, prober.seconds_per_probe)
        results = run_probes(model, prober, modules, groups, settings.modes, progress)
        timings["probe_estimate_s"] = estimate
        probes = {mode: {g: r.to_dict() for g, r in results[mode].items()} for mode in settings.modes}
        dense_measures, all_measures = prober.dense.to_dict(), results["all"].to_dict()
        eval_tokens = int(eval_ids.shape[1])
    timings["probes_s"] = time.perf_counter() - start
    return _Measured(rows, spectra, groups, probes, dense_measures, all_measures, eval_tokens)


def _policy(model: nn.Module, m: _Measured, classes: dict[str, tuple[str, str]], decisions: list[LayerDecision],
            compression: CompressionSettings, settings: AnalysisSettings) -> tuple[dict[str, Any] | None, str | None]:
    """The policy for the settings' budget or quality floor, or why there is none."""
    alone_kl = {g: v["kl"] for g, v in m.probes["alone"].items()}
    outliers = find_outliers(alone_kl, settings.thresholds)
    for group, reason in outliers.items():
        logger.warning("hf_svdq analysis: %s kept dense: %s", group, reason)
    budget = settings.budget_bits_per_weight
    if budget is None and settings.max_ppl_ratio is None:
        # the analysed setting's bytes, plus what keeping the outliers dense costs on top of them
        outlier_layers = {n for g in outliers for n in m.groups[g]}
        compressed = sum(r.dense_bytes if r.name in outlier_layers else r.compressed_bytes for r in m.rows)
        budget = 8 * compressed / sum(r.out_features * r.in_features for r in m.rows)
    all_layers = {d.spec.name: d.reason or "not analysed" for d in decisions if d.rank is None}
    try:
        policy = build_policy(
            m.rows, m.spectra, m.groups, alone_kl, classes, compression, all_layers,
            next(model.parameters()).element_size(), budget, settings.max_ppl_ratio, settings.rank_step, _model_info(model),
            pillars=settings.pillars, outliers=outliers,
        )
    except ValueError as err:  # keep the measurements: the report still gets written, without a policy
        logger.error("hf_svdq analysis: no policy: %s", err)
        return None, str(err)
    policy["thresholds"] = thresholds_dict(settings.thresholds)
    return policy, None


def analyze(
    model: nn.Module, tokenizer: Any, config: SVDQuantConfig, text: str, settings: AnalysisSettings | None = None,
    progress: bool = True, reuse: dict[str, Any] | None = None,
) -> Analysis:
    """Run the whole analysis on a dense ``model`` (left dense afterwards).

    ``reuse``: an earlier ``report.json`` of the same model and setting; its probe measures are taken
    instead of probing again (isolation is redone, in about a minute), e.g. for another budget."""
    settings = settings or AnalysisSettings()
    if config.ranks is not None:
        raise ValueError("the analysis setting must be a rank policy (rank, energy or a budget), not resolved ranks")
    decisions, compression, ids = _plan(model, tokenizer, config)
    setting = config.to_dict()
    timings: dict[str, float] = {}
    m = _measure(model, tokenizer, decisions, compression, ids, text, settings, setting, progress, reuse, timings)
    classes = classify(m.probes["alone"], int(m.dense["loops"]), m.probes.get("leave_one_out"), m.all_compressed,
                       settings.thresholds)
    policy, policy_error = _policy(model, m, classes, decisions, compression, settings)
    info = {**_model_info(model), "setting": setting, "grouping": settings.grouping, "modes": list(settings.modes),
            "eval_tokens": m.eval_tokens, "prompts": list(settings.prompts), "probes_reused": reuse is not None,
            "max_new_tokens": settings.max_new_tokens, "thresholds": thresholds_dict(settings.thresholds)}
    return Analysis(m.rows, m.groups, m.dense, m.all_compressed, m.probes, classes, policy, timings, info, policy_error)


def analyze_options(
    model: nn.Module, tokenizer: Any, config: SVDQuantConfig, text: str, budget_bits_per_weight: float | None = None,
    probe_ranks: Sequence[int] = DEFAULT_PROBE_RANKS, probe_samples: int = 2, eval_tokens: int = 1024,
    prompts: Sequence[str] = DEFAULT_PROMPTS[:3], thresholds: Thresholds | None = None, progress: bool = True,
) -> OptionAnalysis:
    """Probe every layer's residual options, allocate ``budget_bits_per_weight`` (default: the config's
    ``target_bits_per_weight``) and measure the plan on ``text`` (held out: never the calibration text).
    ``config`` must be residual mode with ``bit_choices`` and calibration. The model is left dense."""
    if config.residual_bits is None or not config.bit_choices or config.calibration is None:
        raise ValueError("option analysis needs residual mode with bit_choices (e.g. [4, 8]) and calibration")
    budget = budget_bits_per_weight if budget_bits_per_weight is not None else config.target_bits_per_weight
    if budget is None or budget <= 0:
        raise ValueError(f"option analysis needs a positive bits-per-weight budget, got {budget!r}")
    if probe_samples < 1:
        raise ValueError(f"probe_samples must be >= 1, got {probe_samples}")
    decisions, compression, ids = _plan(model, tokenizer, config)
    assert ids is not None
    return option_analysis(model, tokenizer, decisions, compression, ids, text, budget, probe_ranks, probe_samples,
                           eval_tokens, prompts, thresholds, progress)


def pillars(analysis: Analysis) -> list[str]:
    """Group names classified as pillars."""
    return [g for g, (c, _) in analysis.classes.items() if c == "pillar"]
