"""Compressing a model block by block, with memory bounded by one decoder block.

Every data-dependent mode runs here: calibrated (whitened) low rank, the residual modes, ranks from
the data and global budgets (ranks, or bits and ranks). The model's blocks are reached through a
:class:`Blocks` view, so the same loop compresses a model already in memory (``from_pretrained``) and
one streamed from disk a block at a time (:mod:`hf_svdq.compression.streaming`).

A budget needs every layer's loss curve before any layer's rank is known, and a curve needs its
layer's input Gram. So a budgeted run makes two passes over the blocks: the first collects each
block's Grams, turns them into curves (a few KB per layer: :func:`~hf_svdq.compression.compress.layer_curve`)
and frees them; the budget is solved; the second pass collects each block's Grams again and
compresses it. Only one block's Grams (one per group of layers that share an input) and one set of
calibration activations (at the current block boundary) are alive at any time. A :class:`Journal`
records each finished block, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.whitening import Whitener
from ..calibration.statistics import (
    GramCollector,
    block_grams,
    block_inputs,
    cache_path,
    dense_grams,
    find_blocks,
    input_groups,
    load_grams,
    run_block,
    save_grams,
)
from .compress import CompressionResult, budget_ranks, compress_layer, layer_curve, mixed_budget
from .decisions import CompressionSettings, LayerDecision
from .experts import compress_stack
from .fisher import output_sensitivity
from .memory import bound_heap, release_free_memory

logger = logging.getLogger(__name__)

CURVES, COMPRESS = "curves", "compress"
"""The two passes: loss curves for a budget, then compression."""


class Blocks(Protocol):
    """The model's decoder blocks, materialized one at a time."""

    prefix: str
    """Name of the ModuleList holding the blocks (``model.layers``)."""
    modules: nn.ModuleList
    """That ModuleList, as it sits in the model (its blocks' weights may be on the meta device)."""

    def __len__(self) -> int: ...

    def open(self, index: int) -> nn.Module:
        """Block ``index`` with its dense weights in memory, installed in the model."""

    def close(self, index: int, block: nn.Module, compressed: bool) -> None:
        """Done with block ``index`` for this pass (``compressed``: in the compression pass)."""


@dataclass
class ModelBlocks:
    """The blocks of a model that is already in memory: opening and closing them does nothing."""

    prefix: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def open(self, index: int) -> nn.Module:
        return self.modules[index]

    def close(self, index: int, block: nn.Module, compressed: bool) -> None:
        return None


class Journal(Protocol):
    """Where a run records its progress so that it can resume (see :mod:`.streaming`)."""

    def resume(self, stage: str) -> tuple[int, list[torch.Tensor] | None]:
        """The first block ``stage`` still has to do and the activations entering it (None: from the start)."""

    def finished(self, stage: str, index: int, hidden: list[torch.Tensor], curves: dict[str, Any] | None) -> None:
        """Block ``index`` is done for ``stage``; ``hidden`` enter block ``index + 1``."""

    def curves(self) -> dict[str, Any]:
        """Every curve recorded by the curves pass so far."""

    def results(self) -> dict[str, Any]:
        """What the compression pass recorded for the blocks it finished: ``{layer: [compressed, rank, fallback]}``."""


def compress_model(
    model: nn.Module, settings: CompressionSettings, decisions: Sequence[LayerDecision], ids: torch.Tensor | None,
    progress: bool = True, blocks: Blocks | None = None, journal: Journal | None = None,
) -> CompressionResult:
    """Replace every layer ``decisions`` plans compressed (a rank, or ``RANK_FROM_DATA``) in place,
    block by block, calibrated on ``ids`` when given (on the outputs of the already-compressed blocks
    when ``settings.sequential``, else on the dense model's). ``blocks``: how to reach the blocks
    (default: the model's own, in memory)."""
    bound_heap()
    if blocks is None:
        prefix, modules = find_blocks(model)
        blocks = ModelBlocks(prefix, modules)
    targets = [d for d in decisions if d.rank is not None]
    run = _Run(model, blocks, settings, ids, progress, journal)
    inside, rest = run.split(targets)
    rest_grams: dict[str, Any] = {}
    if rest and ids is not None and not settings.sequential:
        rest_grams = dense_grams(model, [d.spec.name for d in rest], ids, settings.batch_size, None, progress)
    prediction = None
    if settings.budgeted:
        kappa = None
        if settings.bit_choices and ids is not None:
            kappa = output_sensitivity(model, [d.spec.name for d in targets], ids, settings.batch_size)
        curves = run.curves_pass(inside)
        for d in rest:
            curves[d.spec.name] = layer_curve(model, d, settings, rest_grams.get(d.spec.name))
        targets, prediction = _solve_budget(model, targets, settings, curves, kappa)
        inside, rest = run.split(targets)
    run.compress_pass(inside)
    if rest:
        if ids is not None and settings.sequential:
            rest_grams = dense_grams(model, [d.spec.name for d in rest], ids, settings.batch_size, None, progress)
        for d in rest:
            run.compress(d, rest_grams.pop(d.spec.name, None))
    return run.result(decisions, targets, prediction)


