"""Collecting calibration activation statistics: input Gram matrices ``X^T X`` of Linear layers,
and the block-by-block machinery for sequential (GPTQ-style) calibration."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..nn.low_rank import is_conv1d


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


class GramCollector:
    """Accumulates ``X^T X`` (float64) of each named module's input while registered."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            gram = (x.T @ x).to(torch.float64)  # float32 products per batch, float64 running sum
            if name in self.grams:
                self.grams[name] += gram
            else:
                self.grams[name] = gram
        return hook

    @contextmanager
    def attached(self) -> Iterator[GramCollector]:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the ModuleList holding the most Linear layers."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(isinstance(m, nn.Linear) or is_conv1d(m) for m in module.modules())
            if count and (best is None or count > best[0]):
                best = (count, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks containing Linear layers")
    return best[1], best[2]


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]


@torch.no_grad()
def block_inputs(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering block 0 (one tensor per batch) and the keyword arguments each block
    receives (captured once on a one-sample batch; masks and rotary tables broadcast over batches)."""
    device = next(model.parameters()).device
    kwargs: list[dict[str, Any]] = [{} for _ in blocks]

    def kwarg_hook(index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            kwargs[index] = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position")}
            if index == len(blocks) - 1:
                raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(kwarg_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(ids[:1].to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()

    hidden: list[torch.Tensor] = []

    def first_hook(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        hidden.append(args[0] if args else kw["hidden_states"])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(first_hook, with_kwargs=True)
    try:
        for batch in _batches(ids, batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def input_groups(block: nn.Module, names: Sequence[str], hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[list[str]]:
    """Linears of ``block`` grouped by shared input, in execution order (e.g. [q,k,v], [o], [gate,up], [down])."""
    order: list[tuple[str, int]] = []
    inputs: list[torch.Tensor] = []  # held until grouping is done: an id is unique only while its object lives
    modules = {n: block.get_submodule(n) for n in names}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.append(args[0])
            order.append((name, id(args[0])))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_block(block, hidden[:1], kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, key in order:
        if name not in groups.setdefault(key, []):
            groups[key].append(name)
    return list(groups.values())


@torch.no_grad()
def block_grams(
    block: nn.Module, names: Sequence[str], hidden: Sequence[torch.Tensor], kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Input Grams of ``names`` (submodules of ``block``) over all hidden batches; the forward stops
    as soon as every named layer has seen its input."""
    modules = {n: block.get_submodule(n) for n in names}
    collector = GramCollector(modules)
    seen: set[str] = set()

    def stopper(name: str):
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.add(name)
            if seen >= set(names):
                raise _Stop
        return fn

    with collector.attached():
        handles = [m.register_forward_pre_hook(stopper(n)) for n, m in modules.items()]
        try:
            for batch in hidden:
                seen.clear()
                try:
                    run_block(block, batch, kwargs)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
    return collector.grams


def _cache_key(model: nn.Module, ids: torch.Tensor) -> str:
    digest = hashlib.sha256(ids.numpy().tobytes())
    digest.update(str(getattr(getattr(model, "config", None), "name_or_path", type(model).__name__)).encode())
    for name, param in list(model.named_parameters())[:4]:
        digest.update(name.encode())
        digest.update(param.detach().float().flatten()[:64].numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def dense_grams(
    model: nn.Module, names: Iterable[str], ids: torch.Tensor, batch_size: int, cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Input Grams of every named layer from one pass of the (dense) model over ``ids``, stopping
    before the output head. With ``cache_dir`` the result is stored and reused for the same model
    and tokens."""
    names = list(names)
    path = Path(cache_dir) / f"grams-{_cache_key(model, ids)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        cached = load_file(str(path))
        if set(names) <= set(cached):
            return {n: cached[n] for n in names}
    _, blocks = find_blocks(model)
    collector = GramCollector({n: model.get_submodule(n) for n in names})

    def stop(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise _Stop

    device = next(model.parameters()).device
    handle: Any = blocks[-1].register_forward_hook(stop)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if head_name in names:  # the head needs the final hidden states: run the whole model
        handle.remove()
        handle = None
    try:
        with collector.attached():
            for batch in tqdm(_batches(ids, batch_size), desc="activation statistics", disable=not progress):
                try:
                    model(batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()
    grams = collector.grams
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in grams.items()}, str(path))
    return grams
