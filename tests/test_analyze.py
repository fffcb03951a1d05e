"""Sensitivity analysis end to end on a tiny model with one deliberately fragile layer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.analysis.analyze import AnalysisSettings, analyze

from .conftest import CharTokenizer, fragile_llama

FRAGILE = "model.layers.1.self_attn.v_proj"
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    model = fragile_llama()
    folder = tmp_path_factory.mktemp("fragile")
    model.save_pretrained(folder)
    settings = AnalysisSettings(eval_tokens=256, window=128, prompts=("hello there", "once upon a time"), max_new_tokens=12,
                                budget_bits_per_weight=12.0, pillars="dense")
    analysis = analyze(model, CharTokenizer(), SVDQuantConfig(rank=16, rank_floor=4), TEXT, settings, progress=False)
    return folder, model, analysis


def test_the_fragile_layer_is_the_worst_pillar_and_stays_dense(fragile):
    _, _, analysis = fragile
    kl = {g: m["kl"] for g, m in analysis.probes["alone"].items()}
    assert max(kl, key=kl.get) == FRAGILE
    assert analysis.classes[FRAGILE][0] == "pillar"
    assert FRAGILE not in analysis.policy["ranks"] and FRAGILE in analysis.policy["dense"]
    assert "pillar" in analysis.policy["dense"][FRAGILE]
    # leave-one-out: restoring the fragile layer repairs most of the all-compressed damage
    loo = analysis.probes["leave_one_out"]
    assert loo[FRAGILE]["kl"] < 0.5 * analysis.all_compressed["kl"]
    assert analysis.all_compressed["kl"] > 0 and analysis.dense["kl"] == 0


def test_policy_meets_its_budget_and_prefers_attention_like_the_data(fragile):
    _, _, analysis = fragile
    predicted = analysis.policy["predicted"]
    assert predicted["bits_per_weight"] <= 12.0 + 1e-9
    families = analysis.family_summary()
    assert families["attention"]["max_kl_alone"] == max(m["kl"] for m in analysis.probes["alone"].values())


def test_report_files_are_written(fragile, tmp_path):
    _, _, analysis = fragile
    paths = analysis.write(tmp_path)
    for key in ("json", "markdown", "policy", "heatmap", "ranks"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(paths["json"].read_text())
    assert report["classes"][FRAGILE]["class"] == "pillar"
    text = paths["markdown"].read_text()
    assert FRAGILE in text and "sensitivity_heatmap.png" in text


def test_policy_round_trip_compresses_to_the_same_ranks(fragile, tmp_path):
    folder, _, analysis = fragile
    path = analysis.write(tmp_path, plots=False)["policy"]
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SVDQuantConfig.from_policy(path))
    assert model.config.quantization_config.ranks == analysis.policy["ranks"]
    assert isinstance(model.get_submodule(FRAGILE), torch.nn.Linear)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_policy_for_another_architecture_is_refused(fragile, tiny_checkpoint, tmp_path):
    _, _, analysis = fragile
    with pytest.raises(ValueError, match="another architecture"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gpt_neo"), quantization_config=SVDQuantConfig.from_policy(analysis.policy))
    extra = {**analysis.policy, "ranks": {**analysis.policy["ranks"], "model.layers.7.mlp.up_proj": 8}}
    with pytest.raises(ValueError, match=r"model\.layers\.7\.mlp\.up_proj"):
        AutoModelForCausalLM.from_pretrained(fragile[0], quantization_config=SVDQuantConfig.from_policy(extra))


def test_grouping_by_block_and_type(fragile):
    _, model, _ = fragile
    settings = AnalysisSettings(grouping="type", modes=("alone",), eval_tokens=128, window=128, prompts=("hi",),
                                max_new_tokens=4, budget_bits_per_weight=16.0)
    analysis = analyze(model, CharTokenizer(), SVDQuantConfig(rank=16, rank_floor=4), TEXT, settings, progress=False)
    assert set(analysis.groups) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    kl = {g: m["kl"] for g, m in analysis.probes["alone"].items()}
    assert max(kl, key=kl.get) == "self_attn.v_proj"
    assert "leave_one_out" not in analysis.probes


def test_bad_settings_are_clear_errors(fragile):
    _, model, _ = fragile
    with pytest.raises(ValueError, match="grouping"):
        AnalysisSettings(grouping="row")
    with pytest.raises(ValueError, match="modes"):
        AnalysisSettings(modes=("leave_one_out",))
    with pytest.raises(ValueError, match="not both"):
        AnalysisSettings(budget_bits_per_weight=4.0, max_ppl_ratio=1.1)
    with pytest.raises(ValueError, match="resolved ranks"):
        analyze(model, CharTokenizer(), SVDQuantConfig(ranks={FRAGILE: 4}), TEXT, AnalysisSettings(), progress=False)
    with pytest.raises(ValueError, match="compresses no layer"):
        analyze(model, CharTokenizer(), SVDQuantConfig(rank=16, skip=["*"]), TEXT, AnalysisSettings(), progress=False)


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
def test_other_architectures(arch):
    from .conftest import tiny_model

    model = tiny_model(arch).eval()
    settings = AnalysisSettings(grouping="block", eval_tokens=128, window=64, prompts=("hi",), max_new_tokens=4,
                                budget_bits_per_weight=24.0)
    analysis = analyze(model, CharTokenizer(), SVDQuantConfig(rank=8), TEXT, settings, progress=False)
    assert set(analysis.groups) == {"block 0", "block 1"}
    assert {r.block for r in analysis.rows} == {0, 1}
    assert set(analysis.family_summary()) == {"mixed"}  # a block holds attention and MLP
    kinds = {r.kind for r in analysis.rows}
    assert ("attn.attention.q_proj" in kinds) if arch == "gpt_neo" else ("attn.c_attn" in kinds)
    assert analysis.policy is not None and analysis.policy["predicted"]["bits_per_weight"] <= 24.0


def test_reused_probes_give_the_same_classes_and_a_protect_policy(fragile):
    _, model, analysis = fragile
    report = json.loads(json.dumps(analysis.to_dict()))
    settings = AnalysisSettings(eval_tokens=256, window=128, prompts=("hello there", "once upon a time"), max_new_tokens=12,
                                budget_bits_per_weight=12.0, pillars="protect")
    again = analyze(model, CharTokenizer(), SVDQuantConfig(rank=16, rank_floor=4), TEXT, settings, progress=False, reuse=report)
    assert again.classes == analysis.classes and again.info["probes_reused"]
    assert again.policy["criterion"]["pillars"] == "protect"
    assert again.policy["predicted"]["bits_per_weight"] <= 12.0 + 1e-9
    with pytest.raises(ValueError, match="another setting"):
        analyze(model, CharTokenizer(), SVDQuantConfig(rank=12, rank_floor=4), TEXT, settings, progress=False, reuse=report)


def test_default_policy_keeps_the_planted_outlier_dense_and_compresses_the_rest():
    """Issue 10: with the default settings (pillars compete, budget = the analysed bytes) the one
    catastrophically fragile layer used to get the same rank as the others; it is an outlier now."""
    model = fragile_llama()
    settings = AnalysisSettings(eval_tokens=256, window=128, prompts=("hello there",), max_new_tokens=8, modes=("alone",))
    analysis = analyze(model, CharTokenizer(), SVDQuantConfig(rank=16, rank_floor=4), TEXT, settings, progress=False)
    policy = analysis.policy
    assert FRAGILE not in policy["ranks"] and policy["dense"][FRAGILE].startswith("policy: pillar, outlier")
    assert policy["classes"][FRAGILE]["outlier"].startswith("outlier: KL alone")
    assert policy["classes"][FRAGILE]["reason"].startswith("KL alone")  # every layer says why it got its class
    robust = [n for n, c in policy["classes"].items() if c["class"] == "robust"]
    assert robust and all(n in policy["ranks"] for n in robust)
    # the bytes of keeping it dense come on top of the analysed setting's, not out of the other layers
    assert policy["criterion"]["budget_bits_per_weight"] > 8 * sum(r.compressed_bytes for r in analysis.rows) / sum(
        r.out_features * r.in_features for r in analysis.rows)
    config = SVDQuantConfig.from_policy(policy)
    assert FRAGILE in config.dense and FRAGILE not in config.ranks
