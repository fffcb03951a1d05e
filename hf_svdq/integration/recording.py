"""What a compression run records in the config ``save_pretrained`` writes: the resolved plan (ranks,
dense layers, per-layer bits), the budget's prediction and the coverage. Shared by the quantizer
(compression inside ``from_pretrained``) and the streaming entry point (:mod:`hf_svdq.streaming`)."""

from __future__ import annotations

import logging

from torch import nn

from ..compression.compress import CompressionResult
from ..compression.decisions import LayerDecision, recorded_dense, recorded_layer_bits, recorded_ranks
from ..compression.plan import log_plan
from .config import SVDQuantConfig

logger = logging.getLogger(__name__)


def record_result(model: nn.Module, config: SVDQuantConfig, result: CompressionResult) -> None:
    """Into ``config``: the final plan of a data-dependent compression, its prediction and its coverage."""
    config.ranks, config.dense = recorded_ranks(result.decisions), recorded_dense(result.decisions)
    if config.bit_choices:  # a mixed budget chose each layer's bits: record the ones that differ
        config.layer_bits = recorded_layer_bits(result.decisions, config.residual_bits)
    config.prediction = result.prediction
    log_plan(result.decisions)
    record_coverage(model, config, result.decisions, result.expert_fallback)


def record_coverage(model: nn.Module, config: SVDQuantConfig, decisions: list[LayerDecision],
                     fallback: dict[str, int]) -> None:
    """Measure what was compressed (:mod:`hf_svdq.compression.coverage`), log it, warn about unsupported
    module types, and record it (with per-expert calibration fallbacks) in the config that is saved."""
    from ..compression.coverage import measure_coverage, warn_unsupported

    coverage = measure_coverage(model, decisions)
    for line in coverage.lines():
        logger.info("hf_svdq: %s", line)
    warn_unsupported(coverage)
    recorded = coverage.to_dict()
    if fallback:
        recorded["experts_calibrated_data_free"] = {"experts": sum(fallback.values()),
                                                    "of": sum(d.spec.experts for d in decisions if d.spec.name in fallback)}
    config.coverage = recorded
