import json

import pytest

from hf_svdq import FORMAT_VERSION, SVDQuantConfig


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"rank": 0}, ["rank", "0"]),
        ({"rank": -3}, ["rank", "-3"]),
        ({"rank": 1.5}, ["rank", "1.5"]),
        ({"rank": True}, ["rank", "True"]),
        ({"rank": "8"}, ["rank", "'8'"]),
        ({"rank": {"*.q_proj": 0}}, ["rank['*.q_proj']", "0"]),
        ({"rank": {}}, ["rank", "empty"]),
        ({"rank": {"re:(": 8}}, ["rank", "re:("]),
        ({"rank": 8, "skip": ["re:[unclosed"]}, ["skip", "re:[unclosed"]),
        ({"rank": 8, "skip": "*.mlp.*"}, ["skip", "*.mlp.*"]),
        ({"rank": 8, "skip": [""]}, ["skip"]),
        ({"rank": 8, "bogus": 1}, ["unknown", "bogus"]),
        ({"rank": 8, "format_version": FORMAT_VERSION + 1}, ["format_version", str(FORMAT_VERSION + 1), "upgrade"]),
        ({"rank": 8, "quant_method": "gptq"}, ["quant_method", "gptq"]),
        ({"ranks": {"a.b": -1}}, ["ranks['a.b']", "-1"]),
        ({}, ["rank"]),
    ],
)
def test_invalid_config_names_field_and_value(kwargs, names):
    with pytest.raises(ValueError) as info:
        SVDQuantConfig(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_config_round_trips_through_json():
    config = SVDQuantConfig(rank={"model.layers.0.*": 32, "*": 8}, skip=["*.mlp.*", "re:.*k_proj"])
    data = json.loads(json.dumps(config.to_dict()))
    again = SVDQuantConfig.from_dict(data)
    assert again.to_dict() == config.to_dict()
    assert again.quant_method == "svdq"
    assert not again.is_resolved


ROUND_TRIPS = [
    {"rank": 16, "int8_head": True},
    {"energy": 0.9, "skip": ["*.mlp.*"], "damp": 0.05},
    {"target_param_ratio": 0.3, "rank_floor": 4},
    {"target_bits_per_weight": 5.0, "residual_bits": 4, "group_size": 64, "residual_method": "mse", "refine_steps": 2},
    {"target_bits_per_weight": 6.0, "residual_bits": 4, "group_size": 32, "bit_choices": [8, 4]},
    {"rank": 0, "residual_bits": 8, "group_size": None},
    {"ranks": {"a.q": 4, "a.k": 0}, "dense": {"lm_head": "output embedding"}, "residual_bits": 4, "layer_bits": {"a.k": 8}},
]


@pytest.mark.parametrize("kwargs", ROUND_TRIPS)
def test_every_mode_round_trips_and_every_field_is_saved(kwargs):
    import inspect

    config = SVDQuantConfig(**kwargs)
    saved = json.loads(json.dumps(config.to_dict()))
    assert SVDQuantConfig.from_dict(saved).to_dict() == saved
    fields = set(inspect.signature(SVDQuantConfig.__init__).parameters) - {"self", "kwargs"}
    assert set(saved) == fields  # every constructor field is saved, nothing else
    assert saved["format_version"] == FORMAT_VERSION


def test_the_planner_resolves_the_config_into_plain_settings():
    from dataclasses import fields

    from hf_svdq.compression.plan import compression_settings

    config = SVDQuantConfig(target_bits_per_weight=6.0, residual_bits=4, group_size=32, bit_choices=[4, 8], refine_steps=1)
    settings = compression_settings(config)
    assert (settings.residual_bits, settings.group_size, settings.residual_method, settings.refine_steps) == (4, 32, "rtn", 1)
    assert settings.bit_choices == (4, 8) and settings.budgeted and not settings.calibrated
    assert all(isinstance(getattr(settings, f.name), (int, float, str, bool, tuple, type(None))) for f in fields(settings))
    resolved = SVDQuantConfig(**{**config.to_dict(), "ranks": {"a.q": 4}, "quant_method": "svdq"})
    assert not compression_settings(resolved).budgeted  # resolved ranks are authoritative: no budget reruns


def test_rank_patterns_order_and_int_catch_all():
    assert [(p.text, r) for p, r in SVDQuantConfig(rank=16).rank_patterns()] == [("*", 16)]
    config = SVDQuantConfig(rank={"a.*": 4, "*": 2})
    assert [(p.text, r) for p, r in config.rank_patterns()] == [("a.*", 4), ("*", 2)]


def test_config_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from hf_svdq import SVDQuantizer, register

    register()
    register()  # idempotent
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["svdq"] is SVDQuantConfig
    assert AUTO_QUANTIZER_MAPPING["svdq"] is SVDQuantizer
