"""LoRA ("smart LoRA") on hf_svdq models through PEFT, steered by a policy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQLinear, SVDQuantConfig

peft = pytest.importorskip("peft")
from hf_svdq.integration.peft_lora import (
    load_adapter,
    lora_config_from_policy,
    lora_target_modules,
    pillar_modules,
    register_lora,
)

PILLAR = "model.layers.1.self_attn.v_proj"


def _policy(folder) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ranks = {n: 8 for n in names if n != PILLAR}
    classes = {n: {"class": "pillar" if n == PILLAR else "robust", "group": n} for n in names}
    return {"hf_svdq_policy": 1, "setting": {"calibrated": False}, "ranks": ranks, "classes": classes,
            "dense": {PILLAR: "policy: pillar", "lm_head": "output embedding"}}


@pytest.fixture()
def svdq_model(tiny_checkpoint):
    folder = tiny_checkpoint("llama", tie=False)
    policy = _policy(folder)
    return folder, policy, AutoModelForCausalLM.from_pretrained(folder, quantization_config=SVDQuantConfig.from_policy(policy))


def test_targets_avoid_pillars(svdq_model):
    _, policy, _ = svdq_model
    assert pillar_modules(policy) == [PILLAR]
    targets = lora_target_modules(policy)
    assert PILLAR not in targets and len(targets) == len(policy["classes"]) - 1
    assert set(lora_target_modules(policy, only_compressed=True)) == set(policy["ranks"])
    with pytest.raises(ValueError, match="target_modules"):
        lora_config_from_policy(policy, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="DoRA"):
        register_lora(peft.LoraConfig(target_modules=["q_proj"], use_dora=True))


def test_training_steps_adapter_save_and_reload(svdq_model, tmp_path):
    folder, policy, model = svdq_model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = peft.get_peft_model(model, lora_config_from_policy(policy, r=4, lora_alpha=8))
    wrapped = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.get_base_layer(), SVDQLinear)
    assert not hasattr(lora.base_model.model.model.layers[1].self_attn.v_proj, "lora_A")  # the pillar is left alone
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for name, param in lora.base_model.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name  # the compressed model is untouched
    lora.eval()
    with torch.no_grad():
        expected = lora(ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SVDQuantConfig.from_policy(policy))
    reloaded = load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    with pytest.raises(ValueError, match="cannot merge"):
        reloaded.merge_and_unload()


def test_trainer_accepts_an_hf_svdq_model_with_adapters(svdq_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    _, policy, model = svdq_model
    lora = peft.get_peft_model(model, lora_config_from_policy(policy, r=4))
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no")
    result = Trainer(model=lora, args=args, train_dataset=data).train()
    assert result.global_step == 2
