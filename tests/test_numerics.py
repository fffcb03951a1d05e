"""Numerics guards (issue 11, cases 1, 2 and 4): inputs that used to end in NaN logits or an unloadable checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.algorithms.groupquant import MIN_SCALE, quantize_gptq, quantize_rtn

from .conftest import tiny_model


def _saved(tmp_path, edit):
    model = tiny_model("llama")
    with torch.no_grad():
        edit(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_all_zero_groups_do_not_turn_into_nan(tmp_path):
    """Pruned (all-zero) rows under calibrated GPTQ: the fp16 group scale used to underflow to 0."""
    def prune(model):
        model.model.layers[0].self_attn.q_proj.weight[:16].zero_()
        model.model.layers[1].mlp.down_proj.weight[:, :32].zero_()

    source = _saved(tmp_path, prune)
    config = SVDQuantConfig(rank=4, residual_bits=4, group_size=32, calibration={"dataset": "model", "n_samples": 4, "seq_len": 16})
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.all(q.weight_scale.float() >= MIN_SCALE)
    # the quantizers themselves, on a zero group
    w = torch.zeros(4, 32)
    for quantized in (quantize_rtn(w, 4, 32), quantize_gptq(w, torch.eye(32), 4, 32)):
        assert torch.equal(quantized.dequantize(), w)


def test_an_int4_group_that_is_not_whole_bytes_is_refused():
    with pytest.raises(ValueError, match=r"group_size must be even with residual_bits=4 \(two codes per byte\), got 1"):
        SVDQuantConfig(rank=4, residual_bits=4, group_size=1)
    SVDQuantConfig(rank=4, residual_bits=8, group_size=3)  # INT8: one code per byte, any group


@pytest.mark.parametrize("kwargs", [{"rank": 8}, {"rank": 0, "residual_bits": 8, "group_size": 32}])
def test_a_non_finite_source_weight_is_named(tmp_path, kwargs):
    """Both paths: quantize-on-load (fixed rank) and compress-after-load (residual)."""
    def poison(model):
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = float("nan")

    source = _saved(tmp_path, poison)
    message = r"model\.layers\.0\.self_attn\.q_proj\.weight has 1 non-finite value\(s\) \(NaN/Inf\): refusing to compress it"
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(source, quantization_config=SVDQuantConfig(**kwargs))


@pytest.mark.real
def test_real_model_pruned_rows_and_a_nan_weight(smollm2_path, tmp_path):
    """SmolLM2-135M: 64 pruned rows of one layer under calibrated INT4 GPTQ give finite, sane logits;
    a NaN in a weight is refused naming it. Only that layer is compressed (the rest skipped) to stay fast."""
    layer = "model.layers.3.self_attn.q_proj"
    dense = AutoModelForCausalLM.from_pretrained(smollm2_path)
    with torch.no_grad():
        dense.get_submodule(layer).weight[:64].zero_()
    dense.save_pretrained(tmp_path / "pruned")
    only = [rf"re:^(?!{layer.replace('.', chr(92) + '.')}$).*"]
    config = SVDQuantConfig(rank=16, residual_bits=4, group_size=64, skip=only,
                            calibration={"dataset": "austen", "n_samples": 4, "seq_len": 128, "tokenizer": str(smollm2_path)})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", quantization_config=config)
    assert type(model.get_submodule(layer)).__name__ == "SVDQResidualLinear"
    ids = torch.arange(100, 132).unsqueeze(0)
    with torch.no_grad():
        logits, reference = model(ids).logits, dense(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    with torch.no_grad():
        dense.get_submodule(layer).weight[7, 9] = float("inf")
    dense.save_pretrained(tmp_path / "inf")
    with pytest.raises(ValueError, match=rf"{layer.replace('.', chr(92) + '.')}\.weight has 1 non-finite value"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "inf", quantization_config=SVDQuantConfig(rank=16, skip=only))
