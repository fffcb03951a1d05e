"""Tiny random mixture-of-experts models of every fused-experts architecture hf_svdq covers."""

from __future__ import annotations

import torch

MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")
"""transformers model types whose experts are one fused module (``experts.gate_up_proj`` / ``down_proj``)."""

_COMMON = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "tie_word_embeddings": False, "max_position_embeddings": 128}


def moe_config(arch: str, experts: int = 4, top_k: int = 2):  # type: ignore[no-untyped-def]
    """A tiny config of ``arch``: ``experts`` experts of width 64 (128 for gate+up), ``top_k`` routed."""
    from transformers import AutoConfig

    kwargs: dict[str, object] = dict(_COMMON)
    if arch == "mixtral":
        kwargs.update(intermediate_size=64, num_local_experts=experts, num_experts_per_tok=top_k)
    elif arch == "qwen2_moe":
        kwargs.update(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      num_experts=experts, num_experts_per_tok=top_k)
    elif arch == "qwen3_moe":
        kwargs.update(intermediate_size=128, moe_intermediate_size=64, num_experts=experts, num_experts_per_tok=top_k,
                      head_dim=16)
    elif arch == "olmoe":
        kwargs.update(intermediate_size=64, num_experts=experts, num_experts_per_tok=top_k)
    elif arch == "gpt_oss":
        kwargs.update(intermediate_size=64, num_local_experts=experts, num_experts_per_tok=top_k, head_dim=16,
                      layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    elif arch == "deepseek_v3":
        kwargs.update(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=experts, num_experts_per_tok=top_k,
                      n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    else:
        raise ValueError(arch)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_moe(arch: str, experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A small random causal LM of ``arch`` with deterministic weights (experts drawn N(0, 0.05))."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch, experts, top_k))
    for name, param in model.named_parameters():  # some versions leave fused experts uninitialised: draw them all
        if param.dim() == 3 or "experts" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.eval()
