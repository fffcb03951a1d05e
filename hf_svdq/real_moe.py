"""A real-weights mixture-of-experts model: SmolLM2-135M-Instruct sparsely upcycled into a Mixtral.

No real MoE checkpoint ships offline, so :func:`smollm2_moe_checkpoint` builds one from the bundled
SmolLM2 (:mod:`hf_svdq.real_model`): a ``MixtralForCausalLM`` with SmolLM2's attention, norms and
embeddings; in every block ``experts`` experts, each a copy of SmolLM2's MLP plus independent Gaussian
noise of ``noise`` times each weight row's standard deviation (so experts differ); a random router
(normal, std 0.02); Mixtral's routing: softmax, top-``top_k``, weights renormalised. Its dense
perplexity is SmolLM2's (the experts are near-copies and the top-k weights sum to one), so a
compressed version can be judged against it. Built once into the hf_svdq cache and reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .real_model import cache_root, smollm2_checkpoint
from .real_model import resolve_model_id as real_model_id

SMOLLM2_MOE_ALIAS = "@smollm2-moe"
"""CLI shortcut for the default upcycled model (8 experts, top-2)."""
ROUTER_STD = 0.02
_KEEP = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
         "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta", "rope_parameters", "rope_scaling", "hidden_act")


def smollm2_moe_checkpoint(experts: int = 8, top_k: int = 2, noise: float = 0.01, seed: int = 0) -> Path:
    """Folder of the upcycled Mixtral (float32 safetensors + SmolLM2's tokenizer); built on first call (~1 min)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    folder = cache_root() / f"smollm2-moe-{experts}x{'' if top_k == 2 else f'-top{top_k}'}-noise{noise:g}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    source = smollm2_checkpoint()
    base = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config = MixtralConfig(**{k: base[k] for k in _KEEP if base.get(k) is not None}, num_local_experts=experts,
                           num_experts_per_tok=top_k, sliding_window=None)
    dense: dict[str, torch.Tensor] = {}
    for f in sorted(source.glob("*.safetensors")):
        dense.update(load_file(str(f)))
    generator = torch.Generator().manual_seed(seed)

    def noisy(w: torch.Tensor) -> torch.Tensor:
        return w.float() + noise * w.float().std(dim=1, keepdim=True) * torch.randn(w.shape, generator=generator)

    state = {k: v for k, v in dense.items() if ".mlp." not in k}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        gate, up, down = (dense[p + f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        state[p + "experts.gate_up_proj"] = torch.stack([torch.cat([noisy(gate), noisy(up)]) for _ in range(experts)])
        state[p + "experts.down_proj"] = torch.stack([noisy(down) for _ in range(experts)])
        state[p + "gate.weight"] = ROUTER_STD * torch.randn(experts, config.hidden_size, generator=generator)
    model = MixtralForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"upcycling left tensors missing {missing[:3]} / unexpected {unexpected[:3]}: "
                           "this transformers version names Mixtral's experts differently; please report it")
    model.tie_weights()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
    partial.rename(folder)
    return folder


def resolve_model_id(model: str) -> str:
    """The CLI's model argument: ``@smollm2-moe`` and ``@smollm2`` become their cached checkpoints; other ids
    pass through."""
    if model == SMOLLM2_MOE_ALIAS:
        return str(smollm2_moe_checkpoint())
    return real_model_id(model)
