"""Healing: distilling the low-rank factors towards the dense model lowers KL and keeps the format."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.compression.healing import heal


@pytest.mark.parametrize("kwargs", [{"rank": 8}, {"rank": 4, "residual_bits": 4, "group_size": 32}])
def test_healing_lowers_kl_and_keeps_the_format(tiny_checkpoint, tmp_path, kwargs):
    source = tiny_checkpoint("llama")
    teacher = AutoModelForCausalLM.from_pretrained(source).eval()
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=SVDQuantConfig(**kwargs)).eval()
    shapes = {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    result = heal(model, teacher, ids, steps=30, lr=3e-3, batch_size=4, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result.kl_after < 0.8 * result.kl_before, result
    assert result.layers == 14 and result.tokens == 8 * 24
    assert {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()} == shapes
    assert not model.training
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_healing_refuses_what_it_cannot_do(tiny_checkpoint):
    source = tiny_checkpoint("llama")
    teacher = AutoModelForCausalLM.from_pretrained(source)
    plain = AutoModelForCausalLM.from_pretrained(source, quantization_config=SVDQuantConfig(rank=0, residual_bits=8, group_size=32))
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="no compressed layer with rank > 0"):
        heal(plain, teacher, ids)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        heal(plain, teacher, ids, steps=0)
    with pytest.raises(ValueError, match=r"ids must be \[n_samples, seq_len\]"):
        heal(plain, teacher, ids[0])
