"""End-to-end probes: what compressing (or restoring) a group of layers does to the whole model.

* **alone** (one-at-a-time): only the group is compressed; the rest of the model is dense.
* **leave-one-out**: everything is compressed except the group.

Each probe measures perplexity on a fixed token window set, KL(dense || probe) and top-1 agreement
against the dense model's cached log-probabilities, and greedy generations from fixed prompts through
the loop detector. The compressed modules come from :func:`hf_svdq.analysis.sensitivity.isolate_layers` and
are swapped in and out; no SVD is recomputed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..evaluation.metrics import _windows, generation_health
from .sensitivity import LayerIsolation

logger = logging.getLogger(__name__)

GROUPINGS = ("layer", "block", "type")
MODES = ("alone", "leave_one_out")


@contextmanager
def swapped(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily replace submodules by name; the originals come back on exit, also on error."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        yield model
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def group_layers(rows: Sequence[LayerIsolation], how: str) -> dict[str, list[str]]:
    """Probe groups over the compressed layers: each ``layer``, each ``block`` or each module ``type``."""
    if how not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {how!r}")
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r.rank is None:
            continue
        if how == "layer":
            key = r.name
        elif how == "block":
            key = f"block {r.block}" if r.block is not None else r.name
        else:
            key = r.kind
        groups.setdefault(key, []).append(r.name)
    return groups


@dataclass
class ProbeResult:
    """One model state's measures."""

    perplexity: float
    kl: float
    top1: float
    loops: int
    repeated_3gram_rate: float
    distinct_2: float
    texts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "kl": self.kl, "top1": self.top1, "loops": self.loops,
                "repeated_3gram_rate": self.repeated_3gram_rate, "distinct_2": self.distinct_2, "texts": self.texts}


class Prober:
    """Measures a model state against the dense model's cached outputs.

    Build it while ``model`` is dense: the constructor caches the dense log-probabilities over
    ``ids`` and the dense generations.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, ids: torch.Tensor, prompts: Sequence[str],
                 max_new_tokens: int = 32, window: int = 512) -> None:
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
            raise ValueError(f"probe token ids must be [1, n >= 2], got shape {tuple(ids.shape)}")
        self.model, self.tokenizer, self.prompts, self.max_new_tokens = model, tokenizer, list(prompts), max_new_tokens
        self.ids = ids
        self.spans = _windows(ids.shape[1], window, window)
        self._reference = list(self._log_probs())
        start = time.perf_counter()
        self.dense = self.measure()
        self.seconds_per_probe = time.perf_counter() - start

    @torch.no_grad()
    def _log_probs(self) -> Iterator[torch.Tensor]:
        device = next(self.model.parameters()).device
        for begin, end, scored in self.spans:
            chunk = self.ids[:, begin:end].to(device)
            logits = self.model(chunk, use_cache=False).logits[0, -scored - 1 : -1].float()
            yield F.log_softmax(logits, -1)

    @torch.no_grad()
    def measure(self) -> ProbeResult:
        """Measures of ``model`` as it is now."""
        nll, kl, agree, count = 0.0, 0.0, 0, 0
        for (_, end, scored), logp, ref in zip(self.spans, self._log_probs(), self._reference):
            targets = self.ids[0, end - scored : end].to(logp.device)
            nll += float(-logp.gather(1, targets[:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            count += scored
        health = generation_health(self.model, self.tokenizer, self.prompts, self.max_new_tokens, progress=False)
        return ProbeResult(
            perplexity=math.exp(nll / count), kl=max(kl / count, 0.0), top1=agree / count, loops=health["loops"],
            repeated_3gram_rate=health["mean_repeated_3gram_rate"], distinct_2=health["mean_distinct_2"],
            texts=[s["text"] for s in health["samples"]],
        )


def estimate_seconds(prober: Prober, groups: Mapping[str, Sequence[str]], modes: Sequence[str]) -> float:
    """Rough wall time of :func:`run_probes`: one dense probe's time per probe, plus the all-compressed one."""
    return prober.seconds_per_probe * (len(groups) * len(modes) + 1)


def run_probes(
    model: nn.Module, prober: Prober, modules: Mapping[str, nn.Module], groups: Mapping[str, Sequence[str]],
    modes: Sequence[str] = MODES, progress: bool = True,
) -> dict[str, Any]:
    """``{"all": ProbeResult, "alone": {group: ProbeResult}, "leave_one_out": {group: ProbeResult}}``
    (all-compressed measures under ``"all"``; dense ones are ``prober.dense``)."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"probe mode must be one of {MODES}, got {mode!r}")
    missing = sorted({n for members in groups.values() for n in members} - set(modules))
    if missing:
        raise ValueError(f"probe groups name layers with no compressed module: {missing[:3]}")
    start = time.perf_counter()
    with swapped(model, modules):
        everything = prober.measure()
    if "leave_one_out" in modes:  # leave-one-out states run about as long as the all-compressed one
        seconds = prober.seconds_per_probe * len(groups) * ("alone" in modes) + (time.perf_counter() - start) * len(groups)
        logger.warning("hf_svdq analysis: refined estimate %.0f s for the remaining probes", seconds)
    results: dict[str, Any] = {"all": everything}
    jobs = [(mode, key) for mode in modes for key in groups]
    for mode in modes:
        results[mode] = {}
    for mode, key in tqdm(jobs, desc="probes", disable=not progress):
        members = set(groups[key])
        chosen = {n: m for n, m in modules.items() if (n in members) == (mode == "alone")}
        with swapped(model, chosen):
            results[mode][key] = prober.measure()
    return results
