"""Expert stacks for the AWQ export: each expert as the per-expert Linear layers vLLM's MoE loader reads.

vLLM loads an AWQ mixture-of-experts checkpoint from per-expert tensors named as the original Hub
checkpoints name them (``FusedMoE.make_expert_params_mapping``): ``<block>.mlp.experts.<e>.gate_proj`` /
``up_proj`` / ``down_proj`` (Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) or Mixtral's
``<block>.block_sparse_moe.experts.<e>.w1`` (gate) / ``w3`` (up) / ``w2`` (down), each with
``qweight``/``qzeros``/``scales``. :func:`split_expert_stacks` turns every stack of an hf_svdq checkpoint
into such layers, in hf_svdq's Linear layout (codes, group scales and zeros, correction factors), so the
exporter packs them like any Linear; ``gate_up_proj`` splits at its middle row (transformers
concatenates gate and up), and both halves keep the stack's right correction factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..format import layout as fmt
from ..format.checkpoint import stack_tensor_names

__all__ = ["PER_EXPERT_NAMES", "original_name", "split_expert_stacks", "stack_tensor_names"]

PER_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen2_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "olmoe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "deepseek_v3": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
"""model_type -> (the MoE block's name in the original checkpoints, per-expert projection names)."""


def original_name(name: str, model_type: str) -> str:
    """A tensor name as the original checkpoints of ``model_type`` spell it (Mixtral's ``mlp`` -> ``block_sparse_moe``)."""
    block = PER_EXPERT_NAMES[model_type][0] if model_type in PER_EXPERT_NAMES else "mlp"
    return name.replace(".mlp.", f".{block}.") if block != "mlp" else name


def split_expert_stacks(stacks: list[str], get: Callable[[str], torch.Tensor], model_type: str,
                        compressed: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{per-expert layer name: {Linear-layout tensor name: tensor}}`` for every expert of every stack
    (a dense stack gives ``weight`` only)."""
    if model_type not in PER_EXPERT_NAMES:
        raise ValueError(f"the AWQ export knows vLLM's per-expert names for {sorted(PER_EXPERT_NAMES)}, not {model_type!r}")
    block, parts = PER_EXPERT_NAMES[model_type]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for stack in stacks:
        module, _, last = stack.rpartition(".")
        base = module.replace(".mlp.", f".{block}.") if block != "mlp" else module

        def tensor(name: str, module: str = module, last: str = last) -> torch.Tensor:
            return get(f"{module}.{fmt.expert_tensor_name(last, name)}")

        first = tensor(fmt.CODES)
        rows = first.shape[1]
        halves = (("gate", slice(0, rows // 2)), ("up", slice(rows // 2, rows))) if last == "gate_up_proj" \
            else (("down" if last == "down_proj" else "up", slice(0, rows)),)
        for expert in range(first.shape[0]):
            for part, sel in halves:
                name = f"{base}.{expert}.{parts[part]}"
                if stack not in compressed:
                    layers[name] = {fmt.LEFT: first[expert, sel]}
                    continue
                entry = {t: tensor(t)[expert, sel] for t in (fmt.CODES, fmt.GROUP_SCALE, fmt.GROUP_ZERO)}
                try:
                    entry[fmt.CORR_LEFT] = tensor(fmt.CORR_LEFT)[expert, sel]
                    entry[fmt.CORR_LEFT_SCALE] = tensor(fmt.CORR_LEFT_SCALE)[expert, sel]
                    entry[fmt.RIGHT] = tensor(fmt.RIGHT)[expert]
                    entry[fmt.RIGHT_SCALE] = tensor(fmt.RIGHT_SCALE)[expert]
                except KeyError:
                    pass  # rank 0: no correction
                layers[name] = entry
    return layers