def _solve_budget(model: nn.Module, targets: list[LayerDecision], settings: CompressionSettings,
                  curves: dict[str, Any], kappa: dict[str, float] | None) -> tuple[list[LayerDecision], dict[str, Any] | None]:
    if settings.bit_choices:
        mixed = mixed_budget(model, targets, settings, {}, curves=curves, kappa=kappa)
        return [replace(d, rank=mixed.ranks[d.spec.name], bits=mixed.bits[d.spec.name]) for d in targets], mixed.prediction
    ranks = budget_ranks(model, targets, settings, {}, dict(curves))
    return [replace(d, rank=ranks[d.spec.name]) for d in targets], None


class _Run:
    """One compression run's state: where the blocks are, the calibration activations at the current
    block boundary, and what has been compressed."""

    def __init__(self, model: nn.Module, blocks: Blocks, settings: CompressionSettings, ids: torch.Tensor | None,
                 progress: bool, journal: Journal | None) -> None:
        self.model, self.blocks, self.settings, self.ids = model, blocks, settings, ids
        self.progress, self.journal = progress, journal
        self.results: dict[str, tuple[bool, int]] = {}
        self.fallback: dict[str, int] = {}
        self._kwargs: list[dict[str, Any]] | None = None
        self._cache_stem: Path | None = None

    def split(self, targets: Sequence[LayerDecision]) -> tuple[list[list[LayerDecision]], list[LayerDecision]]:
        """``targets`` by block, and those outside every block (e.g. the output head)."""
        by_block: list[list[LayerDecision]] = [[] for _ in range(len(self.blocks))]
        rest: list[LayerDecision] = []
        for d in targets:
            index = _block_index(d.spec.name, self.blocks.prefix)
            (by_block[index] if index is not None and index < len(by_block) else rest).append(d)
        return by_block, rest

    def _entry(self, stage: str) -> tuple[int, list[torch.Tensor]]:
        """The first block ``stage`` has to do and the calibration activations entering it."""
        start, hidden = self.journal.resume(stage) if self.journal is not None else (0, None)
        if self.ids is None:
            return start, []
        if hidden is None or self._kwargs is None:
            entry, self._kwargs = block_inputs(self.model, self.blocks.modules, self.ids, self.settings.batch_size)
            hidden = entry if hidden is None else hidden
        return start, hidden

    def _loop(self, stage: str, work: Callable[[int, nn.Module, list[torch.Tensor]], tuple[list[torch.Tensor], Any]],
              description: str) -> None:
        start, hidden = self._entry(stage)
        bar = tqdm(range(len(self.blocks)), desc=description, disable=not self.progress, initial=start)
        for index in range(start, len(self.blocks)):
            block = self.blocks.open(index)
            hidden, payload = work(index, block, hidden)
            self.blocks.close(index, block, stage == COMPRESS)
            if self.journal is not None:
                self.journal.finished(stage, index, hidden, payload)
            release_free_memory()
            bar.update(1)
        bar.close()

    def curves_pass(self, by_block: list[list[LayerDecision]]) -> dict[str, Any]:
        """Every in-block target's loss curve, collected block by block on the dense model."""
        curves: dict[str, Any] = dict(self.journal.curves()) if self.journal is not None else {}

        def work(index: int, block: nn.Module, hidden: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
            local: dict[str, Any] = {}
            groups, hidden = self._block_statistics(index, block, by_block[index], hidden)
            for members, gram in groups:
                whitener = self._whitener(gram)
                for d in members:
                    local[d.spec.name] = layer_curve(self.model, d, self.settings, gram, whitener)
                del whitener  # before the next group's is built
            curves.update(local)
            return hidden, local

        self._loop(CURVES, work, "loss curves for the budget")
        return curves

    def compress_pass(self, by_block: list[list[LayerDecision]]) -> None:
        if self.journal is not None:
            for name, (done, rank, fallback) in self.journal.results().items():
                self.results[name] = (bool(done), int(rank))
                if fallback >= 0:
                    self.fallback[name] = int(fallback)

        def work(index: int, block: nn.Module, hidden: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
            targets = by_block[index]
            if self.ids is not None and self.settings.sequential and targets:
                hidden = self._sequential_block(index, block, targets, hidden)
            else:
                groups, hidden = self._block_statistics(index, block, targets, hidden)
                groups.sort(key=lambda group: -max(d.spec.numel for d in group[0]))  # the largest first, freed soonest
                while groups:
                    members, gram = groups.pop(0)
                    whitener = self._whitener(gram)
                    for d in members:
                        self.compress(d, gram, whitener)
                    del members, gram, whitener
            names = [d.spec.name for d in targets]
            return hidden, {n: [int(self.results[n][0]), self.results[n][1], self.fallback.get(n, -1)] for n in names}

        self._loop(COMPRESS, work, "compressing blocks")

    def _whitener(self, gram: Any) -> Whitener | None:
        """The whitening of one group's Gram, shared by the layers that read that input (one Cholesky for
        q/k/v instead of three, which is also their GPTQ factor); None for data-free layers and expert stacks."""
        return Whitener.from_gram(gram, self.settings.damp) if isinstance(gram, torch.Tensor) else None

    def _block_statistics(self, index: int, block: nn.Module, targets: Sequence[LayerDecision],
                          hidden: list[torch.Tensor]) -> tuple[list[tuple[list[LayerDecision], Any]], list[torch.Tensor]]:
        """``targets`` grouped by shared input with the group's input Gram (None when data-free), and the
        block's dense outputs, from one forward of the block."""
        if self.ids is None:
            return [([d], None) for d in targets], hidden
        assert self._kwargs is not None
        kwargs = self._kwargs[index]
        prefix = f"{self.blocks.prefix}.{index}."
        local = [d.spec.name[len(prefix):] for d in targets]
        groups = input_groups(block, local, hidden[0], kwargs) if local else []
        path = None
        if self.settings.stats_cache and groups:
            if self._cache_stem is None:
                self._cache_stem = cache_path(self.settings.stats_cache, self.model, self.ids)
            path = self._cache_stem.with_name(f"{self._cache_stem.stem}-block{index}.safetensors")
        cached = load_grams(path, [g[0] for g in groups]) if path is not None else None
        collector = GramCollector({g[0]: block for g in groups} if cached is None else {}, root=block)
        outputs = []
        with torch.no_grad(), collector.attached():
            for batch in hidden:
                outputs.append(run_block(block, batch, kwargs))
        found = cached if cached is not None else collector.grams
        if path is not None and cached is None:
            save_grams(path, found)
        by_local = {d.spec.name[len(prefix):]: d for d in targets}
        return [([by_local[member] for member in g], found[g[0]]) for g in groups], outputs

    def _sequential_block(self, index: int, block: nn.Module, targets: Sequence[LayerDecision],
                          hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """GPTQ-style: each group's Gram on the outputs of the layers already compressed in this block."""
        assert self._kwargs is not None
        kwargs = self._kwargs[index]
        prefix = f"{self.blocks.prefix}.{index}."
        by_local = {d.spec.name[len(prefix):]: d for d in targets}
        for group in input_groups(block, list(by_local), hidden[0], kwargs):
            gram = block_grams(block, group[:1], hidden, kwargs)[group[0]]
            whitener = self._whitener(gram)
            for local in group:
                self.compress(by_local[local], gram, whitener)
            del gram, whitener
        with torch.no_grad():
            return [run_block(block, h, kwargs) for h in hidden]

    def compress(self, d: LayerDecision, gram: Any, whitener: Whitener | None = None) -> None:
        name = d.spec.name
        if d.spec.experts:
            done = compress_stack(self.model, d, self.settings, gram)
            self.results[name] = (done.rank is not None, done.rank or 0)
            if done.rank is not None and self.ids is not None:
                self.fallback[name] = done.fallback
            return
        new, rank = compress_layer(self.model.get_submodule(name), d, self.settings, gram, whitener=whitener)
        self.results[name] = (new is not None, rank)
        if new is not None:
            self.model.set_submodule(name, new)

    def result(self, decisions: Sequence[LayerDecision], targets: Sequence[LayerDecision],
               prediction: dict[str, Any] | None) -> CompressionResult:
        by_name = {d.spec.name: d for d in targets}
        final = []
        for d in decisions:
            if d.rank is None:
                final.append(d)
                continue
            done, rank = self.results[d.spec.name]
            final.append(replace(by_name[d.spec.name], rank=rank) if done
                         else LayerDecision(d.spec, None, f"break-even: rank {rank} is not smaller than dense"))
        if any(self.fallback.values()):
            stacks = len(self.fallback)
            experts = sum(by_name[n].spec.experts for n in self.fallback)
            logger.warning("hf_svdq: %d of %d experts (in %d stacks) saw fewer routed calibration tokens than their "
                           "input width and were compressed data-free", sum(self.fallback.values()), experts, stacks)
        return CompressionResult(final, prediction, self.fallback)


def _block_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None
