"""Per-layer isolation measures on synthetic matrices with known answers, and policy classification."""

from __future__ import annotations

import math

import pytest
import torch

from hf_svdq.algorithms.budget import choose_options
from hf_svdq.analysis.policy import Thresholds, classify
from hf_svdq.analysis.sensitivity import family, layer_metrics, split_name
from hf_svdq.format.policy_file import config_kwargs_from_policy, load_policy


def test_layer_metrics_known_answers():
    w = torch.eye(4)
    approx = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0]))
    m = layer_metrics(w, approx)
    assert m["weight_rel_error"] == pytest.approx(0.5)
    assert m["sqnr_db"] == pytest.approx(20 * math.log10(2))
    # activations only along the first axis: dropping the last one costs nothing on the output
    gram = torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    m = layer_metrics(w, approx, gram)
    assert m["output_rel_error"] == pytest.approx(0.0)
    assert m["output_cosine"] == pytest.approx(1.0)
    # ... and only along the last one: the output is lost entirely
    gram = torch.diag(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    m = layer_metrics(w, approx, gram)
    assert m["output_rel_error"] == pytest.approx(1.0)
    assert m["output_cosine"] == pytest.approx(0.0)


def test_output_error_matches_activations():
    torch.manual_seed(0)
    w, approx, x = torch.randn(8, 16), torch.randn(8, 16), torch.randn(100, 16)
    m = layer_metrics(w, approx, x.T @ x)
    y, y2 = x @ w.T, x @ approx.T
    assert m["output_rel_error"] == pytest.approx(float((y - y2).norm() / y.norm()), rel=1e-6)
    cos = float((y * y2).sum() / (y.norm() * y2.norm()))
    assert m["output_cosine"] == pytest.approx(cos, rel=1e-6)


def test_split_name_and_family():
    assert split_name("model.layers.3.self_attn.q_proj", "model.layers") == (3, "self_attn.q_proj")
    assert split_name("transformer.h.11.mlp.c_fc", "transformer.h") == (11, "mlp.c_fc")
    assert split_name("lm_head", "model.layers") == (None, "lm_head")
    assert family("self_attn.q_proj") == "attention"
    assert family("attn.attention.k_proj") == "attention"
    assert family("mlp.down_proj") == "mlp"


def _m(kl: float, loops: int = 0) -> dict[str, float]:
    return {"kl": kl, "loops": loops}


def test_classify_flags_outliers_and_loops():
    alone = {"a": _m(0.01), "b": _m(0.012), "c": _m(0.011), "d": _m(0.5), "e": _m(0.04), "f": _m(0.011, loops=2)}
    classes = classify(alone, dense_loops=0)
    assert classes["d"][0] == "pillar" and "median" in classes["d"][1]
    assert classes["e"][0] == "sensitive"
    assert classes["f"][0] == "pillar" and "loop" in classes["f"][1]
    assert {classes[k][0] for k in "abc"} == {"robust"}


def test_classify_leave_one_out_pillar_needs_a_real_gain():
    alone = {g: _m(0.01) for g in "abcd"}
    loo = {"a": _m(0.2, 0), "b": _m(0.99, 0), "c": _m(0.99, 1), "d": _m(0.98, 1)}
    classes = classify(alone, 0, loo, {"kl": 1.0, "loops": 1})
    assert classes["a"][0] == "pillar"  # restoring it fixes the loops and most of the KL
    assert classes["b"][0] == "robust"  # loops gone too, but the KL barely moved: a flipped greedy path
    with pytest.raises(ValueError, match="sensitive_kl"):
        Thresholds(pillar_kl=2.0, sensitive_kl=3.0)
    with pytest.raises(ValueError, match="min_kl"):
        Thresholds(min_kl=0)


def test_choose_options_budget_and_floor():
    options = {"a": [(0, 0.0, 10.0), (1, 1.0, 5.0), (2, 4.0, 0.0)], "b": [(0, 0.0, 1.0), (9, 10.0, 0.0)]}
    chosen = choose_options(options, budget=4.0)
    assert {n: o[0] for n, o in chosen.items()} == {"a": 2, "b": 0}
    assert sum(o[1] for o in chosen.values()) <= 4.0
    chosen = choose_options(options, max_loss=1.5)
    assert sum(o[2] for o in chosen.values()) <= 1.5
    with pytest.raises(ValueError, match="budget cannot be met"):
        choose_options({"a": [(0, 5.0, 1.0)]}, budget=4.0)
    with pytest.raises(ValueError, match="quality floor cannot be met"):
        choose_options({"a": [(0, 5.0, 1.0)]}, max_loss=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        choose_options(options)


def test_load_policy_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_policy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not an hf_svdq policy"):
        load_policy({"ranks": {}})
    with pytest.raises(ValueError, match="version 99"):
        load_policy({"hf_svdq_policy": 99})
    with pytest.raises(ValueError, match="'ranks'"):
        load_policy({"hf_svdq_policy": 1, "ranks": [], "dense": {}, "setting": {}})


def test_calibrated_policy_without_calibration_warns():
    doc = {"hf_svdq_policy": 1, "ranks": {"x": 4}, "dense": {}, "setting": {"calibrated": True, "residual_bits": 4,
                                                                             "group_size": 64, "residual_method": "gptq"}}
    with pytest.warns(UserWarning, match="calibration"):
        kwargs = config_kwargs_from_policy(doc)
    assert kwargs["residual_method"] == "rtn" and kwargs["ranks"] == {"x": 4}


def test_outliers_are_found_robustly():
    from hf_svdq.analysis.policy import Thresholds, find_outliers

    generator = torch.Generator().manual_seed(0)
    bulk = {f"layer{i}": float(10 ** (-3 + 0.5 * torch.randn((), generator=generator))) for i in range(40)}
    assert find_outliers(bulk) == {}
    planted = {**bulk, "pillar": 10.0}  # ~10^4 x the median
    found = find_outliers(planted)
    assert list(found) == ["pillar"] and "robust z" in found["pillar"]
    # two catastrophic layers do not hide each other (the spread is a median, not a standard deviation)
    assert set(find_outliers({**planted, "pillar2": 5.0})) == {"pillar", "pillar2"}
    # a near-lossless setting flags nothing, however far out (KL below min_kl)
    assert find_outliers({k: v * 1e-6 for k, v in planted.items()}) == {}
    # identical layers: the spread floor keeps a 3x excess from counting
    assert find_outliers({**{f"l{i}": 0.01 for i in range(10)}, "x": 0.03}) == {}
    assert find_outliers({"a": 1.0, "b": 1e-3}) == {}  # too few groups to judge
    with pytest.raises(ValueError, match="outlier_z"):
        Thresholds(outlier_z=0)


def test_smollm2_analysis_has_no_outlier_but_its_strongest_layers_are_pillars():
    """The recorded SmolLM2 analysis: its strongest layers are 13-130x the median, within the bulk's
    spread (robust z <= 2.8), so no layer is forced dense there."""
    import json
    from pathlib import Path

    from hf_svdq.analysis.policy import find_outliers

    report = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/results/analysis-smollm2/report.json").read_text())
    alone = {g: m["kl"] for g, m in report["probes"]["alone"].items()}
    assert len(alone) == 210 and find_outliers(alone) == {}
