"""Per-layer size report of a saved checkpoint, read from ``config.json`` and safetensors headers.

Nothing is loaded into memory but the headers, so this works on any checkpoint size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import layout as fmt
from .checkpoint import TensorHeaders, expected_tensors, read_headers, safetensors_files, tensor_nbytes


@dataclass(frozen=True)
class LayerRow:
    """One eligible Linear layer of a checkpoint."""

    name: str
    out_features: int
    in_features: int
    rank: int | None
    dense_bytes: int  # the dense weight in the checkpoint's float dtype
    stored_bytes: int  # what the checkpoint holds for the weight (factors + scales, or the dense weight)
    note: str  # "" when compressed, else why it stayed dense
    experts: int = 0  # an expert stack of this many [out, in] matrices; 0 for a Linear

    @property
    def weights(self) -> int:
        """Dense weights of the layer (all experts of a stack)."""
        return self.out_features * self.in_features * (self.experts or 1)


@dataclass(frozen=True)
class CheckpointReport:
    layers: list[LayerRow]
    total_bytes: int  # all tensors in the checkpoint
    dense_total_bytes: int  # the same model with every compressed layer dense
    dense_params: int  # parameter count of the dense model
    format_version: int | None
    coverage: dict[str, Any] | None = None  # recorded at compression (hf_svdq.compression.coverage)

    @property
    def compressed(self) -> list[LayerRow]:
        return [row for row in self.layers if row.rank is not None]

    def bits_per_weight_compressed(self) -> float:
        """Stored bits per dense weight over the compressed layers only."""
        rows = self.compressed
        weights = sum(r.weights for r in rows)
        return 8.0 * sum(r.stored_bytes for r in rows) / weights if weights else float("nan")

    def bits_per_weight_overall(self) -> float:
        """All checkpoint bits over all weights of the dense model."""
        return 8.0 * self.total_bytes / self.dense_params if self.dense_params else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "layers_compressed": len(self.compressed),
            "layers_dense": len(self.layers) - len(self.compressed),
            "bytes_dense": self.dense_total_bytes,
            "bytes_stored": self.total_bytes,
            "bits_per_weight_compressed_layers": self.bits_per_weight_compressed(),
            "bits_per_weight_overall": self.bits_per_weight_overall(),
            "coverage": self.coverage,
            "layers": [asdict(r) for r in self.layers],
        }


def checkpoint_report(folder: str | Path) -> CheckpointReport:
    """Report on a saved (hf_svdq or plain) checkpoint folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers checkpoint folder")
    config = json.loads(config_path.read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig and qconfig.get("quant_method") != fmt.QUANT_METHOD:
        raise ValueError(f"{folder} is quantized with {qconfig.get('quant_method')!r}, not hf_svdq")
    headers = read_headers(safetensors_files(folder))
    ranks: dict[str, int] = qconfig.get("ranks") or {}
    dense_notes: dict[str, str] = qconfig.get("dense") or {}

    rows, compressed_tensors = [], set[str]()
    layer_bits: dict[str, int] = qconfig.get("layer_bits") or {}
    for name, rank in ranks.items():
        bits = layer_bits.get(name, qconfig.get("residual_bits"))
        row, expected = _compressed_row(folder, headers, name, rank, bits, qconfig.get("group_size"))
        rows.append(row)
        compressed_tensors.update(expected)
    rows.extend(_dense_row(headers, name, note) for name, note in dense_notes.items())
    rows.sort(key=lambda r: r.name)

    total = sum(tensor_nbytes(*v) for v in headers.values())
    dense_total = total - sum(r.stored_bytes - r.dense_bytes for r in rows if r.rank is not None)
    params = sum(_numel(shape) for key, (shape, _) in headers.items() if key not in compressed_tensors)
    params += sum(r.weights for r in rows if r.rank is not None)
    return CheckpointReport(rows, total, dense_total, params, qconfig.get("format_version"), qconfig.get("coverage"))


def _compressed_row(folder: Path, headers: TensorHeaders, name: str, rank: int, bits: int | None,
                    group_size: int | None) -> tuple[LayerRow, list[str]]:
    """A compressed layer's row, its dimensions read from its tensors' headers, and its tensor names."""
    if name in headers:  # an expert stack: its codes carry the stack's own name
        return _expert_row(folder, headers, name, rank, bits, group_size)
    first = f"{name}.{fmt.LEFT}"
    if first not in headers:
        raise ValueError(f"{folder}: compressed layer {name} lacks tensor {first}")
    shape = headers[first][0]
    if bits is None:
        out_features, in_features = shape[0], headers.get(f"{name}.{fmt.RIGHT}", ((0, 0), ""))[0][1]
        scale_dtype = headers.get(f"{name}.{fmt.LEFT_SCALE}", ((), "F32"))[1]
    else:
        out_features, in_features = shape[0], shape[1] * shape[2] * 8 // bits
        scale_dtype = headers.get(f"{name}.{fmt.CORR_LEFT_SCALE}", headers.get(f"{name}.bias", ((), "F32")))[1]
    expected = list(expected_tensors(name, out_features, in_features, rank, bits, group_size))
    missing = [n for n in expected if n not in headers]
    if missing:
        raise ValueError(f"{folder}: compressed layer {name} lacks tensor(s) {missing}")
    stored = sum(tensor_nbytes(*headers[n]) for n in expected)
    dense = out_features * in_features * tensor_nbytes((), scale_dtype)
    return LayerRow(name, out_features, in_features, rank, dense, stored, ""), expected


def _expert_row(folder: Path, headers: TensorHeaders, name: str, rank: int, bits: int | None,
                group_size: int | None) -> tuple[LayerRow, list[str]]:
    """:func:`_compressed_row` of an expert stack ``<experts module>.<stack>``."""
    module, _, stack = name.rpartition(".")
    shape = headers[name][0]
    experts, out_features = shape[0], shape[1]
    if bits is None:
        in_features = headers.get(f"{module}.{fmt.expert_tensor_name(stack, fmt.RIGHT)}", ((0, 0, 0), ""))[0][2]
        scale_dtype = headers.get(f"{module}.{fmt.expert_tensor_name(stack, fmt.LEFT_SCALE)}", ((), "F32"))[1]
    else:
        in_features = shape[2] * shape[3] * 8 // bits
        scale_dtype = headers.get(f"{module}.{fmt.expert_tensor_name(stack, fmt.CORR_LEFT_SCALE)}", ((), "F32"))[1]
    layer = fmt.LayerShape(out_features, in_features, rank, bits, (group_size or in_features) if bits is not None else None)
    expected = [f"{module}.{t}" for t in fmt.expert_tensors(stack, layer, experts)]
    missing = [n for n in expected if n not in headers]
    if missing:
        raise ValueError(f"{folder}: compressed expert stack {name} lacks tensor(s) {missing}")
    stored = sum(tensor_nbytes(*headers[n]) for n in expected)
    dense = experts * out_features * in_features * tensor_nbytes((), scale_dtype)
    return LayerRow(name, out_features, in_features, rank, dense, stored, "", experts), expected


def _dense_row(headers: TensorHeaders, name: str, note: str) -> LayerRow:
    if name in headers and len(headers[name][0]) == 3:  # a dense expert stack
        shape, dtype = headers[name]
        size = tensor_nbytes(shape, dtype)
        return LayerRow(name, shape[1], shape[2], None, size, size, note, shape[0])
    key = f"{name}.weight"
    if key not in headers:  # a head tied to the embedding is stored once, under the embedding
        return LayerRow(name, 0, 0, None, 0, 0, f"{note} (tied: stored with the weight it is tied to)")
    shape, dtype = headers[key]
    size = tensor_nbytes(shape, dtype)
    return LayerRow(name, shape[0], shape[-1], None, size, size, note)  # as stored (GPT-2 Conv1D stores [in, out])


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def format_report(report: CheckpointReport, per_layer: bool = True) -> str:
    """A readable table plus the summary lines."""
    lines = []
    if per_layer:
        lines.append(f"{'layer':<48} {'shape':>11} {'rank':>5} {'dense B':>10} {'stored B':>10}  note")
        for r in report.layers:
            rank = "-" if r.rank is None else str(r.rank)
            shape = f"{r.out_features}x{r.in_features}" if r.out_features else "-"
            shape = f"{r.experts}x{shape}" if r.experts else shape
            lines.append(f"{r.name:<48} {shape:>11} {rank:>5} {r.dense_bytes:>10} {r.stored_bytes:>10}  {r.note or 'compressed'}")
        lines.append("")
    n = len(report.compressed)
    lines.append(f"layers compressed: {n}, kept dense: {len(report.layers) - n}")
    by_type: dict[str, list[LayerRow]] = {}
    for row in report.layers:
        by_type.setdefault(row.name.rsplit(".", 1)[-1], []).append(row)
    for kind, rows in sorted(by_type.items()):
        ranks = sorted(r.rank for r in rows if r.rank is not None)
        dense = len(rows) - len(ranks)
        text = f"rank {ranks[0]}..{ranks[-1]} (median {ranks[len(ranks) // 2]})" if ranks else "no rank"
        lines.append(f"  {kind:<12} {len(ranks):>3} compressed, {dense:>3} dense; {text}")
    ratio = report.total_bytes / report.dense_total_bytes if report.dense_total_bytes else float("nan")
    lines.append(f"bytes: {report.dense_total_bytes:,} dense -> {report.total_bytes:,} stored ({ratio:.3f}x)")
    lines.append(
        f"bits per weight: {report.bits_per_weight_compressed():.2f} over compressed layers, "
        f"{report.bits_per_weight_overall():.2f} overall"
    )
    lines.extend(coverage_lines(report.coverage))
    return "\n".join(lines)


def coverage_lines(coverage: dict[str, Any] | None) -> list[str]:
    """The recorded coverage as summary lines: the compressed share, then what stayed dense and why."""
    if not coverage:
        return ["coverage: not recorded (checkpoint written before coverage was recorded)"]
    non_embedding = max(int(coverage.get("parameters", 0)) - int(coverage.get("embedding", 0)), 1)
    compressed = int(coverage.get("compressed", 0))
    lines = [(f"coverage: {compressed:,} of {non_embedding:,} non-embedding parameters compressed "
              f"({compressed / non_embedding:.1%}); embeddings {int(coverage.get('embedding', 0)):,} dense")]
    for reason, count in sorted((coverage.get("dense") or {}).items(), key=lambda kv: -int(kv[1])):
        lines.append(f"  dense, {reason}: {int(count):,} ({int(count) / non_embedding:.1%})")
    fallback = coverage.get("experts_calibrated_data_free")
    if fallback:
        lines.append(f"  experts with too few routed calibration tokens (compressed data-free): {fallback['experts']} of {fallback['of']}")
    return lines
