"""Calibrated, residual, energy and budget modes on tiny models: compress, save, reload exactly."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.format.inspect import checkpoint_report
from hf_svdq.nn.layers import COMPRESSED_LAYERS, SVDQLinear, SVDQResidualLinear


@pytest.fixture(scope="module")
def calibration():
    ids = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(3))
    return CalibrationConfig(input_ids=ids, batch_size=4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _round_trip(path, config, ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    before = _logits(model, ids)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again, ids), before)
    return model, again


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neo"])
def test_calibrated_low_rank_round_trip_and_beats_plain(arch, tiny_checkpoint, calibration, input_ids, tmp_path):
    path = tiny_checkpoint(arch)
    dense = _logits(AutoModelForCausalLM.from_pretrained(path), input_ids)
    model, _ = _round_trip(path, SVDQuantConfig(rank=12, calibration=calibration), input_ids, tmp_path)
    assert any(isinstance(m, SVDQLinear) for m in model.modules())
    plain = _logits(AutoModelForCausalLM.from_pretrained(path, quantization_config=SVDQuantConfig(rank=12)), input_ids)
    calibrated = _logits(model, input_ids)
    assert (calibrated - dense).pow(2).mean() < (plain - dense).pow(2).mean()
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["calibration"]["source"] == "input_ids" and saved["calibration"]["sequential"] is True


@pytest.mark.parametrize(("bits", "group", "method"), [(4, 32, "gptq"), (8, None, "rtn"), (4, 16, "mse")])
def test_residual_round_trip(bits, group, method, tiny_checkpoint, calibration, input_ids, tmp_path):
    calib = calibration if method != "rtn" else None
    config = SVDQuantConfig(rank=4, residual_bits=bits, group_size=group, residual_method=method, calibration=calib)
    model, _ = _round_trip(tiny_checkpoint("qwen2"), config, input_ids, tmp_path)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, SVDQResidualLinear) and (layer.bits, layer.rank) == (bits, 4)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        codes = handle.get_slice("model.layers.0.mlp.up_proj.weight")
        groups = 1 if group is None else 64 // group
        assert codes.get_dtype() == "U8" and codes.get_shape() == [128, groups, (group or 64) * bits // 8]
    report = checkpoint_report(tmp_path)
    assert bits < report.bits_per_weight_compressed() < bits + 4


def test_int4_rank0_is_group_quantization_close_to_dense(tiny_checkpoint, input_ids):
    path = tiny_checkpoint("llama")
    dense = AutoModelForCausalLM.from_pretrained(path)
    quant = AutoModelForCausalLM.from_pretrained(path, quantization_config=SVDQuantConfig(rank=0, residual_bits=8, group_size=None))
    layer = quant.model.layers[1].self_attn.o_proj
    assert isinstance(layer, SVDQResidualLinear) and layer.rank == 0 and not hasattr(layer, "weight_u")
    reference = dense.model.layers[1].self_attn.o_proj.weight
    assert (layer.dequantize() - reference).abs().max() <= reference.abs().amax(1).max() / 255 + 1e-6


def test_energy_policy_records_resolved_ranks(tiny_checkpoint, calibration, input_ids, tmp_path):
    model, _ = _round_trip(tiny_checkpoint("llama"), SVDQuantConfig(energy=0.5, calibration=calibration), input_ids, tmp_path)
    ranks = model.config.quantization_config.ranks
    assert ranks and len(set(ranks.values())) > 1  # chosen per matrix
    for name, rank in ranks.items():
        assert model.get_submodule(name).rank == rank


def test_budget_policy_meets_its_bits(tiny_checkpoint, calibration, input_ids, tmp_path):
    config = SVDQuantConfig(target_bits_per_weight=6.0, residual_bits=4, group_size=32, calibration=calibration, rank_floor=2)
    _round_trip(tiny_checkpoint("llama"), config, input_ids, tmp_path)
    assert checkpoint_report(tmp_path).bits_per_weight_compressed() <= 6.0


def test_param_ratio_policy(tiny_checkpoint, input_ids, tmp_path):
    model, _ = _round_trip(tiny_checkpoint("llama"), SVDQuantConfig(target_param_ratio=0.5, rank_floor=2), input_ids, tmp_path)
    kept = sum(m.rank * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, SVDQLinear))
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, SVDQLinear))
    assert kept <= 0.5 * total


def test_impossible_budget_is_a_clear_error(tiny_checkpoint):
    config = SVDQuantConfig(target_bits_per_weight=4.1, residual_bits=4, group_size=32)
    with pytest.raises(ValueError, match="rank budget cannot be met"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)


def test_residual_dequantize_restores_dense(tiny_checkpoint, input_ids):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint("gpt2"), quantization_config=SVDQuantConfig(rank=4, residual_bits=4, group_size=32)
    )
    before = _logits(model, input_ids)
    model.dequantize()
    assert not any(isinstance(m, COMPRESSED_LAYERS) for m in model.modules())
    assert torch.allclose(_logits(model, input_ids), before, atol=1e-4)


def test_calibration_without_a_tokenizer_is_a_clear_error(tiny_checkpoint):
    config = SVDQuantConfig(rank=4, calibration={"text": "some text " * 50, "n_samples": 2, "seq_len": 8})
    with pytest.raises(ValueError, match="calibration needs a tokenizer"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)


def test_dense_statistics_are_cached_and_reused(tiny_checkpoint, calibration, input_ids, tmp_path):
    cache = tmp_path / "stats"
    calib = CalibrationConfig(input_ids=calibration.input_ids, sequential=False, stats_cache=str(cache), batch_size=4)
    first = _logits(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=8, calibration=calib)), input_ids)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2  # one per block: only one block's statistics are ever in memory
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = _logits(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=8, calibration=calib)), input_ids)
    assert torch.equal(first, second) and [f.stat().st_mtime_ns for f in files] == mtimes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_base_weight_matches_reference_dequantization(bits, dtype):
    from hf_svdq.algorithms.groupquant import quantize_rtn

    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    base = quantize_rtn(weight, bits, 16)
    layer = SVDQResidualLinear(64, 24, 0, bits, 16, bias=False, dtype=dtype)
    layer.load(base, None)
    reference = base.dequantize(torch.float32)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(layer.base_weight(dtype).float(), reference, atol=tolerance, rtol=tolerance)
