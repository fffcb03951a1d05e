"""Compressing a checkpoint straight from disk to disk, a block at a time (``hf-svdq compress``).

The dense model is never in memory: its skeleton is built on the meta device, the embeddings, final
norm and head are read, then each block is read from the safetensors files, compressed
(:func:`hf_svdq.compression.blockwise.compress_model`), written out and dropped. Peak memory is the
parts outside the blocks, one dense block, one block's statistics and the calibration activations,
whatever the number of blocks (:mod:`.estimate` predicts it before anything starts).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..calibration.source import calibration_tokenizer
from ..calibration.statistics import find_blocks
from ..compression.blockwise import compress_model
from ..compression.decisions import LayerDecision
from ..compression.plan import (
    compression_settings,
    find_linear_layers,
    plan_from_resolved,
    protected_layers,
    resolve_plan,
)
from ..format.checkpoint import resolve_checkpoint
from ..format.output_folder import atomic_folder, check_output_folder
from ..integration.config import SVDQuantConfig
from ..integration.recording import record_result
from ..nn.experts import is_fused_experts
from .estimate import MemoryEstimate, check_fits, estimate_peak
from .journal import DiskJournal
from .reader import CheckpointNames, DiskBlocks, LazyCheckpoint, load_into, skeleton
from .writer import outside_blocks_state, save_block, write_folder

logger = logging.getLogger(__name__)


class StreamingUnsupported(ValueError):
    """This model or config cannot be compressed block by block from disk (the reason says why);
    ``from_pretrained(..., quantization_config=...)`` still compresses it in memory."""


@dataclass(frozen=True)
class StreamedCompression:
    """What :func:`compress_checkpoint` did."""

    outdir: Path
    decisions: list[LayerDecision]
    estimate: MemoryEstimate
    config: SVDQuantConfig


def work_folder(outdir: str | Path) -> Path:
    """Where a run keeps what it needs to resume: beside the output, ``.<name>.hf_svdq-work``."""
    out = Path(outdir).resolve()
    return out.parent / f".{out.name}.hf_svdq-work"


def streaming_unsupported(config: SVDQuantConfig) -> str | None:
    """Why ``config`` needs the whole model in memory (None: it streams)."""
    calibration = config.calibration
    if calibration is not None and calibration.dataset == "model":
        return "calibration dataset 'model' samples text from the whole dense model"
    if config.bit_choices and calibration is not None:
        return "a calibrated mixed-bits budget weighs layers by a backward pass through the whole model"
    return None


def compress_checkpoint(
    source: str | Path, outdir: str | Path, config: SVDQuantConfig, *, dtype: torch.dtype | None = None,
    resume: bool = False, overwrite: bool = False, progress: bool = True, memory_check: bool = True,
    finish: Callable[[Path], None] | None = None,
) -> StreamedCompression:
    """Compress the dense causal LM at ``source`` (a folder or Hub id of safetensors) into the hf_svdq
    checkpoint folder ``outdir``, a block at a time; ``from_pretrained(outdir)`` loads the result.
    ``resume``: continue an interrupted run from its last finished block (same bytes as an
    uninterrupted one). ``memory_check``: refuse to start when the predicted peak does not fit.
    ``finish``: called with the output folder before it is published (to add a tokenizer, a card)."""
    from transformers import AutoConfig

    reason = streaming_unsupported(config)
    if reason is not None:
        raise StreamingUnsupported(f"cannot stream this compression: {reason}")
    check_output_folder(outdir, [source], overwrite=overwrite)
    folder = resolve_checkpoint(source)
    hf_config = AutoConfig.from_pretrained(folder)
    checkpoint = LazyCheckpoint.open(folder)
    if dtype is None:
        stored = getattr(hf_config, "dtype", None)
        dtype = getattr(torch, stored.removeprefix("torch.")) if isinstance(stored, str) else stored or torch.float32
    config = copy.deepcopy(config)  # resolving the plan writes into it; the caller may reuse theirs
    model: Any = skeleton(hf_config, dtype)
    model.config.name_or_path = str(folder)
    model.config.dtype = dtype  # transformers 5.0's from_config leaves the config's own dtype; the file says ours
    prefix, modules = find_blocks(model)
    experts = [name for name, m in model.named_modules() if is_fused_experts(m)]
    if experts:
        raise StreamingUnsupported(f"cannot stream a mixture-of-experts model ({experts[0]}): transformers merges "
                                   "its per-expert checkpoint tensors while loading")
    names = CheckpointNames(checkpoint, getattr(model, "base_model_prefix", ""))
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {})
    load_into(model, "", names, dtype, optional=tied, exclude=prefix)
    if tied:
        model.tie_weights()
    specs = find_linear_layers(model)
    decisions = (plan_from_resolved(specs, config) if config.is_resolved
                 else resolve_plan(specs, config, protected_layers(model), dtype.itemsize))
    outside = [d.spec.name for d in decisions if d.rank is not None and not d.spec.name.startswith(prefix + ".")]
    if outside:
        raise StreamingUnsupported(f"cannot stream a compression of {outside[0]}, which lies outside the blocks")
    ids = _calibration_ids(model, config)
    settings = compression_settings(config)
    estimate = estimate_peak(model, prefix, decisions, settings, ids, dtype)
    logger.info("hf_svdq: %s", estimate.describe())
    if memory_check:
        check_fits(estimate)
    work = work_folder(outdir)
    journal = DiskJournal(work, _fingerprint(folder, checkpoint, config, dtype, ids), resume)

    def write(index: int, block: torch.nn.Module) -> None:
        save_block(block, f"{prefix}.{index}.", journal.block_file(index))

    blocks = DiskBlocks(prefix, modules, names, dtype, on_close=write)
    result = compress_model(model, settings, decisions, ids, progress, blocks, journal)
    record_result(model, config, result)
    model.config.quantization_config = config
    model.config.architectures = [type(model).__name__]
    with atomic_folder(outdir, overwrite=overwrite) as target:
        write_folder(target, model, [journal.block_file(i) for i in range(len(modules))],
                     outside_blocks_state(model, prefix), folder)
        if finish is not None:
            finish(target)
    shutil.rmtree(work, ignore_errors=True)
    return StreamedCompression(Path(outdir), result.decisions, estimate, config)


def _calibration_ids(model: Any, config: SVDQuantConfig) -> torch.Tensor | None:
    if config.calibration is None:
        return None
    return config.calibration.token_ids(calibration_tokenizer(config.calibration, model.config.name_or_path), None)


def _fingerprint(folder: Path, checkpoint: LazyCheckpoint, config: SVDQuantConfig, dtype: torch.dtype,
                 ids: torch.Tensor | None) -> dict[str, Any]:
    from .. import __version__

    files = {f: (folder / f).stat().st_size for f in sorted(set(checkpoint.files.values()))}
    tokens = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16] if ids is not None else None
    return {"hf_svdq": __version__, "source": str(folder.resolve()), "source files": files,
            "quantization_config": config.to_dict(), "dtype": str(dtype), "calibration tokens": tokens}
