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
