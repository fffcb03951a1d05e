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
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor_slice = handle.get_slice(key)
                headers[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return headers


def safetensors_files(folder: str | os.PathLike[str]) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    return files


def expected_tensors(
    name: str, out_features: int, in_features: int, rank: int, bits: int | None = None, group_size: int | None = None
) -> dict[str, tuple[tuple[int, ...], Sequence[str]]]:
    """``{tensor name: (shape, allowed dtypes)}`` of one compressed layer (bias not included), in the
    low-rank layout, or the residual layout when ``bits`` is given."""
    if bits is None:
        return {
            f"{name}.{fmt.LEFT}": ((out_features, rank), ("I8",)),
            f"{name}.{fmt.LEFT_SCALE}": ((out_features,), FLOAT_DTYPES),
            f"{name}.{fmt.RIGHT}": ((rank, in_features), ("I8",)),
            f"{name}.{fmt.RIGHT_SCALE}": ((rank,), FLOAT_DTYPES),
        }
    group = group_size or in_features
    groups = in_features // group
    expected: dict[str, tuple[tuple[int, ...], Sequence[str]]] = {
        f"{name}.{fmt.CODES}": ((out_features, groups, group * bits // 8), ("U8",)),
        f"{name}.{fmt.GROUP_SCALE}": ((out_features, groups), ("F16",)),
        f"{name}.{fmt.GROUP_ZERO}": ((out_features, groups), ("U8",)),
    }
    if rank:
        expected.update({
            f"{name}.{fmt.CORR_LEFT}": ((out_features, rank), ("I8",)),
            f"{name}.{fmt.CORR_LEFT_SCALE}": ((out_features,), FLOAT_DTYPES),
            f"{name}.{fmt.RIGHT}": ((rank, in_features), ("I8",)),
            f"{name}.{fmt.RIGHT_SCALE}": ((rank,), FLOAT_DTYPES),
        })
    return expected


def check_layer(
    headers: TensorHeaders, name: str, out_features: int, in_features: int, rank: int,
    bits: int | None = None, group_size: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the tensor if the checkpoint lacks or misshapes a tensor of ``name``."""
    for key, (shape, dtypes) in expected_tensors(name, out_features, in_features, rank, bits, group_size).items():
        if key not in headers:
            raise ValueError(f"hf_svdq checkpoint is missing tensor {key} (compressed layer {name}, rank {rank})")
        got_shape, got_dtype = headers[key]
        if got_shape != shape or got_dtype not in dtypes:
            raise ValueError(
                f"hf_svdq checkpoint tensor {key} is {got_dtype}{list(got_shape)}, expected {'/'.join(dtypes)}{list(shape)}"
            )
