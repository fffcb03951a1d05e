"""Residual-option analysis: measured per-layer KLs of (bits, rank) options, the allocator over them,
outlier protection and the policy round trip, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.analysis.analyze import analyze_options
from hf_svdq.analysis.block_kl import BlockKL
from hf_svdq.analysis.options import interpolate_kl, probe_points
from hf_svdq.analysis.probes import swapped
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.compression.compress import compress_layer
from hf_svdq.compression.decisions import CompressionSettings, LayerDecision
from hf_svdq.compression.plan import find_linear_layers

from .conftest import ARCHITECTURES, CharTokenizer, tiny_model

PLANTED = "model.layers.1.mlp.down_proj"
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8
CALIBRATION = "The quick brown fox jumps over the lazy dog, and then some more words follow here. " * 40


def planted_llama() -> torch.nn.Module:
    """Tiny Llama with unit-scale weights in which ``PLANTED`` is fragile under quantization: three pairs
    of intermediate channels are equal and 100x larger, and its columns for each pair cancel exactly
    (w and -w, in different quantization groups), so the dense output ignores them but any rounding
    error is multiplied by 100. Compressing the other layers costs ~1e-4 nats; this one ~0.3."""
    model = tiny_model("llama").eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0, generator=generator)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.normal_(0, module.weight.shape[1] ** -0.5, generator=generator)
        mlp = model.model.layers[1].mlp
        for a, b in ((0, 32), (1, 33), (2, 34)):
            mlp.up_proj.weight[a] *= 100
            mlp.up_proj.weight[b] = mlp.up_proj.weight[a]
            mlp.gate_proj.weight[b] = mlp.gate_proj.weight[a]
            mlp.down_proj.weight[:, b] = -mlp.down_proj.weight[:, a]
    return model


def option_config(budget: float = 6.0, **kwargs: object) -> SVDQuantConfig:
    return SVDQuantConfig(target_bits_per_weight=budget, residual_bits=4, group_size=32, bit_choices=[4, 8], rank_floor=0,
                          residual_method="rtn", refine_steps=1,
                          calibration=CalibrationConfig(text=CALIBRATION, n_samples=4, seq_len=64, batch_size=2), **kwargs)


@pytest.fixture(scope="module")
def planted():
    model = planted_llama()
    analysis = analyze_options(model, CharTokenizer(), option_config(), TEXT, eval_tokens=256, prompts=("hello there",),
                               progress=False)
    return model, analysis


def test_probe_points_and_interpolation_are_exact_at_the_probes():
    assert probe_points([8, 4], (0, 16)) == [(4, 0), (4, 16), (8, 0)]
    curve = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0625])
    kl = interpolate_kl(curve, {0: 2.0, 4: 0.0625 * 4})
    assert kl[0] == pytest.approx(2.0) and kl[4] == pytest.approx(0.25)
    # ratio kl/curve goes linearly from 2 to 4 over ranks 0..4
    assert np.allclose(kl, curve.numpy() * np.array([2.0, 2.5, 3.0, 3.5, 4.0]))
    with pytest.raises(ValueError, match="no measured rank"):
        interpolate_kl(curve, {})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_local_kl_equals_the_full_forward_kl(arch, caplog):
    model = tiny_model(arch).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    meter = BlockKL(model, ids)
    assert meter.tail is not None, f"{arch}: the final norm/head was not recognised"
    assert meter.measure(1) == pytest.approx(0.0, abs=1e-9)
    spec = next(s for s in find_linear_layers(model) if ".1." in s.name or ".h.1." in s.name)
    new, _ = compress_layer(model.get_submodule(spec.name), LayerDecision(spec, 4), CompressionSettings(), None)
    assert new is not None
    with swapped(model, {spec.name: new}):
        local, full = meter.measure(1), meter.measure(0)
    assert full > 0 and local == pytest.approx(full, rel=1e-4)


def test_planted_fragile_layer_gets_only_the_highest_precision(planted):
    _, analysis = planted
    policy = analysis.policy
    assert policy["classes"][PLANTED]["class"] == "outlier"
    assert "outlier" in policy["classes"][PLANTED]["reason"]
    kl4 = {n: row["4:0"] for n, row in analysis.measured.items()}
    assert max(kl4, key=kl4.get) == PLANTED
    # protected: at INT8 (or dense), while the robust majority stays at INT4
    assert policy["layer_bits"].get(PLANTED) == 8 or PLANTED in policy["dense"]
    robust = [n for n in analysis.measured if n != PLANTED]
    assert sum(n not in policy["layer_bits"] for n in robust) > len(robust) // 2
    assert policy["predicted"]["bits_per_weight"] <= 6.0 + 1e-9
    # the plan was built and measured on held-out text; predicted and measured KL are both reported
    assert analysis.plan_measures["kl"] > 0 and analysis.dense_measures["kl"] == 0
    assert "predicted" in analysis.markdown() and PLANTED in analysis.markdown()


def test_protection_is_what_keeps_the_plan_healthy(planted):
    _, analysis = planted
    # the planted layer at INT4 alone costs more than the whole protected plan
    assert analysis.measured[PLANTED]["4:0"] > 10 * analysis.plan_measures["kl"]


def test_option_policy_round_trips_through_from_pretrained(planted, tmp_path):
    model, analysis = planted
    paths = analysis.write(tmp_path / "analysis")
    assert {p.name for p in paths.values()} == {"report.json", "policy.json", "report.md"}
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    ids = CharTokenizer()(CALIBRATION)["input_ids"][:, :256].reshape(4, 64)
    calibration = CalibrationConfig(input_ids=ids, batch_size=2)
    config = SVDQuantConfig.from_policy(paths["policy"], calibration=calibration)
    assert config.layer_bits == analysis.policy["layer_bits"]
    compressed = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    layer = compressed.get_submodule(PLANTED)
    assert getattr(layer, "bits", None) == analysis.policy["layer_bits"].get(PLANTED, 4)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(compressed(ids).logits).all()


def test_option_analysis_refuses_a_setting_without_bit_choices():
    with pytest.raises(ValueError, match="bit_choices"):
        analyze_options(tiny_model("llama"), CharTokenizer(),
                        SVDQuantConfig(target_bits_per_weight=6.0, residual_bits=4, group_size=32,
                                       calibration=CalibrationConfig(text=CALIBRATION, n_samples=2, seq_len=32)), TEXT)
