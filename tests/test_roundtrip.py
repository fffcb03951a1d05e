"""Tiny random models per architecture: compress on load, save, reload, generate, dequantize."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from hf_svdq import SVDQLinear, SVDQuantConfig

from .conftest import ARCHITECTURES

RANK = 8


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _compress(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=SVDQuantConfig(rank=RANK), **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compress_save_reload_is_bit_identical(arch, tiny_checkpoint, input_ids, tmp_path):
    model = _compress(tiny_checkpoint(arch))
    compressed = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    assert len(compressed) >= 8  # every block's attention + MLP projections
    assert isinstance(model.get_output_embeddings(), (torch.nn.Linear, Conv1D))  # head stays dense
    before = _logits(model, input_ids)
    assert torch.isfinite(before).all()
    # the factors must be the truncated SVD of the dense weight (guards the dtype the loader hands us)
    name, layer = next(iter(compressed.items()))
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch)).get_submodule(name).weight.detach()
    dense = dense.t() if layer.transposed else dense
    singular = torch.linalg.svdvals(dense)
    optimum = (singular[RANK:] ** 2).sum().sqrt() / singular.norm()
    assert (layer.dequantize() - dense).norm() / dense.norm() < optimum + 0.02

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "svdq" and config["format_version"] == 1
    assert set(config["ranks"]) == set(compressed)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}  # one key: the header bytes are the same on every save
        name = next(iter(compressed))
        assert handle.get_tensor(f"{name}.weight").dtype == torch.int8
        assert handle.get_tensor(f"{name}.weight_vh").dtype == torch.int8
        assert handle.get_slice(f"{name}.weight").get_shape()[1] == RANK

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again, input_ids), before)
    generated = again.generate(input_ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, input_ids.shape[1] + 5)


def test_gpt2_conv1d_layers_are_compressed(tiny_checkpoint):
    model = _compress(tiny_checkpoint("gpt2"))
    attn = model.transformer.h[0].attn
    assert isinstance(attn.c_attn, SVDQLinear) and attn.c_attn.transposed
    assert (attn.c_attn.out_features, attn.c_attn.in_features) == (192, 64)
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gpt2"))
    expected = dense.transformer.h[0].attn.c_attn.weight.t()
    error = (attn.c_attn.dequantize() - expected).norm() / expected.norm()
    _u, s, _vh = torch.linalg.svd(expected)
    best = (s[RANK:] ** 2).sum().sqrt() / s.norm()
    assert error < best + 0.02  # truncation error plus a little INT8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dequantize_restores_dense_modules(arch, tiny_checkpoint, input_ids, tmp_path):
    model = _compress(tiny_checkpoint(arch))
    before = _logits(model, input_ids)
    model.dequantize()
    assert not any(isinstance(m, SVDQLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    assert torch.allclose(_logits(model, input_ids), before, atol=1e-4)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(_logits(plain, input_ids), before, atol=1e-4)


def test_untied_head_is_kept_dense(tiny_checkpoint):
    model = _compress(tiny_checkpoint("llama", tie=False))
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.config.quantization_config.dense == {"lm_head": "output embedding"}


def test_user_skip_list_still_keeps_tied_head(tiny_checkpoint, input_ids):
    config = SVDQuantConfig(rank=RANK, skip=["*.mlp.*"])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gpt_neo"), quantization_config=config)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert not isinstance(model.transformer.h[0].mlp.c_fc, SVDQLinear)
    assert isinstance(model.transformer.h[0].attn.attention.q_proj, SVDQLinear)


def test_users_config_object_is_not_mutated(tiny_checkpoint):
    config = SVDQuantConfig(rank=RANK)
    _compress_with = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)
    assert config.ranks is None and _compress_with.config.quantization_config.ranks


def test_bfloat16_compress_and_reload(tiny_checkpoint, input_ids, tmp_path):
    model = _compress(tiny_checkpoint("llama"), dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight_scale.dtype == torch.bfloat16 and layer.weight.dtype == torch.int8
    before = _logits(model, input_ids)
    assert before.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(_logits(again, input_ids), before)
    fp32 = _logits(_compress(tiny_checkpoint("llama")), input_ids)
    assert torch.nn.functional.cosine_similarity(before.float().flatten(), fp32.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map(device_map, tiny_checkpoint, input_ids):
    reference = _logits(_compress(tiny_checkpoint("qwen2")), input_ids)
    model = _compress(tiny_checkpoint("qwen2"), device_map=device_map)
    assert torch.equal(_logits(model, input_ids), reference)


def test_scales_are_frozen_after_reload(tiny_checkpoint, tmp_path):
    _compress(tiny_checkpoint("llama")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = model.model.layers[1].mlp.down_proj
    assert not any(p.requires_grad for p in layer.parameters())


def test_generate_with_static_cache_and_compile(tiny_checkpoint, input_ids):
    model = _compress(tiny_checkpoint("llama"))
    eager = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    static = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(eager, static)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids).logits, _logits(model, input_ids), atol=1e-5)


def test_unknown_pattern_warns_during_load(tiny_checkpoint):
    with pytest.warns(UserWarning, match="nonexistent"):
        AutoModelForCausalLM.from_pretrained(
            tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=RANK, skip=["*.nonexistent"])
        )


def test_reload_of_checkpoint_missing_a_factor_fails_loudly(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _compress(tiny_checkpoint("llama")).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.0.self_attn.q_proj.weight_vh"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor model.layers.0.self_attn.q_proj.weight_vh"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_policy_for_another_architecture_is_rejected(tiny_checkpoint):
    config = SVDQuantConfig(ranks={"transformer.h.0.attn.c_attn": 8})
    with pytest.raises(ValueError, match="another architecture"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)


def test_reload_of_factor_with_wrong_dtype_fails_loudly(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _compress(tiny_checkpoint("llama")).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key].float()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight is F32\[128, 8\], expected I8\[128, 8\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
