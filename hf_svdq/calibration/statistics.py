"""Collecting calibration activation statistics: input Gram matrices ``X^T X`` of Linear layers and,
per expert, of mixture-of-experts stacks (only the tokens the router sends to that expert), and the
block-by-block machinery for sequential (GPTQ-style) calibration."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..nn.experts import SVDQExperts, dense_projection, find_expert_stacks, is_fused_experts, routed_forward
from ..nn.low_rank import is_conv1d


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class ExpertGrams:
    """Per-expert input Grams of one expert stack: ``grams`` ``[E, in, in]`` (float64) over the tokens the
    router sent to each expert, ``tokens`` ``[E]`` how many."""

    grams: torch.Tensor
    tokens: torch.Tensor


Gram = torch.Tensor | ExpertGrams
"""A Linear's input Gram, or an expert stack's per-expert Grams."""


def hook_target(root: nn.Module, name: str) -> tuple[nn.Module, str | None]:
    """``(module, None)`` for a Linear called ``name``; ``(experts module, stack)`` for an expert stack."""
    parent_name, _, last = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if is_fused_experts(parent) and any(s.name == last for s in find_expert_stacks(parent)):
        return parent, last
    return root.get_submodule(name), None


def _accumulate(store: dict[str, Any], name: str, x: torch.Tensor) -> None:
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    gram = (x.T @ x).to(torch.float64)  # float32 products per batch, float64 running sum
    if name in store:
        store[name] += gram
    else:
        store[name] = gram


@contextmanager
def routed_through(module: nn.Module, observe: Any) -> Iterator[None]:
    """Run fused-experts ``module`` through :func:`~hf_svdq.nn.experts.routed_forward` while inside, calling
    ``observe(stack, expert, x)`` on every expert input (the same routing its own forward does)."""
    base = module.project if isinstance(module, SVDQExperts) else dense_projection(module)

    def project(stack: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        observe(stack, expert, x)
        return base(stack, expert, x)

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        index = top_k_index if top_k_index is not None else kwargs["router_indices"]
        weights = top_k_weights if top_k_weights is not None else kwargs["routing_weights"]
        return routed_forward(module, hidden_states, index, weights, project)

    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward


class GramCollector:
    """Accumulates ``X^T X`` (float64) of each named layer's input while attached: a Linear's over all
    tokens, an expert stack's per expert (:class:`ExpertGrams`)."""

    def __init__(self, modules: dict[str, nn.Module], root: nn.Module | None = None) -> None:
        """``modules``: Linears by name; expert stacks are named in ``modules`` by their experts module
        only when ``root`` is given (names resolved with :func:`hook_target`)."""
        self.targets = {n: hook_target(root, n) if root is not None else (m, None) for n, m in modules.items()}
        self.grams: dict[str, Any] = {}
        self.tokens = 0
        self._expert_sums: dict[str, list[torch.Tensor | None]] = {}
        self._expert_tokens: dict[str, list[int]] = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            _accumulate(self.grams, name, args[0])
        return hook

    def _observer(self, prefix: str, stacks: dict[str, str], experts: int):
        for full in stacks.values():
            self._expert_sums.setdefault(full, [None] * experts)
            self._expert_tokens.setdefault(full, [0] * experts)

        def observe(stack: str, expert: int, x: torch.Tensor) -> None:
            full = stacks.get(stack)
            if full is None:
                return
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            gram = (x.T @ x).to(torch.float64)
            sums = self._expert_sums[full]
            previous = sums[expert]
            sums[expert] = gram if previous is None else previous + gram
            self._expert_tokens[full][expert] += x.shape[0]
        return observe

    @contextmanager
    def attached(self) -> Iterator[GramCollector]:
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, (m, stack) in self.targets.items() if stack is None]
        experts: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for name, (module, stack) in self.targets.items():
            if stack is not None:
                experts.setdefault(id(module), (module, {}))[1][stack] = name
        with ExitStack() as contexts:
            for module, stacks in experts.values():
                count = find_expert_stacks(module)[0].experts
                contexts.enter_context(routed_through(module, self._observer("", stacks, count)))
            try:
                yield self
            finally:
                for handle in handles:
                    handle.remove()
                self._finish_experts()

    def _finish_experts(self) -> None:
        for name, sums in self._expert_sums.items():
            width = next((s.shape[0] for s in sums if s is not None), None)
            if width is None:
                stack = self.targets[name][0]
                width = next(s.in_features for s in find_expert_stacks(stack) if name.endswith("." + s.name))
            grams = torch.stack([s if s is not None else torch.zeros(width, width, dtype=torch.float64) for s in sums])
            tokens = torch.tensor(self._expert_tokens[name], dtype=torch.int64)
            previous = self.grams.get(name)
            if isinstance(previous, ExpertGrams):
                grams, tokens = grams + previous.grams, tokens + previous.tokens
            self.grams[name] = ExpertGrams(grams, tokens)
        self._expert_sums, self._expert_tokens = {}, {}


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
    receives (captured once on a one-sample batch; masks and rotary tables broadcast over batches).

    No block runs: each one's forward is replaced by a recorder that passes its input through, so this
    works when the blocks' weights are not in memory (streaming from disk) and costs only the embeddings.
    The last block's recorder ends the pass, so the head never runs either."""
    device = next(p for p in model.parameters() if not p.is_meta).device
    kwargs: list[dict[str, Any]] = [{} for _ in blocks]
    hidden: list[torch.Tensor] = []
    capture = {"kwargs": True}

    def recorder(index: int):
        def forward(*args: Any, **kw: Any) -> Any:
            state = args[0] if args else kw["hidden_states"]
            if index == 0:
                hidden.append(state)
            if capture["kwargs"]:
                kwargs[index] = {k: v for k, v in kw.items() if k not in _DROPPED_KWARGS}
            if index == len(blocks) - 1 or not capture["kwargs"]:
                raise _Stop
            return state
        return forward

    for index, block in enumerate(blocks):
        block.forward = recorder(index)  # type: ignore[method-assign]
    try:
        try:
            model(ids[:1].to(device), use_cache=False)
        except _Stop:
            pass
        hidden.clear()
        capture["kwargs"] = False
        for batch in _batches(ids, batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for block in blocks:
            del block.forward
    return hidden, kwargs


_DROPPED_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position")


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def input_groups(block: nn.Module, names: Sequence[str], hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[list[str]]:
    """Linears of ``block`` grouped by shared input, in execution order (e.g. [q,k,v], [o], [gate,up], [down]);
    each expert stack is a group of its own, in forward order ([gate_up_proj], [down_proj])."""
    order: list[tuple[str, int]] = []
    inputs: list[Any] = []  # held until grouping is done: an id is unique only while its object lives
    targets = {n: hook_target(block, n) for n in names}
    experts: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, (module, stack) in targets.items():
        if stack is not None:
            experts.setdefault(id(module), (module, []))[1].append(name)

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.append(args[0])
            order.append((name, id(args[0])))
        return fn

    def experts_hook(stacks: list[str]):
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            for name in stacks:  # one group per stack: each has its own input
                marker = object()
                inputs.append(marker)
                order.append((name, id(marker)))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, (m, stack) in targets.items() if stack is None]
    handles += [m.register_forward_pre_hook(experts_hook(stacks)) for m, stacks in experts.values()]
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
) -> dict[str, Any]:
    """Input Grams of ``names`` (submodules of ``block``, or expert stacks) over all hidden batches; the
    forward stops as soon as every named layer has seen its input (an expert stack: once its experts
    module has run)."""
    collector = GramCollector(dict.fromkeys(names, block), root=block)
    seen: set[str] = set()

    def stopper(stop_names: list[str]):
        def fn(module: nn.Module, *args: Any) -> None:
            seen.update(stop_names)
            if seen >= set(names):
                raise _Stop
        return fn

    with collector.attached():
        handles = []
        experts: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, (module, stack) in collector.targets.items():
            if stack is None:
                handles.append(module.register_forward_pre_hook(stopper([name])))
            else:
                experts.setdefault(id(module), (module, []))[1].append(name)
        handles += [m.register_forward_hook(stopper(stacks)) for m, stacks in experts.values()]
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


