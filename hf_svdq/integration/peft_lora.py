"""LoRA on hf_svdq models with PEFT, steered by a sensitivity policy ("smart LoRA").

PEFT only wraps layer types it knows; hf_svdq's compressed layers are registered through PEFT's
supported extension point, ``LoraConfig._register_custom_module``, with :class:`SVDQLoraLinear`:
the frozen compressed layer runs as is and the adapter ``B A x`` is added to its output. Merging an
adapter into INT8 factors is refused (it would need a re-factorization), so keep adapters separate.

``lora_config_from_policy`` targets every analysed layer except the pillars (or, with
``only_compressed=True``, only the layers the policy compresses); ``pillar_modules`` lists the
pillars for freezing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..format.policy_file import load_policy
from ..nn.layers import COMPRESSED_LAYERS


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA on hf_svdq models needs PEFT: pip install 'hf-svdq[lora]'") from None
    return peft


def _lora_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    class SVDQLoraLinear(Linear):
        """PEFT LoRA around a frozen hf_svdq layer: ``y = svdq(x) + scale * B(A(dropout(x)))``."""

        def _get_in_out_features(self, module: Any) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
            raise ValueError(
                f"cannot merge a LoRA adapter into the INT8 factors of {type(self.get_base_layer()).__name__}: "
                "keep the adapter unmerged (PeftModel) or compress the merged dense model again"
            )

        def unmerge(self) -> None:
            raise ValueError("hf_svdq LoRA layers are never merged")

    return SVDQLoraLinear


_CLASS: type | None = None


def lora_layer_class() -> type:
    """The PEFT LoRA layer class for hf_svdq's compressed layers (built once, PEFT imported lazily)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _lora_linear_class()
    return _CLASS


def register_lora(config: Any) -> Any:
    """Teach a PEFT ``LoraConfig`` to wrap hf_svdq layers; returns the config."""
    _peft()
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA needs the dense base weight; hf_svdq layers support plain LoRA only (use_dora=False)")
    config._register_custom_module(dict.fromkeys(COMPRESSED_LAYERS, lora_layer_class()))
    return config


def pillar_modules(policy: str | Path | Mapping[str, Any]) -> list[str]:
    """Module names the policy classified as pillars."""
    doc = load_policy(policy)
    return sorted(n for n, c in doc.get("classes", {}).items() if c.get("class") == "pillar")


def lora_target_modules(policy: str | Path | Mapping[str, Any], only_compressed: bool = False) -> list[str]:
    """Analysed layers that are not pillars (with ``only_compressed``: those the policy compresses)."""
    doc = load_policy(policy)
    pillars = set(pillar_modules(doc))
    names = doc["ranks"] if only_compressed else doc.get("classes", {})
    targets = sorted(n for n in names if n not in pillars)
    if not targets:
        raise ValueError("the policy leaves no layer to adapt (every analysed layer is a pillar)")
    return targets


def lora_config_from_policy(policy: str | Path | Mapping[str, Any], only_compressed: bool = False, **lora_kwargs: Any) -> Any:
    """A PEFT ``LoraConfig`` (``task_type="CAUSAL_LM"`` unless given) targeting :func:`lora_target_modules`,
    registered for hf_svdq layers. Extra keyword arguments go to ``LoraConfig`` (``r``, ``lora_alpha``, ...)."""
    peft = _peft()
    if "target_modules" in lora_kwargs:
        raise ValueError("target_modules comes from the policy; drop it or build LoraConfig yourself and call register_lora")
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    config = peft.LoraConfig(target_modules=lora_target_modules(policy, only_compressed), **lora_kwargs)
    return register_lora(config)


def load_adapter(model: Any, adapter: str | Path, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained`` for an adapter trained on an hf_svdq model (the saved LoraConfig
    does not carry the custom-module registration, so it is re-applied here)."""
    peft = _peft()
    config = register_lora(peft.LoraConfig.from_pretrained(str(adapter)))
    return peft.PeftModel.from_pretrained(model, str(adapter), config=config, **kwargs)
