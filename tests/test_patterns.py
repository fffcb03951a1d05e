import pytest

from hf_svdq.integration.patterns import compile_pattern, unmatched


@pytest.mark.parametrize(
    ("pattern", "name", "hit"),
    [
        ("*.mlp.*", "model.layers.3.mlp.up_proj", True),
        ("*.mlp.*", "model.layers.3.self_attn.q_proj", False),
        ("model.layers.4.self_attn.k_proj", "model.layers.4.self_attn.k_proj", True),
        ("model.layers.4.self_attn.k_proj", "model.layers.14.self_attn.k_proj", False),
        ("model.layers.1?.*", "model.layers.14.mlp.up_proj", True),
        ("re:.*layers\\.(0|29)\\..*", "model.layers.29.mlp.up_proj", True),
        ("re:.*layers\\.(0|29)\\..*", "model.layers.2.mlp.up_proj", False),
        ("re:q_proj", "model.layers.0.self_attn.q_proj", False),  # regexes match the whole name
        ("mlp", "model.layers.0.mlp", False),
    ],
)
def test_pattern_matching(pattern, name, hit):
    assert compile_pattern(pattern, "skip").matches(name) is hit


def test_unmatched_lists_patterns_by_text():
    patterns = [compile_pattern(p, "skip") for p in ("*.q_proj", "*.nothing_here")]
    assert unmatched(patterns, ["a.q_proj", "a.k_proj"]) == ["*.nothing_here"]