_TOKENS = ".__tokens__"
"""Suffix of an expert stack's per-expert token counts in a statistics cache file."""


def _cache_key(model: nn.Module, ids: torch.Tensor) -> str:
    digest = hashlib.sha256(ids.numpy().tobytes())
    digest.update(str(getattr(getattr(model, "config", None), "name_or_path", type(model).__name__)).encode())
    for name, param in list(model.named_parameters())[:4]:
        digest.update(name.encode())
        digest.update(param.detach().float().flatten()[:64].numpy().tobytes())
    return digest.hexdigest()[:16]


def load_grams(path: Path, names: Iterable[str]) -> dict[str, Any] | None:
    """The Grams of ``names`` stored at ``path`` by :func:`save_grams`; None unless all are there."""
    if not path.is_file():
        return None
    cached = load_file(str(path))
    names = list(names)
    if not set(names) <= set(cached):
        return None
    return {n: ExpertGrams(cached[n], cached[n + _TOKENS]) if n + _TOKENS in cached else cached[n] for n in names}


def save_grams(path: Path, grams: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for key, value in grams.items():
        if isinstance(value, ExpertGrams):
            flat[key], flat[key + _TOKENS] = value.grams.contiguous(), value.tokens
        else:
            flat[key] = value.contiguous()
    save_file(flat, str(path))


def cache_path(cache_dir: str, model: nn.Module, ids: torch.Tensor, part: str = "") -> Path:
    """Where statistics of ``model`` on ``ids`` are cached (``part``: e.g. one block's)."""
    return Path(cache_dir) / f"grams-{_cache_key(model, ids)}{part}.safetensors"


@torch.no_grad()
def dense_grams(
    model: nn.Module, names: Iterable[str], ids: torch.Tensor, batch_size: int, cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Input Grams of every named layer from one pass of the (dense) model over ``ids``, stopping
    before the output head. With ``cache_dir`` the result is stored and reused for the same model
    and tokens."""
    names = list(names)
    path = cache_path(cache_dir, model, ids) if cache_dir else None
    cached = load_grams(path, names) if path is not None else None
    if cached is not None:
        return cached
    _, blocks = find_blocks(model)
    collector = GramCollector(dict.fromkeys(names, model), root=model)

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
        save_grams(path, grams)
    return grams
