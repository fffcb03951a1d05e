import warnings

import pytest

from hf_svdq import SVDQuantConfig
from hf_svdq.compression.decisions import LinearSpec, recorded_dense, recorded_ranks
from hf_svdq.compression.plan import plan_from_resolved, resolve_plan

SPECS = [
    LinearSpec("model.layers.0.self_attn.q_proj", 64, 64, False),
    LinearSpec("model.layers.0.self_attn.k_proj", 32, 64, False),
    LinearSpec("model.layers.0.mlp.up_proj", 128, 64, False),
    LinearSpec("model.layers.0.mlp.down_proj", 64, 128, False),
    LinearSpec("lm_head", 100, 64, False),
]
PROTECTED = {"lm_head": "output embedding"}


def _plan(config, element_bytes=4):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {d.spec.name: d for d in resolve_plan(SPECS, config, PROTECTED, element_bytes)}


def test_uniform_rank_keeps_head_dense():
    plan = _plan(SVDQuantConfig(rank=8))
    assert plan["lm_head"].rank is None and plan["lm_head"].reason == "output embedding"
    assert all(plan[n].rank == 8 for n in plan if n != "lm_head")


def test_user_skip_list_keeps_default_skips():
    plan = _plan(SVDQuantConfig(rank=8, skip=["*.mlp.*"]))
    assert plan["lm_head"].rank is None  # still protected with a user list
    assert plan["model.layers.0.mlp.up_proj"].reason == "skip pattern '*.mlp.*'"
    assert plan["model.layers.0.self_attn.q_proj"].rank == 8


def test_rank_map_first_match_wins_and_unmatched_layers_stay_dense():
    plan = _plan(SVDQuantConfig(rank={"*.q_proj": 16, "*.self_attn.*": 4}))
    assert plan["model.layers.0.self_attn.q_proj"].rank == 16
    assert plan["model.layers.0.self_attn.k_proj"].rank == 4
    assert plan["model.layers.0.mlp.up_proj"].reason == "no rank pattern matched"


def test_rank_is_clamped_then_guarded():
    plan = _plan(SVDQuantConfig(rank=500))
    # k_proj 32x64: clamped to 32 (< in 64) and 32*96 B + scales < 8 KiB dense fp32
    assert plan["model.layers.0.self_attn.k_proj"].rank == 32
    assert "clamped" in plan["model.layers.0.self_attn.k_proj"].reason
    # q_proj 64x64 at full rank truncates nothing
    assert plan["model.layers.0.self_attn.q_proj"].rank is None
    assert plan["model.layers.0.self_attn.q_proj"].reason.startswith("full rank")


def test_break_even_guard_depends_on_load_dtype():
    # down_proj 64x128 at rank 60: 60*192 = 11520 B of int8 + scales vs 8192 numbers
    fp32 = _plan(SVDQuantConfig(rank=60), element_bytes=4)["model.layers.0.mlp.down_proj"]
    int8_like = _plan(SVDQuantConfig(rank=60), element_bytes=1)["model.layers.0.mlp.down_proj"]
    assert fp32.rank == 60
    assert int8_like.rank is None and int8_like.reason.startswith("break-even")


def test_unmatched_patterns_warn_with_their_text():
    with pytest.warns(UserWarning, match=r"skip pattern '\*\.nothing\.\*'"):
        resolve_plan(SPECS, SVDQuantConfig(rank=8, skip=["*.nothing.*"]), PROTECTED, 4)
    with pytest.warns(UserWarning, match=r"rank pattern 're:.*c_attn'"):
        resolve_plan(SPECS, SVDQuantConfig(rank={"re:.*c_attn": 8, "*": 4}), PROTECTED, 4)


def test_resolved_plan_round_trip_and_errors():
    decisions = list(_plan(SVDQuantConfig(rank={"*.q_proj": 16, "*.mlp.*": 8})).values())
    resolved = SVDQuantConfig(rank=1, ranks=recorded_ranks(decisions), dense=recorded_dense(decisions))
    again = plan_from_resolved(SPECS, resolved)
    assert {d.spec.name: d.rank for d in again} == {d.spec.name: d.rank for d in decisions}

    with pytest.raises(ValueError, match="another architecture"):
        plan_from_resolved(SPECS, SVDQuantConfig(ranks={"transformer.h.0.attn.c_attn": 8}))
    with pytest.raises(ValueError, match=r"ranks\['model.layers.0.self_attn.q_proj'\] = 64"):
        plan_from_resolved(SPECS, SVDQuantConfig(ranks={"model.layers.0.self_attn.q_proj": 64}))


def test_a_group_size_that_fits_no_layer_is_an_error_and_one_that_fits_some_warns():
    """Issue 11 (3): group 48 on 64-wide layers used to leave every layer dense without a word."""
    from hf_svdq.compression.decisions import LinearSpec
    from hf_svdq.compression.plan import resolve_plan

    specs = [LinearSpec("a", 64, 64, False), LinearSpec("b", 64, 96, False)]
    with pytest.raises(ValueError, match=r"group_size 40 divides the input width of none of the 2 eligible layers \(widths \[64, 96\]\)"):
        resolve_plan(specs, SVDQuantConfig(rank=8, residual_bits=4, group_size=40), {}, 4)
    with pytest.warns(UserWarning, match=r"group_size 48 does not divide the input width \[64\] of 1 layer\(s\), e.g. a"):
        decisions = resolve_plan(specs, SVDQuantConfig(rank=8, residual_bits=4, group_size=48), {}, 4)
    assert [d.rank for d in decisions] == [None, 8]


def test_each_decision_names_its_method_bits_and_group():
    residual = _plan(SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    assert residual["lm_head"].method == "dense"
    q = residual["model.layers.0.self_attn.q_proj"]
    assert (q.method, q.bits, q.group_size) == ("residual", 4, 32)
    low = _plan(SVDQuantConfig(rank=8))["model.layers.0.self_attn.q_proj"]
    assert (low.method, low.bits, low.group_size) == ("low_rank", None, None)
