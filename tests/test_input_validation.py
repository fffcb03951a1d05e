"""Every config field is what it claims to be: bool is not int, float is not int, NaN is not a number
(issue 11, case 9). Each error names the field."""

from __future__ import annotations

import math

import pytest

from hf_svdq import SVDQuantConfig
from hf_svdq.calibration.source import CalibrationConfig

BAD_FIELDS = [
    ({"rank": True}, "rank must be"),
    ({"rank": 8.0}, "rank must be"),
    ({"rank": {"*.q_proj": 8.5}}, r"rank\['\*.q_proj'\] must be"),
    ({"rank": 8, "residual_bits": 4.0}, "residual_bits must be one of"),
    ({"rank": 8, "residual_bits": True}, "residual_bits must be one of"),
    ({"target_bits_per_weight": math.nan}, "target_bits_per_weight must be a positive finite number"),
    ({"target_bits_per_weight": math.inf}, "target_bits_per_weight must be a positive finite number"),
    ({"target_bits_per_weight": -1.0}, "target_bits_per_weight must be a positive finite number"),
    ({"target_bits_per_weight": True}, "target_bits_per_weight must be a positive finite number"),
    ({"energy": 1.5}, "energy must be a number in"),
    ({"energy": math.nan}, "energy must be a number in"),
    ({"target_param_ratio": math.nan}, "target_param_ratio must be in"),
    ({"rank": 8, "group_size": 64.0}, "group_size must be a positive int"),
    ({"rank": 8, "rank_floor": 2.0}, "rank_floor must be a non-negative int"),
    ({"rank": 8, "damp": math.nan}, "damp must be in"),
    ({"rank": 8, "refine_steps": True, "residual_bits": 4}, "refine_steps must be a non-negative int"),
    ({"rank": 8, "residual_bits": 4, "layer_bits": {"a": 8.0}}, r"layer_bits\['a'\] must be one of"),
    ({"target_bits_per_weight": 5.0, "residual_bits": 4, "bit_choices": [4, 8.0]}, "bit_choices: every entry"),
    ({"rank": 8, "int8_head": 1}, "int8_head must be True or False"),
    ({"rank": 8, "format_version": 1.0}, "format_version must be a positive int"),
    ({"rank": 8, "skip": "*.q_proj"}, "skip must be a list of patterns"),
    ({"ranks": {"a": -1}}, r"ranks\['a'\] must be"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_FIELDS, ids=[str(k) for k, _ in BAD_FIELDS])
def test_config_fields_are_validated_by_type_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVDQuantConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "x", "n_samples": 2.0}, "calibration.n_samples must be a positive int"),
        ({"text": "x", "seq_len": True}, "calibration.seq_len must be a positive int"),
        ({"text": "x", "sequential": "yes"}, "calibration.sequential must be True or False"),
        ({"text": "x", "seed": -1}, "calibration.seed must be a non-negative int"),
        ({"text": "x", "tokenizer": 3}, "calibration.tokenizer must be a path or name"),
        ({"text": "x", "stats_cache": ["a"]}, "calibration.stats_cache must be a path or name"),
        ({"text": "x", "file": "y"}, "give one source"),
    ],
)
def test_calibration_fields_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**kwargs)


def test_the_same_checks_run_on_a_saved_config():
    saved = SVDQuantConfig(rank=8, residual_bits=4).to_dict()
    saved["residual_bits"] = 4.0
    with pytest.raises(ValueError, match="residual_bits must be one of"):
        SVDQuantConfig.from_dict(saved)
