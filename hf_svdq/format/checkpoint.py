"""Reading safetensors headers and checking them against the hf_svdq format before any load."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from . import layout as fmt

TensorHeaders = dict[str, tuple[tuple[int, ...], str]]
"""``{tensor name: (shape, safetensors dtype such as "I8" or "F32")}``."""

FLOAT_DTYPES = fmt.SAFETENSORS_DTYPES[fmt.FLOAT]


def read_headers(files: Iterable[str | os.PathLike[str]]) -> TensorHeaders:
    """Shapes and dtypes of every tensor in ``files`` (reads headers only)."""
    headers: TensorHeaders = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor_slice = handle.get_slice(key)
                headers[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return headers


SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja")
"""The tokenizer files a model folder may hold (carried into exports and pushes)."""
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
"""What a checkpoint folder needs from the Hub: config, weights, tokenizer, chat template."""


def resolve_checkpoint(checkpoint: str | os.PathLike[str]) -> Path:
    """A local folder as is; anything else is taken as a Hub repo id and downloaded (weights, config, tokenizer)."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    if path.exists() or str(checkpoint).startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint {checkpoint} is not a folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(checkpoint), allow_patterns=HUB_PATTERNS))


def tensor_nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a tensor of ``shape`` and safetensors ``dtype`` (e.g. ``"BF16"``)."""
    count = 1
    for dim in shape:
        count *= dim
    return count * _DTYPE_BYTES.get(dtype, 4)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_single_or_sharded(files: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse a folder holding both a single-file save and a sharded one: one of them is stale, and
    transformers would load the single file without a word."""
    for folder in sorted({Path(f).parent for f in files}):
        if (folder / SINGLE_FILE).is_file() and (folder / INDEX_FILE).is_file():
            raise ValueError(f"{folder} holds both {SINGLE_FILE} and {INDEX_FILE} (a single-file and a sharded save): "
                             "one of them is left over from an earlier save; delete the stale one")


def safetensors_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a saved model folder: the shards its index lists, or ``model.safetensors``
    (or, for other layouts, every ``*.safetensors``); ValueError on a stale mix, naming the files."""
    root = Path(folder)
    index = root / INDEX_FILE
    if index.is_file():
        check_single_or_sharded([index])
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({root / str(name) for name in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index ({err})") from None
        missing = [f.name for f in files if not f.is_file() or f.parent != root]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are not in {root}: {missing[:3]}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    return files


def tensor_owners(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``{tensor name: open safetensors handle holding it}`` over a saved folder's weight files
    (:func:`safetensors_files`), for reading tensors one at a time."""
    handles = [safe_open(str(f), framework="pt") for f in safetensors_files(folder)]
    return {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)


def stack_tensor_names(names: list[str]) -> dict[str, str]:
    """``{tensor name: its expert stack}`` for every tensor of a compressed or dense expert stack in ``names``."""
    present = set(names)
    out: dict[str, str] = {}
    for name in names:
        module, _, last = name.rpartition(".")
        if module.endswith(".experts") and last in fmt.EXPERT_STACKS:
            out[name] = name
            for tensor in fmt.LOW_RANK_TENSORS + fmt.BASE_TENSORS + fmt.CORRECTION_TENSORS:
                companion = f"{module}.{fmt.expert_tensor_name(last, tensor.name)}"
                if companion in present:
                    out[companion] = name
    return out


def expected_tensors(
    name: str, out_features: int, in_features: int, rank: int, bits: int | None = None, group_size: int | None = None
) -> dict[str, tuple[tuple[int, ...], Sequence[str]]]:
    """``{tensor name: (shape, allowed dtypes)}`` of one compressed layer (bias not included), in the
    low-rank layout, or the residual layout when ``bits`` is given."""
    shape = fmt.LayerShape(out_features, in_features, rank, bits, group_size)
    return {f"{name}.{t.name}": (t.shape(shape), fmt.SAFETENSORS_DTYPES[t.dtype]) for t in fmt.layer_tensors(shape)}


def check_layer(
    headers: TensorHeaders, name: str, out_features: int, in_features: int, rank: int,
    bits: int | None = None, group_size: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the tensor if the checkpoint lacks or misshapes a tensor of ``name``."""
    expected = expected_tensors(name, out_features, in_features, rank, bits, group_size)
    _check_tensors(headers, expected, f"compressed layer {name}, rank {rank}")


def check_expert_stack(
    headers: TensorHeaders, name: str, experts: int, out_features: int, in_features: int, rank: int,
    bits: int | None = None, group_size: int | None = None,
) -> None:
    """:func:`check_layer` for an expert stack ``name`` (``<experts module>.<stack>``) of ``experts`` matrices."""
    module, _, stack = name.rpartition(".")
    shape = fmt.LayerShape(out_features, in_features, rank, bits, group_size)
    expected = {f"{module}.{tensor}": (dims, fmt.SAFETENSORS_DTYPES[dtype])
                for tensor, (dtype, dims) in fmt.expert_tensors(stack, shape, experts).items()}
    _check_tensors(headers, expected, f"compressed expert stack {name}, rank {rank}")


def _check_tensors(headers: TensorHeaders, expected: Mapping[str, tuple[tuple[int, ...], Sequence[str]]], what: str) -> None:
    for key, (shape, dtypes) in expected.items():
        if key not in headers:
            raise ValueError(f"hf_svdq checkpoint is missing tensor {key} ({what})")
        got_shape, got_dtype = headers[key]
        if got_shape != shape or got_dtype not in dtypes:
            raise ValueError(
                f"hf_svdq checkpoint tensor {key} is {got_dtype}{list(got_shape)}, expected {'/'.join(dtypes)}{list(shape)}"
            )
