"""Reading safetensors headers and checking them against the hf_svdq format before any load."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from safetensors import safe_open

from . import format as fmt

TensorHeaders = dict[str, tuple[tuple[int, ...], str]]
"""``{tensor name: (shape, safetensors dtype such as "I8" or "F32")}``."""

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_headers(files: Iterable[str | os.PathLike[str]]) -> TensorHeaders:
    """Shapes and dtypes of every tensor in ``files`` (reads headers only)."""
    headers: TensorHeaders = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                headers[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return headers


def safetensors_files(folder: str | os.PathLike[str]) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    return files


def expected_tensors(name: str, out_features: int, in_features: int, rank: int) -> dict[str, tuple[tuple[int, ...], Sequence[str]]]:
    """``{tensor name: (shape, allowed dtypes)}`` of one compressed layer (bias not included)."""
    return {
        f"{name}.{fmt.LEFT}": ((out_features, rank), ("I8",)),
        f"{name}.{fmt.LEFT_SCALE}": ((out_features,), FLOAT_DTYPES),
        f"{name}.{fmt.RIGHT}": ((rank, in_features), ("I8",)),
        f"{name}.{fmt.RIGHT_SCALE}": ((rank,), FLOAT_DTYPES),
    }


def check_layer(headers: TensorHeaders, name: str, out_features: int, in_features: int, rank: int) -> None:
    """Raise ``ValueError`` naming the tensor if the checkpoint lacks or misshapes a factor of ``name``."""
    for key, (shape, dtypes) in expected_tensors(name, out_features, in_features, rank).items():
        if key not in headers:
            raise ValueError(f"hf_svdq checkpoint is missing tensor {key} (compressed layer {name}, rank {rank})")
        got_shape, got_dtype = headers[key]
        if got_shape != shape or got_dtype not in dtypes:
            raise ValueError(
                f"hf_svdq checkpoint tensor {key} is {got_dtype}{list(got_shape)}, expected {'/'.join(dtypes)}{list(shape)}"
            )
