"""Sibling projections in one kernel call: q/k/v and gate/up read the same input, so decode can compute them together.

transformers' modeling code calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` (and ``gate_proj(x)``,
``up_proj(x)``) one after another on the same tensor. :func:`link_siblings` (run when a compressed model is
loaded) links such residual layers: the first one's call computes all of them in one compiled-kernel call
(:func:`hf_svdq.kernels.ops.residual_siblings`: the input quantized once, one parallel launch) and keeps the
others' outputs; a sibling called next with the *same tensor object, unmodified* (``x._version``) returns its
kept output, else it computes as usual. The outputs are bit-identical to separate calls (the same per-row
arithmetic), nothing is stored in the checkpoint and no weight is copied. Measured on SmolLM2-135M INT4 g64 +
r24 (``benchmarks/further_steps.py``, AMD EPYC, AVX-512 VNNI): 210 -> 120 kernel calls a token.

Only the eager CPU decode path with the compiled kernels uses it; everything else (prefill, gradients,
``torch.compile``, other devices, the numba and reference backends) calls each layer alone.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..kernels.ops import residual_siblings

SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Child names of one parent that read the same input, the first called first (Llama, Qwen2, Gemma, Mistral, GPT-Neo
name them so); a set is linked only where every member is a residual layer of one input width, bits and group size."""


class SiblingGroup:
    """Residual layers that read the same input; see the module docstring. Pickled and deep-copied with its
    members, without the outputs it keeps."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = tuple(members)
        self.kept: list[tuple[Any, int, torch.Tensor] | None] = [None] * len(members)

    def __getstate__(self) -> dict[str, Any]:  # the kept outputs (weak references) stay behind
        return {"members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(list(state["members"]))  # type: ignore[misc]

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s output for ``x`` when this group has it (the first member computes the group's),
        else None (the member computes alone)."""
        if index:
            kept, self.kept[index] = self.kept[index], None
            if kept is not None and kept[0]() is x and kept[1] == x._version:
                return kept[2]
            return None
        layers = []
        for m in self.members:
            p = m._parameters
            layers.append((p["weight"], p["weight_scale"], p["weight_zero"], p.get("weight_u"), p.get("weight_u_scale"),
                           p.get("weight_vh"), p.get("weight_vh_scale"), p["bias"]) if m.rank else
                          (p["weight"], p["weight_scale"], p["weight_zero"], None, None, None, None, p["bias"]))
        outs = residual_siblings(x, self.members[0].bits, layers)
        if outs is None:
            return None
        ref, version = weakref.ref(x), x._version
        for i in range(1, len(outs)):
            self.kept[i] = (ref, version, outs[i])
        return outs[0]


def link_siblings(model: nn.Module) -> int:
    """Link every set of :data:`SIBLINGS` in ``model`` whose members are compatible residual layers; returns
    how many sets were linked (calling it again relinks)."""
    from .residual import SVDQResidualLinear

    linked = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLINGS:
            members = [children.get(n) for n in names]
            if not all(isinstance(m, SVDQResidualLinear) for m in members):
                continue
            first = members[0]
            if any((m.in_features, m.bits, m.group_size, m.transposed) != (first.in_features, first.bits,
                                                                           first.group_size, first.transposed)
                   for m in members):
                continue
            group = SiblingGroup(members)
            for i, m in enumerate(members):
                m.__dict__["_svdq_siblings"] = (group, i)
            linked += 1
    return linked


def unlink_siblings(model: nn.Module) -> None:
    """Undo :func:`link_siblings`: every layer computes alone again."""
    for module in model.modules():
        module.__dict__.pop("_svdq_siblings", None)
