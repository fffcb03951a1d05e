"""Writing a streamed compression's output folder: what ``save_pretrained`` of the compressed model
would write (``config.json`` with the resolved ``quantization_config``, the generation config, and
sharded safetensors with their index), assembled from the blocks already written one by one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..format.checkpoint import INDEX_FILE, read_headers, tensor_nbytes


def save_block(block: nn.Module, prefix: str, path: Path) -> None:
    """The block's tensors under their names in the model, into ``path`` (atomically)."""
    state = {prefix + k: v.detach().contiguous() for k, v in block.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)


def outside_blocks_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The model's own tensors outside the blocks (embeddings, final norm, head), a tied weight once
    (under its first name, as ``save_pretrained`` keeps it)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix + "."):
            continue
        if tensor.is_meta:
            raise ValueError(f"{name} was never read from the checkpoint")
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def write_folder(folder: Path, model: Any, block_files: Sequence[Path], rest: dict[str, torch.Tensor],
                 source: Path) -> None:
    """Shards (one per block, then one for the rest: the blocks' files are moved, not copied), their
    index, ``config.json`` (``model.config`` with its ``quantization_config``) and the source's
    generation config into ``folder``."""
    total = len(block_files) + 1
    weight_map: dict[str, str] = {}
    size = 0
    for number, path in enumerate(block_files, start=1):
        shard = f"model-{number:05d}-of-{total:05d}.safetensors"
        shutil.move(str(path), folder / shard)
        for key, (shape, dtype) in read_headers([folder / shard]).items():
            weight_map[key] = shard
            size += tensor_nbytes(shape, dtype)
    shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(rest, str(folder / shard), metadata={"format": "pt"})
    for key, tensor in rest.items():
        weight_map[key] = shard
        size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.save_pretrained(folder)
    generation = source / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")
