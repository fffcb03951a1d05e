"""What share of a model was compressed, and why the rest stayed dense.

Every compression reports it (the CLI summary and ``--json``, ``hf-svdq inspect``, the model card, the
saved ``quantization_config.coverage``): each parameter of the model is either part of a compressed
layer or expert stack, or dense with a reason: the plan's own (skip pattern, output head, break-even,
group size, ...), ``embedding``, ``1-D`` (norms, biases, scalars), ``router`` (a MoE gate, small and
sensitive, dense by design), or ``unsupported: <ModuleClass>`` for a weight in a module type hf_svdq
does not compress. A new layer type is thereby never left dense silently: when unsupported weights
exceed :data:`UNSUPPORTED_WARN_SHARE` of the non-embedding parameters, :func:`warn_unsupported` warns
naming their classes.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..nn.experts import SVDQExperts, is_fused_experts, unsupported_reason
from .decisions import LayerDecision

logger = logging.getLogger(__name__)

UNSUPPORTED_WARN_SHARE = 0.2
"""Warn when weights of unsupported module types exceed this share of the non-embedding parameters."""

_ROUTER = re.compile(r"router|gate$|topk", re.IGNORECASE)


@dataclass(frozen=True)
class Coverage:
    """Parameter counts of one compressed model (dense counts: a compressed weight counts as the dense
    weights it replaces). ``dense`` maps each reason to the parameters kept dense for it."""

    parameters: int
    embedding: int
    compressed: int
    dense: dict[str, int] = field(default_factory=dict)

    @property
    def non_embedding(self) -> int:
        return self.parameters - self.embedding

    @property
    def share(self) -> float:
        """Compressed share of the non-embedding parameters."""
        return self.compressed / max(self.non_embedding, 1)

    @property
    def unsupported(self) -> dict[str, int]:
        """Module class -> parameters left dense because hf_svdq cannot compress that type."""
        return {k.split(": ", 1)[1]: v for k, v in self.dense.items() if k.startswith("unsupported: ")}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share_of_non_embedding": round(self.share, 6)}

    @classmethod
    def from_dict(cls, data: Any) -> Coverage | None:
        """The recorded coverage of a saved config (None when absent or not readable)."""
        try:
            return cls(int(data["parameters"]), int(data["embedding"]), int(data["compressed"]),
                       {str(k): int(v) for k, v in dict(data.get("dense") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def lines(self) -> list[str]:
        """A human summary: the compressed share, then each dense reason with its share."""
        base = max(self.non_embedding, 1)
        out = [(f"compressed: {self.compressed:,} of {self.non_embedding:,} non-embedding parameters ({self.share:.1%}); "
                f"embeddings {self.embedding:,} dense")]
        for reason, count in sorted(self.dense.items(), key=lambda kv: -kv[1]):
            out.append(f"  dense, {reason}: {count:,} ({count / base:.1%})")
        return out


def _reason(decision: LayerDecision) -> str:
    """A decision's reason, grouped: 'skip pattern ...', 'break-even', 'group_size ...', 'output embedding'."""
    text = decision.reason or "not planned"
    head = text.split(":")[0]
    if head.startswith("weight tied"):
        return "weight tied"
    if head.startswith("group_size"):
        return "group_size does not divide in_features"
    return head


def measure_coverage(model: nn.Module, decisions: Sequence[LayerDecision]) -> Coverage:
    """The coverage of ``model`` (dense or compressed) under the final ``decisions``."""
    by_param: dict[str, LayerDecision] = {}
    for d in decisions:
        by_param[d.spec.name if d.spec.experts else f"{d.spec.name}.weight"] = d
    compressed_modules = {d.spec.name for d in decisions if d.rank is not None and not d.spec.experts}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    if head is not None and getattr(head, "weight", None) is not None:
        embeddings.add(id(head.weight))
    total = embedding = compressed = 0
    dense: dict[str, int] = {}
    modules = dict(model.named_modules())
    for d in decisions:
        if d.rank is not None:
            compressed += d.spec.numel
            total += d.spec.numel
    for name, param in model.named_parameters():
        module_name, _, tensor = name.rpartition(".")
        module = modules.get(module_name)
        if module_name in compressed_modules and tensor != "bias":
            continue  # counted from its decision
        if isinstance(module, SVDQExperts) and _is_compressed_tensor(module, tensor):
            continue
        count = param.numel()
        total += count
        decision = by_param.get(name)
        if id(param) in embeddings:
            embedding += count
            reason = None
        elif decision is not None:
            reason = _reason(decision)
        elif param.dim() <= 1 or tensor.endswith("_bias"):
            reason = "1-D (norms, biases)"
        elif module is not None and is_fused_experts(module):
            reason = f"unsupported: {type(module).__name__} ({unsupported_reason(module) or 'unknown expert layout'})"
        elif _ROUTER.search(type(module).__name__ if module is not None else "") or _ROUTER.search(module_name):
            reason = "router"
        else:
            reason = f"unsupported: {type(module).__name__ if module is not None else '?'}"
        if reason is not None:
            dense[reason] = dense.get(reason, 0) + count
    return Coverage(total, embedding, compressed, dense)


def _is_compressed_tensor(module: SVDQExperts, tensor: str) -> bool:
    return any(tensor == stack or (tensor.startswith(stack + "_") and not tensor.endswith("_bias")) for stack in module.formats)


def warn_unsupported(coverage: Coverage) -> None:
    """Warn when unsupported module types hold more than :data:`UNSUPPORTED_WARN_SHARE` of the
    non-embedding parameters (log them at info level otherwise)."""
    unsupported = coverage.unsupported
    if not unsupported:
        return
    share = sum(unsupported.values()) / max(coverage.non_embedding, 1)
    classes = ", ".join(f"{cls} ({count:,})" for cls, count in sorted(unsupported.items(), key=lambda kv: -kv[1]))
    message = (f"hf_svdq: {share:.1%} of the non-embedding parameters are in module types hf_svdq cannot compress "
               f"and stay dense: {classes}")
    if share > UNSUPPORTED_WARN_SHARE:
        warnings.warn(message + "; please report the model so the type can be supported", UserWarning, stacklevel=2)
    else:
        logger.info(message)
