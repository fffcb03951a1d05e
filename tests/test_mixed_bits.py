"""Mixed-precision budgets: per-layer base bits chosen with the rank (``bit_choices``), saved as ``layer_bits``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.algorithms.allocation import option_ranks, relative_error_curves
from hf_svdq.format.inspect import checkpoint_report


def test_error_curves_fall_with_rank_and_bits():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator)
    x = torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    curves = relative_error_curves(weight, x.T @ x, (4, 8), 16)
    for bits, curve in curves.items():
        assert curve.shape == (49,) and torch.all(curve[1:] <= curve[:-1] + 1e-12), bits
        assert float(curve[-1]) == 0.0
    assert 0 < float(curves[8][0]) < float(curves[4][0]) / 100 < 1  # INT8 error is ~256x smaller in energy
    data_free = relative_error_curves(weight, None, (4,), 16)[4]
    assert 0.001 < float(data_free[0]) < 0.05
    assert option_ranks(40) == [0, 8, 16, 24, 32, 40] and option_ranks(1000)[-1] == 256 and option_ranks(0) == [0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bit_choices": [4, 8]}, "bit_choices needs target_bits_per_weight"),
        ({"bit_choices": [8], "target_bits_per_weight": 6.0}, r"must include residual_bits \(4\)"),
        ({"bit_choices": [4, 3], "target_bits_per_weight": 6.0}, r"every entry must be one of \(4, 8\), got 3"),
        ({"bit_choices": "48", "target_bits_per_weight": 6.0}, "must be a non-empty list"),
        ({"bit_choices": [4, True], "target_bits_per_weight": 6.0}, "got True"),
        ({"layer_bits": {"a": 5}, "rank": 8}, r"layer_bits\['a'\] must be one of"),
        ({"layer_bits": ["a"], "rank": 8}, "layer_bits must be a mapping"),
    ],
)
def test_bad_mixed_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVDQuantConfig(residual_bits=4, **kwargs)
    with pytest.raises(ValueError, match="layer_bits applies to residual mode"):
        SVDQuantConfig(rank=8, layer_bits={"a": 8})


def test_mixed_budget_round_trip(wide_llama, tmp_path):
    config = SVDQuantConfig(target_bits_per_weight=6.0, residual_bits=4, group_size=64, bit_choices=[4, 8],
                            calibration={"dataset": "model", "n_samples": 16, "seq_len": 64})  # 1024 tokens > 256 wide
    model = AutoModelForCausalLM.from_pretrained(wide_llama, quantization_config=config)
    resolved = model.config.quantization_config
    assert resolved.layer_bits and set(resolved.layer_bits.values()) == {8}
    assert len(resolved.layer_bits) < len(resolved.ranks)  # a mix, not everything at one width
    for name, bits in resolved.layer_bits.items():
        assert model.get_submodule(name).bits == bits
    model.save_pretrained(tmp_path)
    report = checkpoint_report(tmp_path)
    assert 5.5 < report.bits_per_weight_compressed() <= 6.0
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.config.quantization_config.layer_bits == resolved.layer_bits

    # a layer_bits entry that disagrees with the stored tensors is refused, naming the layer
    saved = json.loads((tmp_path / "config.json").read_text())
    name = next(iter(resolved.layer_bits))
    saved["quantization_config"]["layer_bits"][name] = 4
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    saved["quantization_config"]["layer_bits"] = {"model.layers.0.nope": 8}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"layer_bits names 1 module\(s\) that are not compressed"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_fisher_sensitivity_is_positive_and_leaves_the_model_as_it_was(tiny_checkpoint):
    from hf_svdq.compression.fisher import output_sensitivity

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    kappa = output_sensitivity(model, names, ids, batch_size=4)
    assert set(kappa) == set(names) and all(0 < k < float("inf") for k in kappa.values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and model.training is False
    assert output_sensitivity(model, names, ids, batch_size=2) == pytest.approx(kappa, rel=1e-6)  # batching does not matter
