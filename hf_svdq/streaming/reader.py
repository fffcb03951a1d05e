"""Reading a dense checkpoint a block at a time: the model skeleton on the meta device, tensors read
lazily from its safetensors files, and a :class:`~hf_svdq.compression.blockwise.Blocks` view whose
blocks hold real weights only between ``open`` and ``close``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..format.checkpoint import INDEX_FILE, SINGLE_FILE


@dataclass
class LazyCheckpoint:
    """Which safetensors file holds each tensor of a checkpoint folder; tensors are read on request
    (memory-mapped until the block holding them is dropped), never the whole file."""

    folder: Path
    files: dict[str, str]  # tensor name -> file name

    @classmethod
    def open(cls, folder: str | Path) -> LazyCheckpoint:
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(folder, dict(weight_map))
        single = folder / SINGLE_FILE
        if single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                return cls(folder, dict.fromkeys(handle.keys(), SINGLE_FILE))
        raise FileNotFoundError(f"{folder} holds no safetensors checkpoint ({INDEX_FILE} or {SINGLE_FILE}); "
                                "streaming compression reads safetensors only")

    def total_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))

    def read(self, names: Iterable[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (in ``dtype`` when given), each file opened once and closed after."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as handle:
                for name in wanted:
                    tensor = handle.get_tensor(name)  # memory-mapped: pages are read as they are used
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    out[name] = tensor
        return out


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory) and its buffers
    (rotary tables, causal masks) real: they are computed, not stored."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


@dataclass
class CheckpointNames:
    """How the model's parameter names are spelled in the checkpoint (some omit the base model's prefix)."""

    checkpoint: LazyCheckpoint
    base_prefix: str
    _cache: dict[str, str] = field(default_factory=dict)

    def of(self, name: str) -> str | None:
        if name in self._cache:
            return self._cache[name]
        candidates = [name]
        if self.base_prefix and name.startswith(self.base_prefix + "."):
            candidates.append(name[len(self.base_prefix) + 1:])
        found = next((c for c in candidates if c in self.checkpoint.files), None)
        if found is not None:
            self._cache[name] = found
        return found


def load_into(module: nn.Module, prefix: str, names: CheckpointNames, dtype: torch.dtype | None,
              optional: Iterable[str] = (), exclude: str | None = None) -> None:
    """Read every parameter and persistent buffer of ``module`` (named ``prefix`` + local name in the model)
    from the checkpoint and install it. A tensor the checkpoint lacks is an error naming it, unless listed
    in ``optional`` (tied weights); a tensor of another shape too. ``exclude``: skip names under it."""
    optional = set(optional)
    wanted = {local: prefix + local for local in module.state_dict(keep_vars=True)
              if exclude is None or not (prefix + local).startswith(exclude + ".")}
    stored: dict[str, str] = {}
    missing = []
    for local, full in wanted.items():
        key = names.of(full)
        if key is None:
            if full not in optional:
                missing.append(full)
            continue
        stored[local] = key
    if missing:
        raise ValueError(f"the checkpoint has no tensor for {', '.join(missing[:5])}"
                         f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}: is it a "
                         f"{type(module).__name__} checkpoint of this config?")
    tensors = names.checkpoint.read(stored.values(), dtype)
    state = {}
    current = module.state_dict(keep_vars=True)
    for local, key in stored.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(current[local].shape):
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(current[local].shape)} for {prefix + local}")
        state[local] = tensor.to(current[local].dtype) if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=False, assign=True)
    for param in module.parameters():
        param.requires_grad_(False)


def to_meta(module: nn.Module) -> None:
    """Drop ``module``'s parameters (they become meta tensors of the same shape); buffers stay."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


@dataclass
class DiskBlocks:
    """The model's blocks read from the checkpoint when opened and dropped when closed; ``on_close`` is
    called with a compressed block before its weights are dropped (to write them out)."""

    prefix: str
    modules: nn.ModuleList
    names: CheckpointNames
    dtype: torch.dtype | None
    on_close: Any = None

    def __len__(self) -> int:
        return len(self.modules)

    def open(self, index: int) -> nn.Module:
        block = self.modules[index]
        load_into(block, f"{self.prefix}.{index}.", self.names, self.dtype)
        return block

    def close(self, index: int, block: nn.Module, compressed: bool) -> None:
        if compressed and self.on_close is not None:
            self.on_close(index, block)
        to_meta(block)
