"""KL(dense || model) on fixed tokens, re-running only the blocks at and after a changed layer.

A probe that swaps one layer of block ``i`` changes nothing before it, so :class:`BlockKL` caches the
dense hidden states entering every block once and, per probe, runs blocks ``i ..`` plus the final
norm and output head (half the model on average). The tail (norm, head, logit soft-capping) is
found by name and checked against a full forward of the dense model at construction; when it does
not reproduce the model's own logits the meter falls back to full forwards, so a probe is never
measured on a wrong model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.statistics import block_inputs, find_blocks, run_block

logger = logging.getLogger(__name__)

_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_norm", "norm_f")


def _tail(model: nn.Module, prefix: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Last hidden state -> logits, or None when this model's tail is not recognised."""
    owner = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norm = next((m for m in (getattr(owner, n, None) for n in _FINAL_NORMS) if isinstance(m, nn.Module)), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    if norm is None or head is None:
        return None
    config = getattr(model, "config", None)
    cap = getattr(config, "final_logit_softcapping", None) or getattr(getattr(config, "text_config", None), "final_logit_softcapping", None)

    def tail(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(norm(hidden))
        return torch.tanh(logits / cap) * cap if cap else logits

    return tail


class BlockKL:
    """Mean per-token KL(dense || current model) over ``ids`` (``[batch, seq]``), built on the dense model.

    :meth:`measure` takes the index of the first block whose layers differ from dense (0: measure
    the whole model); layers outside the blocks need ``first_block=0``.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int = 2) -> None:
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"KL probe token ids must be [batch, seq >= 2], got shape {tuple(ids.shape)}")
        self.model, self.ids, self.batch_size = model, ids, batch_size
        prefix, self.blocks = find_blocks(model)
        with torch.no_grad():
            hidden, self.kwargs = block_inputs(model, self.blocks, ids, batch_size)
            self.inputs = [hidden]
            for index, block in enumerate(self.blocks):
                hidden = [run_block(block, h, self.kwargs[index]) for h in hidden]
                self.inputs.append(hidden)
            self.tail = _tail(model, prefix)
            full = self._full_log_probs()
            if self.tail is not None:
                local = [F.log_softmax(self.tail(h).float(), -1) for h in self.inputs[-1]]
                gap = max(float((a - b).abs().max()) for a, b in zip(local, full))
                if gap > 1e-3:
                    logger.warning("hf_svdq: block-local KL does not reproduce %s's logits (max gap %.2e); probing with "
                                   "full forwards", type(model).__name__, gap)
                    self.tail = None
        self.reference = full
        self.reference_probs = [r.exp() for r in full]  # computed once, not per probe

    def _full_log_probs(self) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        return [F.log_softmax(self.model(self.ids[i : i + self.batch_size].to(device), use_cache=False).logits.float(), -1)
                for i in range(0, self.ids.shape[0], self.batch_size)]

    @torch.no_grad()
    def measure(self, first_block: int = 0) -> float:
        """KL per token of the model as it is now, assuming blocks before ``first_block`` are dense."""
        if self.tail is None or first_block <= 0:
            current = self._full_log_probs()
        else:
            hidden = self.inputs[first_block]
            for index in range(first_block, len(self.blocks)):
                hidden = [run_block(self.blocks[index], h, self.kwargs[index]) for h in hidden]
            current = [F.log_softmax(self.tail(h).float(), -1) for h in hidden]
        total = sum(float((probs * (ref - cur)).sum()) for probs, ref, cur in zip(self.reference_probs, self.reference, current))
        return max(total / self.ids.numel(), 0.0)
